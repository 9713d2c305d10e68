"""Caption metrics: BLEU-1..4 (nltk and coco-caption), METEOR 1.5, ROUGE-L, CIDEr-D.

Every scorer takes the references and the predictions keyed by image id::

    gts = {"img1.jpg": ["a dog runs on grass", "a brown dog running"], ...}
    res = {"img1.jpg": "a dog runs through the grass", ...}

and returns a :class:`ScoreResult`: corpus-level numbers, per-image numbers and the name of
the implementation that produced them. Scorers are chosen by name from
:data:`CAPTION_SCORERS` (configuration lists the names); the ones that start a Java
process (METEOR) are context managers so the process is always stopped.

Tokenisation: captions are lower-cased and split on whitespace after the punctuation that
coco-caption's PTB tokenizer removes is dropped (``tokenize_caption``); nltk's punkt data is
not available offline, and the cleaned captions of this project contain no other markup.
SPICE is not computed: it needs a Stanford CoreNLP download that is not possible here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd

logger = logging.getLogger(__name__)

_PUNCT = re.compile(r"[!\"#$%&()*+,\-./:;<=>?@\[\\\]^_`{|}~']+")


def tokenize_caption(text: str) -> list[str]:
    """Lower-case ``text``, drop punctuation and split on whitespace."""
    return _PUNCT.sub(" ", str(text).lower()).split()


def normalise_caption(text: str) -> str:
    """The caption as the space-joined tokens that every scorer sees."""
    return " ".join(tokenize_caption(text))


@dataclass
class ScoreResult:
    """Corpus-level scores (metric -> value), per-image scores (metric -> {image_id: value}) and the implementation."""

    corpus: dict[str, float]
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    implementation: str = ""


def _check_inputs(gts: Mapping[str, Sequence[str]], res: Mapping[str, str]) -> None:
    if set(gts) != set(res):
        missing = sorted(set(gts) ^ set(res))[:5]
        raise ValueError(f"References and predictions cover different images (e.g. {missing})")
    if not gts:
        raise ValueError("No captions to score: the prediction set is empty")
    for image_id, refs in gts.items():
        if len(refs) == 0 or not any(str(r).strip() for r in refs):
            raise ValueError(f"Image {image_id!r} has no non-empty reference caption")


class NltkBleuScorer:
    """BLEU-1..4 with nltk ``corpus_bleu`` and smoothing method 1 (as the original study reported)."""

    implementation = "nltk.translate.bleu_score.corpus_bleu (SmoothingFunction.method1, whitespace tokens)"

    def score(self, gts: Mapping[str, Sequence[str]], res: Mapping[str, str]) -> ScoreResult:
        from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu

        _check_inputs(gts, res)
        ids = sorted(gts)
        refs = [[tokenize_caption(r) for r in gts[i]] for i in ids]
        hyps = [tokenize_caption(res[i]) for i in ids]
        smooth = SmoothingFunction().method1
        corpus = {}
        for n in range(1, 5):
            weights = tuple([1.0 / n] * n)
            corpus[f"bleu_{n}"] = float(corpus_bleu(refs, hyps, weights=weights, smoothing_function=smooth))
        per_image = {"bleu_4": {i: float(sentence_bleu(r, h, smoothing_function=smooth))
                                for i, r, h in zip(ids, refs, hyps)}}
        return ScoreResult(corpus, per_image, self.implementation)


class CocoBleuScorer:
    """BLEU-1..4 from coco-caption (``pycocoevalcap.bleu.Bleu``): the number captioning papers report."""

    implementation = "pycocoevalcap.bleu.Bleu (coco-caption)"

    def score(self, gts: Mapping[str, Sequence[str]], res: Mapping[str, str]) -> ScoreResult:
        from pycocoevalcap.bleu.bleu import Bleu

        _check_inputs(gts, res)
        g, r = _coco_inputs(gts, res)
        corpus_scores, image_scores = Bleu(4).compute_score(g, r, verbose=0)
        ids = list(g)
        corpus = {f"bleu_{n + 1}": float(corpus_scores[n]) for n in range(4)}
        per_image = {"bleu_4": dict(zip(ids, map(float, image_scores[3])))}
        return ScoreResult(corpus, per_image, self.implementation)


class CiderDScorer:
    """CIDEr-D (``pycocoevalcap.cider.Cider``: clipped n-gram counts and a Gaussian length penalty, x10).

    Document frequencies come from the references of the evaluated split, as in coco-caption.
    """

    implementation = "pycocoevalcap.cider.Cider (CIDEr-D, document frequencies from the evaluated split)"

    def score(self, gts: Mapping[str, Sequence[str]], res: Mapping[str, str]) -> ScoreResult:
        from pycocoevalcap.cider.cider import Cider

        _check_inputs(gts, res)
        g, r = _coco_inputs(gts, res)
        corpus_score, image_scores = Cider().compute_score(g, r)
        return ScoreResult({"cider_d": float(corpus_score)},
                           {"cider_d": dict(zip(g, map(float, image_scores)))}, self.implementation)


class RougeLScorer:
    """ROUGE-L F-measure with ``rouge-score``: best reference per image, averaged over images."""

    implementation = "rouge_score.RougeScorer(['rougeL']) (max over references, mean over images)"

    def score(self, gts: Mapping[str, Sequence[str]], res: Mapping[str, str]) -> ScoreResult:
        from rouge_score.rouge_scorer import RougeScorer

        _check_inputs(gts, res)
        scorer = RougeScorer(["rougeL"], use_stemmer=False)
        per = {}
        for image_id in sorted(gts):
            hyp = normalise_caption(res[image_id])
            per[image_id] = max(scorer.score(normalise_caption(ref), hyp)["rougeL"].fmeasure for ref in gts[image_id])
        corpus = {"rouge_l": float(sum(per.values()) / len(per))}
        return ScoreResult(corpus, {"rouge_l": per}, self.implementation)


class DiversityScorer:
    """Caption diversity: distinct captions per image and distinct words used (no per-image figure). SCST is known
    to narrow both; they show that trade beside the scores."""

    implementation = "distinct normalised captions / images; distinct words over all captions"

    def score(self, gts: Mapping[str, Sequence[str]], res: Mapping[str, str]) -> ScoreResult:
        _check_inputs(gts, res)
        captions = [normalise_caption(res[i]) for i in sorted(gts)]
        corpus = {"distinct_captions": len(set(captions)) / len(captions),
                  "vocab_used": float(len({w for c in captions for w in c.split()}))}
        return ScoreResult(corpus, {}, self.implementation)


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (METEOR 1.5 is a Java program)."""
    return shutil.which("java") is not None


