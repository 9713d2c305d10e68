"""Self-critical sequence training (SCST) of a caption decoder on CIDEr-D, from its cross-entropy weights.

Rennie et al. (2017), with the mean-of-samples baseline of Luo (2020). For each training image the
decoder draws ``samples`` captions (multinomial, one token at a time, on the cached feature grid);
each earns its CIDEr-D against that image's training references; a sample's baseline is the mean
reward of the image's *other* samples (``baseline: mean``) or the reward of the image's greedy caption
(``baseline: greedy``); the loss is ``-(reward - baseline) * log p(token)`` averaged over the sampled
tokens, ``<eos>`` included (so the decoder also learns where to stop). Sampling runs the decoder in
eval mode: the policy trained is the one that decodes at test time.

Rewards come from :class:`CiderD`: CIDEr-D with document frequencies computed once from the training
references and n-grams counted with numpy over whole batches; on the same references it equals
``pycocoevalcap``'s CIDEr-D (tested to 1e-6). With ``reward_eos`` every caption, sampled or reference,
ends in an end word for the reward, so "... playing in a <eos>" no longer earns the n-grams of "... playing
in a pool": CIDEr-D alone does not see where a caption stops, and policies trained on it learn to cut
captions short after a function word (the "bad endings"; the end word is the practice of Luo's
self-critical.pytorch).

Every epoch ends with greedy captions of the validation images: BLEU-4 (the figure the registry ranks
on), CIDEr-D, and caption diversity (distinct captions per image, words used), since SCST is known to
narrow the vocabulary. Epoch 0 is the starting point, measured the same way, so the best epoch is
never worse than the cross-entropy model on the validation images. Checkpoints, resume after a kill
and the best-weights export are those of :mod:`.training`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..common import effective_precision
from ..limits import config_values
from .decoding import EOS, PAD, SOS, decode_batched, greedy_decode, ids_to_words
from .models import caption_loss
from .encoder_top import decoder_and_grid, param_groups
from .epochs import epoch_generator, run_epochs
from .training import CaptionData, TrainConfig, TrainResult, bleu4, evaluate_loss, history_seconds

logger = logging.getLogger(__name__)

BASELINES = ("mean", "greedy")
EOS_WORD = "<eos>"  # the end word of ``reward_eos``: a caption word never equals it
SELECT_METRICS = ("val_bleu4", "val_cider_d")


# ------------------------------------------------------------------------------------------------
# CIDEr-D
# ------------------------------------------------------------------------------------------------

_BASE = 1 << 15  # word ids + 1 are digits of this base in an n-gram key: four digits fit in int64


class CiderD:
    """CIDEr-D (Vedantam et al., 2015; coco-caption's variant: clipped tf-idf, Gaussian length penalty, x10) of
    hypotheses against the references of one image each, with document frequencies fixed at construction.

    ``references[i]`` are the reference captions (whitespace-tokenised strings) of image ``i``. Scoring a
    hypothesis for image ``i`` uses those references and the document frequencies of the whole set, as
    ``pycocoevalcap.cider.Cider`` does when it scores that same set (its "length" is the number of
    bigrams, kept here so the figures agree).

    ``end_word`` (e.g. ``"<eos>"``): appended to every reference and every hypothesis, so the score sees
    where a caption ends (not part of coco-caption's CIDEr-D; for SCST rewards).
    """

    def __init__(self, references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0,
                 end_word: str | None = None) -> None:
        if not references:
            raise ValueError("CiderD needs the references of at least one image")
        self.n, self.sigma = int(n), float(sigma)
        self.end_word = end_word
        if not 1 <= self.n <= 4:
            raise ValueError(f"CiderD: n-gram order {n} is not from 1 to 4")
        self.words: dict[str, int] = {}
        n_refs = np.array([len(refs) for refs in references], dtype=np.int64)
        if (n_refs == 0).any():
            raise ValueError(f"CiderD: image {int(np.flatnonzero(n_refs == 0)[0])} has no reference caption")
        self.n_images = len(references)
        self.ref_len = math.log(float(self.n_images))
        self.n_refs = n_refs
        self.ref_start = np.concatenate([[0], np.cumsum(n_refs)[:-1]])
        tail = [end_word] if end_word else []
        ref_ids = [self.encode(ref.split() + tail) for refs in references for ref in refs]
        image_of_ref = np.repeat(np.arange(self.n_images), n_refs)
        rows, keys, orders = self._ngrams(ref_ids)
        # document frequency: images whose references hold the n-gram
        image_keys = np.unique(np.stack([image_of_ref[rows], keys]), axis=1)
        self.keys, df = np.unique(image_keys[1], return_counts=True)
        self.log_df = np.log(np.maximum(1.0, df.astype(np.float64)))
        # reference vectors: tf-idf per (reference, n-gram), their norms per order and lengths
        pairs, tf = np.unique(np.stack([rows, keys]), axis=1, return_counts=True)
        cols = np.searchsorted(self.keys, pairs[1])
        values = tf * (self.ref_len - self.log_df[cols])
        pair_orders = self._order_of(pairs[1])
        n_total = len(ref_ids)
        self.ref_norm = np.sqrt(np.bincount(pairs[0] * self.n + pair_orders, weights=values ** 2,
                                            minlength=n_total * self.n).reshape(n_total, self.n))
        self.ref_length = np.array([max(len(r) - 1, 0) for r in ref_ids], dtype=np.float64)
        table = pairs[0] * len(self.keys) + cols
        order = np.argsort(table)
        self.table, self.table_values = table[order], values[order]
        self._vocab_map: np.ndarray | None = None

    # -- tokens ---------------------------------------------------------------------------------
    def encode(self, words: Sequence[str]) -> list[int]:
        """Word ids (new words get new ids: a word no reference has never matches one)."""
        out = []
        for w in words:
            i = self.words.get(w)
            if i is None:
                i = self.words[w] = len(self.words)
                if i >= _BASE - 1:
                    raise ValueError(f"CiderD: more than {_BASE - 2} distinct words")
            out.append(i)
        return out

    def use_vocabulary(self, itos: Sequence[str]) -> "CiderD":
        """Map a caption vocabulary's token ids to word ids once, for :meth:`score_tokens`."""
        self._vocab_map = np.array(self.encode(list(itos)), dtype=np.int64)
        return self

    def _order_of(self, keys: np.ndarray) -> np.ndarray:
        order = np.zeros(keys.shape, dtype=np.int64)
        for k in range(1, self.n):
            order += keys >= _BASE ** k
        return order

    def _ngrams(self, sentences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(sentence index, n-gram key, order - 1)`` of every n-gram occurrence, orders 1..n."""
        length = max((len(s) for s in sentences), default=0)
        if length == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        ids = np.full((len(sentences), length), -1, dtype=np.int64)
        for i, s in enumerate(sentences):
            ids[i, : len(s)] = s
        rows, keys, orders = [], [], []
        for k in range(1, self.n + 1):
            if k > length:
                break
            windows = np.stack([ids[:, j: length - k + 1 + j] for j in range(k)], axis=2)  # [S, W, k]
            valid = (windows >= 0).all(axis=2)
            key = np.zeros(windows.shape[:2], dtype=np.int64)
            for j in range(k):
                key = key * _BASE + windows[:, :, j] + 1
            r, c = np.nonzero(valid)
            rows.append(r)
            keys.append(key[r, c])
            orders.append(np.full(len(r), k - 1, dtype=np.int64))
        return np.concatenate(rows), np.concatenate(keys), np.concatenate(orders)

    # -- scores ---------------------------------------------------------------------------------
    def score_words(self, hypotheses: Sequence[Sequence[int]], images: Sequence[int] | np.ndarray) -> np.ndarray:
        """CIDEr-D of each hypothesis (word ids, see :meth:`encode`) against the references of ``images[i]``."""
        images = np.asarray(images, dtype=np.int64)
        if self.end_word:
            end = self.encode([self.end_word])
            hypotheses = [list(h) + end for h in hypotheses]
        n_hyp = len(hypotheses)
        if images.shape != (n_hyp,):
            raise ValueError(f"CiderD: {n_hyp} hypotheses but {images.shape} image indices")
        if n_hyp == 0:
            return np.zeros(0)
        if images.min() < 0 or images.max() >= self.n_images:
            raise ValueError(f"CiderD: image index outside 0..{self.n_images - 1}")
        rows, keys, _ = self._ngrams(hypotheses)
        pairs, tf = np.unique(np.stack([rows, keys]), axis=1, return_counts=True)
        h, key = pairs[0], pairs[1]
        order = self._order_of(key)
        cols = np.minimum(np.searchsorted(self.keys, key), max(len(self.keys) - 1, 0))
        found = self.keys[cols] == key if len(self.keys) else np.zeros(len(key), dtype=bool)
        vec = tf * (self.ref_len - np.where(found, self.log_df[cols], 0.0))
        hyp_norm = np.sqrt(np.bincount(h * self.n + order, weights=vec ** 2,
                                       minlength=n_hyp * self.n).reshape(n_hyp, self.n))
        hyp_length = np.array([max(len(s) - 1, 0) for s in hypotheses], dtype=np.float64)
        # every (hypothesis, reference of its image) pair
        per_hyp = self.n_refs[images]
        pair_start = np.concatenate([[0], np.cumsum(per_hyp)[:-1]])
        n_pairs = int(per_hyp.sum())
        pair_hyp = np.repeat(np.arange(n_hyp), per_hyp)
        pair_ref = self.ref_start[images][pair_hyp] + (np.arange(n_pairs) - pair_start[pair_hyp])
        # clipped dot products: only n-grams some reference has can meet one of this image's references
        e = np.flatnonzero(found)
        counts = per_hyp[h[e]]
        rep = np.repeat(e, counts)
        local = np.arange(len(rep)) - np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        e_pair = pair_start[h[rep]] + local
        lookup = pair_ref[e_pair] * len(self.keys) + cols[rep]
        ref_vec = np.zeros(len(lookup))
        if len(self.table):
            pos = np.minimum(np.searchsorted(self.table, lookup), len(self.table) - 1)
            ref_vec = np.where(self.table[pos] == lookup, self.table_values[pos], 0.0)
        dot = np.bincount(e_pair * self.n + order[rep], weights=np.minimum(vec[rep], ref_vec) * ref_vec,
                          minlength=n_pairs * self.n).reshape(n_pairs, self.n)
        denom = hyp_norm[pair_hyp] * self.ref_norm[pair_ref]
        sim = np.where(denom != 0, dot / np.where(denom != 0, denom, 1.0), dot)
        delta = hyp_length[pair_hyp] - self.ref_length[pair_ref]
        sim = sim * np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[:, None]
        return np.bincount(pair_hyp, weights=sim.mean(axis=1), minlength=n_hyp) / per_hyp * 10.0

    def score_captions(self, captions: Sequence[str], images: Sequence[int] | np.ndarray) -> np.ndarray:
        """CIDEr-D of whitespace-tokenised caption strings."""
        return self.score_words([self.encode(c.split()) for c in captions], images)

    def score_tokens(self, tokens: Sequence[Sequence[int]], images: Sequence[int] | np.ndarray) -> np.ndarray:
        """CIDEr-D of decoded token ids (vocabulary ids, cut at ``<eos>``, ``<pad>``/``<sos>`` dropped)."""
        if self._vocab_map is None:
            raise ValueError("CiderD.score_tokens needs use_vocabulary(itos) first")
        words = []
        for ids in tokens:
            kept = []
            for i in ids:
                if i == EOS:
                    break
                if i not in (PAD, SOS):
                    kept.append(int(self._vocab_map[i]))
            words.append(kept)
        return self.score_words(words, images)


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScstConfig:
    """Settings of the SCST stage (the ``scst`` block of the caption parameters, without ``enabled`` and
    ``architecture``)."""

    epochs: int = 3
    batch_images: int = 50       # training images per step; each gets ``samples`` sampled captions
    samples: int = 5             # k sampled captions per image
    baseline: str = "mean"       # "mean": the mean reward of the image's other samples; "greedy": its greedy caption's
    lr: float = 5e-5
    top_lr: float | None = None  # learning rate of a trainable encoder top (TopCaptioner); None: lr
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    max_len: int = 22            # the most tokens a sampled caption may have (``<eos>`` included)
    reward_eos: bool = False     # CIDEr-D reward with an end word on every caption (penalises cut-off endings)
    sample_dropout: bool = False  # sample and follow the gradient with the decoder's dropout on (train mode)
    xe_weight: float = 0.0       # mixed objective: + xe_weight x the teacher-forced cross-entropy of one training
                                 # caption of every step image (0: policy gradient alone)
    patience: int = 2            # epochs without a validation gain before stopping
    lr_factor: float = 0.5       # learning rate x factor when validation CIDEr-D stalls for lr_patience epochs
    lr_patience: int = 1
    select_by: str = "val_bleu4"  # the figure that picks the best epoch (the registry ranks on val BLEU-4)
    val_images: int | None = None  # the first N validation images (None: all)
    eval_batch_size: int = 256
    label_smoothing: float = 0.1  # only for the reported teacher-forced validation loss
    precision: str = "fp32"
    seed: int = 42

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ValueError(f"scst.baseline: '{self.baseline}' is not one of {list(BASELINES)}")
        if self.select_by not in SELECT_METRICS:
            raise ValueError(f"scst.select_by: '{self.select_by}' is not one of {list(SELECT_METRICS)}")
        if self.samples < 2 and self.baseline == "mean":
            raise ValueError("scst.samples must be at least 2 with the mean-of-samples baseline")
        for name in ("epochs", "batch_images", "samples", "max_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"scst.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (math.isfinite(float(self.xe_weight)) and float(self.xe_weight) >= 0):
            raise ValueError(f"scst.xe_weight must be a finite number >= 0, got {self.xe_weight!r}")

    def eval_config(self) -> TrainConfig:
        """The training settings that validation shares with cross-entropy training."""
        return TrainConfig(eval_batch_size=self.eval_batch_size, label_smoothing=self.label_smoothing,
                           max_decode_len=self.max_len, precision=self.precision, seed=self.seed)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], seed: int | None = None) -> "ScstConfig":
        values = config_values(cls, {k: v for k, v in params.items() if k not in ("enabled", "architecture")},
                               "scst parameters")
        if "precision" in values:
            values["precision"] = effective_precision(str(values["precision"]), "SCST")
        if seed is not None and "seed" not in values:
            values["seed"] = int(seed)
        return cls(**values)


# ------------------------------------------------------------------------------------------------
# Sampling and one step
# ------------------------------------------------------------------------------------------------

def sample_captions(model: nn.Module, feats: torch.Tensor, samples: int, max_len: int,
                    generator: torch.Generator, autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``samples`` multinomial captions per image of ``feats`` ``[B, P, C]`` (rows ``b * samples + j``).

    Returns ``(tokens [B*k, T], log_probs [B*k, T], mask [B*k, T])``: the sampled ids (``<pad>`` after
    ``<eos>``), the log-probability of each (with gradient) and which positions were sampled (``<eos>``
    included).
    """
    rows = feats.shape[0] * samples
    with autocast:
        state = model.init_state(feats.repeat_interleave(samples, dim=0))
    prev = torch.full((rows,), SOS, dtype=torch.long)
    done = torch.zeros(rows, dtype=torch.bool)
    tokens, log_probs, masks = [], [], []
    for _ in range(max_len):
        with autocast:
            logits, state, _ = model.step(state, prev)
        logp = torch.log_softmax(logits.float(), dim=-1)
        token = torch.multinomial(logp.detach().exp(), 1, generator=generator).squeeze(1)
        token = token.masked_fill(done, PAD)
        masks.append(~done)
        log_probs.append(logp.gather(1, token.unsqueeze(1)).squeeze(1))
        tokens.append(token)
        done = done | (token == EOS)
        prev = token
        if bool(done.all()):
            break
    return torch.stack(tokens, 1), torch.stack(log_probs, 1), torch.stack(masks, 1)


def _cut(row: list[int]) -> list[int]:
    return row[: row.index(EOS)] if EOS in row else row


def scst_step(model: nn.Module, feats: torch.Tensor, images: np.ndarray, cider: CiderD, cfg: ScstConfig,
              generator: torch.Generator, optimizer: torch.optim.Optimizer,
              xe_tokens: torch.Tensor | None = None) -> dict[str, float]:
    """One policy-gradient step on the images ``images`` (indices into ``cider``'s references) with grids
    ``feats``; returns the step's loss, mean sample reward and mean greedy reward.

    ``xe_tokens`` (``[B, L]``, one training caption per image, ``<sos> ... <eos> <pad>...``): with
    ``cfg.xe_weight > 0`` their teacher-forced cross-entropy, times ``xe_weight``, is added to the loss.
    """
    k = cfg.samples
    decoder, grid = decoder_and_grid(model, feats)  # a TopCaptioner's top (always in eval mode): once per image
    greedy = greedy_decode(decoder, grid.detach(), cfg.max_len)  # eval mode, no gradient
    greedy_reward = cider.score_tokens(greedy.tokens, images)
    model.train(cfg.sample_dropout)  # default: sample the test-time policy (no dropout)
    tokens, log_probs, mask = sample_captions(decoder, grid, k, cfg.max_len, generator,
                                              cfg.eval_config().autocast())
    reward = cider.score_tokens([_cut(r) for r in tokens.tolist()], np.repeat(images, k))
    reward_t = torch.from_numpy(reward).float().view(-1, k)
    if cfg.baseline == "mean":
        baseline = (reward_t.sum(dim=1, keepdim=True) - reward_t) / (k - 1)
    else:
        baseline = torch.from_numpy(greedy_reward).float().unsqueeze(1).expand(-1, k)
    advantage = (reward_t - baseline).reshape(-1, 1)
    maskf = mask.float()
    loss = -(advantage * log_probs * maskf).sum() / maskf.sum().clamp(min=1.0)
    xe = None
    if cfg.xe_weight > 0:
        if xe_tokens is None:
            raise ValueError("scst_step: xe_weight > 0 needs one training caption per image (xe_tokens)")
        with cfg.eval_config().autocast():
            xe = caption_loss(decoder, grid, xe_tokens, cfg.label_smoothing).float()
        loss = loss + cfg.xe_weight * xe
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return {"loss": float(loss.detach()), "sample_reward": float(reward.mean()),
            "greedy_reward": float(greedy_reward.mean()), "xe_loss": float("nan") if xe is None else float(xe.detach())}


# ------------------------------------------------------------------------------------------------
# Validation and the training loop
# ------------------------------------------------------------------------------------------------

def diversity(captions: Sequence[str]) -> dict[str, float]:
    """Distinct captions per image and the number of distinct words used."""
    if not captions:
        return {"distinct_captions": 0.0, "vocab_used": 0.0}
    return {"distinct_captions": len(set(captions)) / len(captions),
            "vocab_used": float(len({w for c in captions for w in c.split()}))}


def validate(model: nn.Module, data: CaptionData, cfg: ScstConfig) -> tuple[dict[str, float], list[str]]:
    """Greedy captions of the validation images: BLEU-4, CIDEr-D (coco-caption's, document frequencies from
    these references), diversity, and the teacher-forced validation loss."""
    from llm_caption.evaluation.caption_metrics import CiderDScorer

    rows = data.val_image_rows[: cfg.val_images] if cfg.val_images else data.val_image_rows
    refs = data.val_references[: len(rows)]
    decoded = decode_batched(model, data.features[rows, 0], cfg.eval_batch_size, beam_size=1, max_len=cfg.max_len)
    hyps = [" ".join(ids_to_words(t, data.itos)) for t in decoded.tokens]
    gts = {str(i): list(r) for i, r in enumerate(refs)}
    res = {str(i): h for i, h in enumerate(hyps)}
    figures = {"val_bleu4": bleu4(refs, hyps), "val_cider_d": CiderDScorer().score(gts, res).corpus["cider_d"],
               "val_loss": evaluate_loss(model, data, data.val, cfg.eval_config())}
    figures.update({f"val_{k}": v for k, v in diversity(hyps).items()})
    return figures, hyps


def _fingerprint(model: nn.Module, data: CaptionData, cfg: ScstConfig, start: Mapping[str, torch.Tensor],
                 n_images: int) -> str:
    digest = hashlib.sha256()
    for name in sorted(start):
        digest.update(name.encode())
        digest.update(start[name].detach().float().numpy().tobytes())
    payload = {"model": type(model).__name__, "start": digest.hexdigest(), "data_key": data.key,
               "features": list(data.features.shape), "train_images": n_images, "config": dataclasses.asdict(cfg),
               "stage": "scst"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _captions_per_image(data: CaptionData, train_rows: torch.Tensor) -> list[list[int]]:
    """The indices into ``data.train`` of every training image's captions (for the mixed objective)."""
    by_row: dict[int, list[int]] = {}
    for j, row in enumerate(data.train.image_rows.tolist()):
        by_row.setdefault(int(row), []).append(j)
    out = [by_row.get(int(row), []) for row in train_rows.tolist()]
    missing = [i for i, c in enumerate(out) if not c]
    if missing:
        raise ValueError(f"scst.xe_weight: training image {missing[0]} (feature row {int(train_rows[missing[0]])}) "
                         f"has no training caption ({len(missing)} images without one)")
    return out


def train_scst(model: nn.Module, data: CaptionData, train_rows: torch.Tensor, train_references: Sequence[Sequence[str]],
               cfg: ScstConfig, checkpoint_dir: str | Path, name: str = "scst", resume: bool = True,
               on_epoch_end: Callable[[int, dict[str, float], str | None], None] | None = None) -> TrainResult:
    """SCST of ``model`` (holding its cross-entropy weights) on the training images ``train_rows`` (feature
    rows) with references ``train_references``; checkpoints in ``checkpoint_dir``.

    Epoch 0 is the starting point, measured like every epoch; the best epoch by ``cfg.select_by`` is
    exported to ``best.pt`` and left in ``model``. ``on_epoch_end`` is called as in
    :func:`.training.train_captioner`. Runs in one process (under ``torchrun`` every rank would repeat it).
    """
    if len(train_rows) != len(train_references):
        raise ValueError(f"train_scst: {len(train_rows)} training images but {len(train_references)} reference lists")
    cider = CiderD(train_references, end_word=EOS_WORD if cfg.reward_eos else None).use_vocabulary(data.itos)
    start_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fingerprint = _fingerprint(model, data, cfg, start_weights, len(train_rows))
    main = distributed.is_main_process()

    def make_optim():
        optimizer = torch.optim.Adam(param_groups(model, cfg.lr, cfg.top_lr, cfg.weight_decay), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        return optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.lr_factor,
                                                                     patience=cfg.lr_patience)

    n_images = len(train_rows)
    captions_of = _captions_per_image(data, train_rows) if cfg.xe_weight > 0 else None

    def run_epoch(epoch: int, optimizer: torch.optim.Optimizer, scheduler: Any):
        t0 = time.perf_counter()
        if epoch == 0:  # the starting point, measured like every epoch
            figures, hyps = validate(model, data, cfg)
            greedy = decode_batched(model, data.features[train_rows, 0], cfg.eval_batch_size, 1, cfg.max_len)
            start_reward = float(cider.score_tokens(greedy.tokens, np.arange(n_images)).mean())
            return {"epoch": 0, "train_loss": float("nan"), **figures, "sample_reward": float("nan"),
                    "greedy_reward": start_reward, "lr": cfg.lr, "epoch_time_s": time.perf_counter() - t0,
                    "train_epoch_time_s": 0.0}, hyps
        gen = epoch_generator(cfg.seed, epoch)
        order = torch.randperm(n_images, generator=gen)
        totals = dict.fromkeys(["loss", "sample_reward", "greedy_reward"] + (["xe_loss"] if captions_of else []), 0.0)
        steps = 0
        bar = tqdm(range(0, n_images, cfg.batch_images), desc=f"{name} epoch {epoch}", unit="batch", leave=False,
                   disable=not main)
        for lo in bar:
            idx = order[lo: lo + cfg.batch_images]
            feats = data.features[train_rows[idx], 0].float()
            xe_tokens = None
            if captions_of is not None:  # one of each image's training captions, drawn after the step's order
                picks = [captions_of[i][int(torch.randint(len(captions_of[i]), (1,), generator=gen))]
                         for i in idx.tolist()]
                xe_tokens = data.train.tokens[torch.tensor(picks)]
            step = scst_step(model, feats, idx.numpy(), cider, cfg, gen, optimizer, xe_tokens)
            for key in totals:
                totals[key] += step[key]
            steps += 1
            bar.set_postfix(reward=f"{step['sample_reward']:.3f}", greedy=f"{step['greedy_reward']:.3f}")
        train_time = time.perf_counter() - t0
        figures, hyps = validate(model, data, cfg)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(figures["val_cider_d"])
        return {"epoch": epoch, "train_loss": totals["loss"] / max(1, steps), **figures,
                "sample_reward": totals["sample_reward"] / max(1, steps),
                "greedy_reward": totals["greedy_reward"] / max(1, steps),
                **({"xe_loss": totals["xe_loss"] / max(1, steps)} if "xe_loss" in totals else {}),
                "lr": lr, "epoch_time_s": time.perf_counter() - t0, "train_epoch_time_s": train_time}, hyps

    loop = run_epochs(model, make_optim, run_epoch, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint, name=name,
                      seed=cfg.seed, first_epoch=0, last_epoch=cfg.epochs, select_by=cfg.select_by,
                      patience=cfg.patience, resume=resume,
                      reference=data.val_references[0][0] if data.val_references else "", on_epoch_end=on_epoch_end,
                      describe=lambda r: (f"sample reward {r['sample_reward']:.3f} greedy reward "
                                          f"{r['greedy_reward']:.3f} | val BLEU-4 {r['val_bleu4']:.4f} CIDEr-D "
                                          f"{r['val_cider_d']:.4f} distinct {r['val_distinct_captions']:.3f} "
                                          f"words {int(r['val_vocab_used'])}"))
    history, best_epoch = loop.history, loop.best_epoch
    best_bleu = float(next(r["val_bleu4"] for r in history if int(r["epoch"]) == best_epoch))
    return TrainResult(history=history, best_epoch=best_epoch, best_val_bleu4=best_bleu, epochs_run=len(history) - 1,
                       resumed_from_epoch=-1 if loop.resumed_after is None else loop.resumed_after,
                       train_time_s=history_seconds(history), best_checkpoint=str(loop.best_path),
                       last_checkpoint=str(loop.last_path))
