"""Chat metrics for Persian answers: chrF, ROUGE-L (Persian-aware tokens), script share, diversity, repetition.

The fine-tuning study saw two failure modes: answers that repeat themselves and answers
that drift into another language. Besides the overlap with the reference answers (chrF,
ROUGE-L) this module therefore measures

* ``persian_share``: share of the letters of an answer that are Arabic-script (Persian) letters
  (``llm_caption.llm.text_metrics.persian_share``, the measure fine-tuning uses too);
* ``distinct_1`` / ``distinct_2``: distinct uni-/bi-grams over all n-grams of all answers of a method;
* ``repetition_rate``: per answer, the share of its word 3-grams that already occurred earlier
  in the same answer (0 = no loop, close to 1 = a loop), averaged over answers;
* ``answer_length``: mean number of words.

Loss and perplexity come from the fine-tuning run (``llm_method_results``), measured on the
test split; perplexity is ``exp(eval_loss)``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import pandas as pd

from llm_caption.llm.text_metrics import persian_share

logger = logging.getLogger(__name__)

_WORD = re.compile(r"\w+", re.UNICODE)
# Arabic forms that Persian writes differently; unify them before comparing tokens.
_PERSIAN_NORMALISE = str.maketrans({"\u064a": "\u06cc", "\u0643": "\u06a9", "\u0649": "\u06cc", "\u200c": " "})


def tokenize_words(text: str) -> list[str]:
    """Unicode word tokens (Persian letters kept), Arabic yeh/kaf unified with the Persian ones, lower-cased."""
    return _WORD.findall(str(text).translate(_PERSIAN_NORMALISE).lower())


class PersianRougeTokenizer:
    """Tokenizer object for ``rouge_score.RougeScorer``: keeps Persian letters (its default deletes them)."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize_words(text)


def rouge_l(answers: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure of ``answers`` against ``references`` with :class:`PersianRougeTokenizer`."""
    from rouge_score.rouge_scorer import RougeScorer

    _check_pairs(answers, references)
    scorer = RougeScorer(["rougeL"], tokenizer=PersianRougeTokenizer())
    scores = [scorer.score(str(ref), str(ans))["rougeL"].fmeasure for ans, ref in zip(answers, references)]
    return float(sum(scores) / len(scores))


def chrf(answers: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu ``CHRF``, character 6-grams, beta 2) on a 0..100 scale."""
    from sacrebleu.metrics import CHRF

    _check_pairs(answers, references)
    return float(CHRF().corpus_score([str(a) for a in answers], [[str(r) for r in references]]).score)


def chrf_pp(answers: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF++ (sacrebleu ``CHRF(word_order=2)``: character 6-grams plus word uni-/bi-grams, beta 2), 0..100.

    Characters, not tokens: it compares models with different tokenizers on the same footing.
    """
    from sacrebleu.metrics import CHRF

    _check_pairs(answers, references)
    return float(CHRF(word_order=2).corpus_score([str(a) for a in answers], [[str(r) for r in references]]).score)


def distinct_n(answers: Sequence[str], n: int) -> float:
    """Distinct n-grams divided by all n-grams over all answers (0.0 when there is none)."""
    total, seen = 0, set()
    for answer in answers:
        tokens = tokenize_words(answer)
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def repetition_rate(answer: str, n: int = 3) -> float:
    """Share of the word n-grams of ``answer`` that already occurred earlier in it."""
    tokens = tokenize_words(answer)
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def _check_pairs(answers: Sequence[str], references: Sequence[str]) -> None:
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers but {len(references)} references")
    if not answers:
        raise ValueError("No answers to score")


def answer_metrics(answers: Sequence[str], references: Sequence[str] | None = None,
                   repetition_n: int = 3) -> dict[str, float]:
    """All answer-level metrics of one method; chrF and ROUGE-L only when references are given."""
    answers = [str(a) for a in answers]
    if not answers:
        raise ValueError("No answers to score")
    out = {
        "n_answers": float(len(answers)),
        "persian_share": sum(map(persian_share, answers)) / len(answers),
        "distinct_1": distinct_n(answers, 1),
        "distinct_2": distinct_n(answers, 2),
        "repetition_rate": sum(repetition_rate(a, repetition_n) for a in answers) / len(answers),
        "answer_length": sum(len(tokenize_words(a)) for a in answers) / len(answers),
    }
    if references is not None:
        out["chrf"] = chrf(answers, references)
        out["rouge_l"] = rouge_l(answers, references)
    return out


REQUIRED_GENERATION_COLUMNS = ("method", "stage", "prompt_kind", "prompt", "reference", "answer")
REQUIRED_RESULT_COLUMNS = ("method", "eval_loss")

CHAT_METRIC_COLUMNS = ["method", "stage", "n_answers", "eval_loss", "perplexity", "chrf", "rouge_l",
                       "persian_share", "distinct_1", "distinct_2", "repetition_rate", "answer_length"]


def evaluate_chat(method_results: pd.DataFrame, generations: pd.DataFrame, repetition_n: int = 3) -> pd.DataFrame:
    """One row per (method, stage) of the answers to the test prompts.

    ``stage == "after"`` rows carry the method's test eval loss and perplexity from
    ``method_results``; ``stage == "before"`` rows (the base model) have them empty.
    """
    for name, frame, cols in (("llm_generations", generations, REQUIRED_GENERATION_COLUMNS),
                              ("llm_method_results", method_results, REQUIRED_RESULT_COLUMNS)):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise ValueError(f"{name} lacks columns {missing}; has {list(frame.columns)}")
    test = generations[generations["prompt_kind"] == "test"]
    if test.empty:
        raise ValueError("llm_generations has no rows with prompt_kind == 'test': nothing to compare with references")
    for row_number, row in test.iterrows():
        if not isinstance(row["reference"], str) or not row["reference"].strip():
            raise ValueError(f"llm_generations row {row_number} (method={row['method']!r}, stage={row['stage']!r}): "
                             f"test prompt without a reference answer")
    losses = dict(zip(method_results["method"].astype(str), method_results["eval_loss"].astype(float)))
    rows = []
    for (method, stage), group in test.groupby(["method", "stage"], sort=True):
        answers = group["answer"].fillna("").astype(str).tolist()
        row = {"method": str(method), "stage": str(stage),
               **answer_metrics(answers, group["reference"].astype(str).tolist(), repetition_n)}
        if stage == "after":
            if str(method) not in losses:
                raise ValueError(f"method {method!r} has generations but no row in llm_method_results")
            loss = losses[str(method)]
            row["eval_loss"] = loss
            row["perplexity"] = math.exp(loss) if math.isfinite(loss) else float("nan")
        else:
            row["eval_loss"] = row["perplexity"] = float("nan")
        rows.append(row)
    missing_methods = sorted(set(losses) - {r["method"] for r in rows if r["stage"] == "after"})
    if missing_methods:
        logger.warning("Methods without test generations (no chrF/ROUGE-L): %s", missing_methods)
        for method in missing_methods:
            loss = losses[method]
            rows.append({"method": method, "stage": "after", "eval_loss": loss,
                         "perplexity": math.exp(loss) if math.isfinite(loss) else float("nan")})
    return pd.DataFrame(rows).reindex(columns=CHAT_METRIC_COLUMNS)