class MeteorScorer:
    """METEOR 1.5 (coco-caption's jar, ``-l en -norm``) in one Java process per scorer.

    Use as a context manager: the process is closed (stdin closed, killed, reaped) on exit,
    and a watchdog kills it when one scoring call takes longer than ``timeout_s``.
    """

    implementation = "pycocoevalcap METEOR 1.5 jar (java, -l en -norm)"

    def __init__(self, timeout_s: float = 300.0, java_heap: str = "1G"):
        self.timeout_s = float(timeout_s)
        self.java_heap = java_heap
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> MeteorScorer:
        import pycocoevalcap.meteor.meteor as meteor_module

        jar_dir = os.path.dirname(os.path.abspath(meteor_module.__file__))
        cmd = ["java", "-jar", f"-Xmx{self.java_heap}", meteor_module.METEOR_JAR,
               "-", "-", "-stdio", "-l", "en", "-norm"]
        self._proc = subprocess.Popen(cmd, cwd=jar_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the Java process (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(Exception):
            proc.stdin.close()
        with contextlib.suppress(Exception):
            proc.kill()
        proc.wait(timeout=30)
        with contextlib.suppress(Exception):
            proc.stdout.close()

    def _line(self, text: str) -> str:
        self._proc.stdin.write((text + "\n").encode("utf-8"))
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("METEOR process ended unexpectedly (killed by the timeout or crashed)")
        return line.decode("utf-8").strip()

    def score(self, gts: Mapping[str, Sequence[str]], res: Mapping[str, str]) -> ScoreResult:
        if self._proc is None:
            raise RuntimeError("MeteorScorer must be used inside a `with` block")
        _check_inputs(gts, res)
        ids = sorted(gts)
        watchdog = threading.Timer(self.timeout_s, self._proc.kill)
        watchdog.start()
        try:
            stats = []
            for image_id in ids:
                refs = " ||| ".join(normalise_caption(r).replace("|||", "") for r in gts[image_id])
                hyp = normalise_caption(res[image_id]).replace("|||", "")
                stats.append(self._line(f"SCORE ||| {refs} ||| {hyp}"))
            self._proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode("utf-8"))
            self._proc.stdin.flush()
            per = {}
            for image_id in ids:
                per[image_id] = float(self._proc.stdout.readline().decode().strip())
            corpus = float(self._proc.stdout.readline().decode().strip())
        except ValueError as err:
            raise RuntimeError(f"METEOR returned an unreadable score: {err}") from err
        finally:
            watchdog.cancel()
        return ScoreResult({"meteor": corpus}, {"meteor": per}, self.implementation)


#: Scorer name (used in parameters) -> class.
CAPTION_SCORERS: dict[str, type] = {
    "nltk_bleu": NltkBleuScorer,
    "coco_bleu": CocoBleuScorer,
    "meteor": MeteorScorer,
    "rouge_l": RougeLScorer,
    "cider_d": CiderDScorer,
    "diversity": DiversityScorer,
}

#: Metrics each scorer reports (so a missing METEOR is still listed in the output).
SCORER_METRICS: dict[str, tuple[str, ...]] = {
    "nltk_bleu": ("bleu_1", "bleu_2", "bleu_3", "bleu_4"),
    "coco_bleu": ("bleu_1", "bleu_2", "bleu_3", "bleu_4"),
    "meteor": ("meteor",),
    "rouge_l": ("rouge_l",),
    "cider_d": ("cider_d",),
    "diversity": ("distinct_captions", "vocab_used"),
}

# Metric names in the output table: the two BLEU implementations get distinct names.
_OUTPUT_NAME = {"nltk_bleu": "nltk_{}", "coco_bleu": "coco_{}"}

REQUIRED_PREDICTION_COLUMNS = ("architecture", "split", "image_id", "prediction", "references")


def _coco_inputs(gts: Mapping[str, Sequence[str]], res: Mapping[str, str]):
    ids = sorted(gts)
    g = {i: [normalise_caption(r) for r in gts[i]] for i in ids}
    r = {i: [normalise_caption(res[i])] for i in ids}
    return g, r


def _as_reference_list(value, where: str) -> list[str]:
    if value is None or isinstance(value, str):
        raise ValueError(f"{where}: `references` must be a list of caption strings, got {value!r}")
    refs = [str(v) for v in list(value)]
    if not refs or not any(r.strip() for r in refs):
        raise ValueError(f"{where}: no non-empty reference caption")
    return refs


def predictions_to_groups(predictions: pd.DataFrame) -> dict[tuple[str, str], tuple[dict, dict]]:
    """Split a ``caption_predictions`` table into ``{(architecture, split): (gts, res)}``.

    Raises ``ValueError`` naming the row when a column is missing, an image appears twice for
    one architecture and split, or a row has no reference.
    """
    missing = [c for c in REQUIRED_PREDICTION_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(f"caption_predictions lacks columns {missing}; has {list(predictions.columns)}")
    groups: dict[tuple[str, str], tuple[dict, dict]] = {}
    for row_number, row in enumerate(predictions.itertuples(index=False)):
        where = (f"caption_predictions row {row_number} (architecture={row.architecture!r}, "
                 f"split={row.split!r}, image_id={row.image_id!r})")
        gts, res = groups.setdefault((str(row.architecture), str(row.split)), ({}, {}))
        if row.image_id in res:
            raise ValueError(f"{where}: image appears twice for this architecture and split")
        prediction = row.prediction
        if prediction is None or (isinstance(prediction, float) and math.isnan(prediction)):
            raise ValueError(f"{where}: prediction is missing")
        gts[str(row.image_id)] = _as_reference_list(row.references, where)
        res[str(row.image_id)] = str(prediction)
    return groups


def evaluate_captions(predictions: pd.DataFrame, scorers: Iterable[str],
                      meteor_timeout_s: float = 300.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every (architecture, split) group of ``predictions`` with the named scorers.

    Returns ``(metrics, per_image)``:

    * ``metrics``: ``architecture, split, metric, value, implementation`` -- one row per number;
      a metric that could not be computed (METEOR without Java) has ``value`` NaN and says why
      in ``implementation``;
    * ``per_image``: ``architecture, split, image_id, prediction, references, bleu_4, cider_d``
      (+ ``meteor``, ``rouge_l`` when computed).
    """
    scorers = list(scorers)
    unknown = [s for s in scorers if s not in CAPTION_SCORERS]
    if unknown:
        raise KeyError(f"Unknown caption scorer(s) {unknown}; known: {sorted(CAPTION_SCORERS)}")
    groups = predictions_to_groups(predictions)
    rows: list[dict] = []
    per_image_rows: dict[tuple[str, str, str], dict] = {}
    for (arch, split), (gts, res) in groups.items():
        for image_id in sorted(gts):
            per_image_rows[(arch, split, image_id)] = {
                "architecture": arch, "split": split, "image_id": image_id,
                "prediction": res[image_id], "references": list(gts[image_id])}

    with contextlib.ExitStack() as stack:
        for name in scorers:
            if name == "meteor" and not java_available():
                logger.warning("java is not on PATH: METEOR is recorded as missing, not computed")
                for arch, split in groups:
                    rows.append({"architecture": arch, "split": split, "metric": "meteor", "value": float("nan"),
                                 "implementation": "missing: java not on PATH"})
                continue
            scorer_cls = CAPTION_SCORERS[name]
            scorer = scorer_cls(timeout_s=meteor_timeout_s) if name == "meteor" else scorer_cls()
            if hasattr(scorer, "__enter__"):
                scorer = stack.enter_context(scorer)
            for (arch, split), (gts, res) in groups.items():
                result = scorer.score(gts, res)
                for metric, value in result.corpus.items():
                    out_name = _OUTPUT_NAME.get(name, "{}").format(metric)
                    rows.append({"architecture": arch, "split": split, "metric": out_name,
                                 "value": float(value), "implementation": result.implementation})
                if name == "coco_bleu":
                    continue  # per-image BLEU-4 comes from nltk's sentence BLEU (same smoothing as the corpus figure)
                for metric, values in result.per_image.items():
                    for image_id, value in values.items():
                        per_image_rows[(arch, split, image_id)][metric] = float(value)
            logger.info("Scored %d caption groups with %s", len(groups), name)
    metrics = pd.DataFrame(rows, columns=["architecture", "split", "metric", "value", "implementation"])
    per_image = pd.DataFrame(list(per_image_rows.values()))
    return metrics.sort_values(["architecture", "split", "metric"], kind="stable").reset_index(drop=True), per_image


def score_splits(predictions: pd.DataFrame, scorers: Iterable[str], splits: Iterable[str] | None = None,
                 meteor_timeout_s: float = 300.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`evaluate_captions` on the rows of ``splits`` (all splits when empty); the per-image table also
    carries each image's ``image_path`` when the predictions have one."""
    splits = list(splits or [])
    frame = predictions
    if splits:
        frame = frame[frame["split"].isin(splits)]
        if frame.empty:
            raise ValueError(f"caption_predictions has no rows for splits {splits}; "
                             f"it has {sorted(predictions['split'].unique())}")
    metrics, per_image = evaluate_captions(frame, scorers, meteor_timeout_s)
    if "image_path" in predictions.columns:
        keys = ["architecture", "split", "image_id"]
        paths = predictions.drop_duplicates(keys)[keys + ["image_path"]]
        per_image = per_image.merge(paths, on=keys, how="left")
    return metrics, per_image
