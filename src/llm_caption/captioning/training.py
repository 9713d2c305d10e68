"""Training loop for the caption decoders on cached feature grids.

Teacher forcing with label-smoothed cross-entropy (``<pad>`` ignored), AdamW, ReduceLROnPlateau
on the validation loss, gradient clipping, early stopping on validation BLEU-4 (greedy), with the
epoch loop, checkpoints and resume of :mod:`.epochs`: the batch order of epoch ``e`` comes from a
generator seeded with ``(seed, e)``, so a resumed run ends with the same weights and metrics as an
uninterrupted one. A :class:`.encoder_top.TopCaptioner` (decoder plus a trainable encoder top over
cached cut activations) trains here too, on batches that keep each image's captions together.

Under ``torchrun`` (more than one process) the model is wrapped in ``DistributedDataParallel`` and a
``DistributedSampler`` gives each rank every ``world_size``-th caption of the epoch's one-process order,
so one step of ``world_size`` ranks at ``batch_size`` sees the captions of one step of one process at
``world_size * batch_size``; each rank's loss is weighted by its share of the step's target tokens, so
the averaged gradient is the one-process gradient (up to rounding). Validation runs on every rank (same
weights, same figures, same early-stopping decisions); rank 0 alone writes checkpoints and calls
``on_epoch_end``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from .. import distributed
from ..common import effective_precision
from ..limits import config_values
from .decoding import decode_batched, ids_to_words
from .encoder_top import image_grouped_order, param_groups
from .epochs import epoch_generator, read_checkpoint, run_epochs, save_atomic  # noqa: F401 (read/save re-exported)
from .models import caption_loss

logger = logging.getLogger(__name__)


PRECISIONS = {"fp32", "bf16"}
LR_SCHEDULES = {"plateau", "cosine"}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one captioner (the ``training`` block of the parameters)."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-4
    top_lr: float | None = None  # learning rate of a trainable encoder top (TopCaptioner); None: lr
    top_captions_per_image: int | None = None  # TopCaptioner batches: an image's captions in runs of at most this
                                               # many (None: all together, the fewest top passes)
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    grad_clip: float = 5.0
    patience: int = 4
    min_delta: float = 0.0
    lr_factor: float = 0.5
    lr_patience: int = 1
    lr_schedule: str = "plateau"  # "cosine": from lr down to lr * min_lr_ratio over every step of `epochs`
    min_lr_ratio: float = 0.0
    max_decode_len: int = 30
    eval_batch_size: int = 256
    val_bleu_images: int | None = None
    precision: str = "fp32"   # "bf16": matmuls under CPU autocast (weights and optimizer stay fp32)
    seed: int = 42

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"training.precision: '{self.precision}' is not one of {sorted(PRECISIONS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"training.lr_schedule: '{self.lr_schedule}' is not one of {sorted(LR_SCHEDULES)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"training.min_lr_ratio: {self.min_lr_ratio} is not between 0 and 1")

    def autocast(self):
        """The autocast context of this precision (a no-op for fp32)."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @classmethod
    def from_params(cls, params: Mapping[str, Any], seed: int | None = None) -> "TrainConfig":
        """Config from parameters; unknown keys are an error."""
        values = config_values(cls, params, "training parameters")
        if "precision" in values:
            values["precision"] = effective_precision(str(values["precision"]), "caption training")
        if seed is not None and "seed" not in values:
            values["seed"] = int(seed)
        return cls(**values)


@dataclass
class CaptionSplit:
    """Captions of one split: the feature row of each caption's image and its token ids ``[M, L]``."""

    image_rows: torch.Tensor
    tokens: torch.Tensor


@dataclass
class CaptionData:
    """Everything a decoder trains on: the feature cache and the captions that point into it."""

    features: torch.Tensor  # [N, views, P, C] float16
    train: CaptionSplit
    val: CaptionSplit
    val_image_rows: torch.Tensor  # unique feature rows of the validation images
    val_references: list[list[str]]  # cleaned references per validation image
    itos: list[str]
    key: str = ""  # identifies the feature cache entry and the captions (part of the resume fingerprint)


def history_seconds(history: list[dict[str, float]]) -> float:
    """Seconds of the epochs in ``history`` (restored from checkpoints or run now): a model's training time
    whether or not its run was resumed (a rerun of a finished model reports its training, not the rerun's 0 s)."""
    return float(sum(float(h.get("epoch_time_s", 0.0)) for h in history))


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_val_bleu4: float
    epochs_run: int
    resumed_from_epoch: int
    train_time_s: float  # seconds of every epoch in ``history``: a resumed run counts those before the resume too
    best_checkpoint: str
    last_checkpoint: str
    extra: dict[str, Any] = field(default_factory=dict)


def bleu4(references: list[list[str]], hypotheses: list[str]) -> float:
    """Corpus BLEU-4 (coco-caption implementation, from the evaluation package) of one hypothesis per image."""
    from llm_caption.evaluation.caption_metrics import CocoBleuScorer

    if not hypotheses:
        return 0.0
    gts = {str(i): list(refs) for i, refs in enumerate(references)}
    res = {str(i): hyp for i, hyp in enumerate(hypotheses)}
    return float(CocoBleuScorer().score(gts, res).corpus["bleu_4"])


def cosine_factor(step: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """The multiplier of the base learning rate after ``step`` of ``total_steps`` optimizer steps: half a cosine
    from 1 down to ``min_ratio`` (held there past the last step)."""
    progress = min(1.0, step / max(1, total_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _fingerprint(model: nn.Module, data: CaptionData, cfg: TrainConfig) -> str:
    payload = {"model": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
               "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
               "features": list(data.features.shape), "train": list(data.train.tokens.shape),
               "val": list(data.val.tokens.shape), "data_key": data.key, "config": dataclasses.asdict(cfg)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _batch(data: CaptionData, split: CaptionSplit, idx: torch.Tensor, views: torch.Tensor | None,
           per_image: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(features, tokens, image_index)`` of the captions ``idx``. Per caption (``views`` per caption) by default;
    with ``per_image`` one feature row per distinct image (``views`` per feature row) and ``image_index`` mapping
    each caption to its image's row."""
    rows = split.image_rows[idx]
    tokens = split.tokens[idx]
    tokens = tokens[:, : int((tokens != 0).sum(dim=1).max())]
    if not per_image:
        view = views[idx] if views is not None else torch.zeros_like(rows)
        return data.features[rows, view].float(), tokens, None
    images, image_index = torch.unique(rows, return_inverse=True)
    view = views[images] if views is not None else torch.zeros_like(images)
    return data.features[images, view].float(), tokens, image_index


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: CaptionData, split: CaptionSplit, cfg: TrainConfig) -> float:
    """Mean teacher-forced loss (same objective as training) over a split, in eval mode."""
    model.eval()
    total, batches = 0.0, 0
    order = torch.arange(split.tokens.shape[0])
    for lo in range(0, len(order), cfg.eval_batch_size):
        feats, tokens, image_index = _batch(data, split, order[lo: lo + cfg.eval_batch_size], None,
                                            bool(getattr(model, "per_image", False)))
        with cfg.autocast():
            total += float(caption_loss(model, feats, tokens, cfg.label_smoothing, image_index))
        batches += 1
    return total / max(1, batches)


def greedy_captions(model: nn.Module, features: torch.Tensor, rows: torch.Tensor, itos: list[str],
                    cfg: TrainConfig) -> list[str]:
    """Greedy captions (view 0) of the feature rows ``rows``."""
    decoded = decode_batched(model, features[rows, 0], cfg.eval_batch_size, beam_size=1, max_len=cfg.max_decode_len)
    return [" ".join(ids_to_words(t, itos)) for t in decoded.tokens]



class EpochOrderSampler(DistributedSampler):
    """A ``DistributedSampler`` over the training captions whose epoch order is the one-process order: rank
    ``r`` takes every ``num_replicas``-th index of it from ``r`` (padded by repetition to a multiple of
    ``num_replicas``, as ``DistributedSampler`` does). :meth:`set_order` gives it the epoch's order."""

    def __init__(self, n_items: int, num_replicas: int, rank: int, seed: int = 0) -> None:
        super().__init__(range(n_items), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=False)
        self.order = torch.arange(n_items)

    def set_order(self, order: torch.Tensor) -> None:
        self.order = order

    def __iter__(self):
        order = self.order.tolist()
        order += order[: self.total_size - len(order)]
        return iter(order[self.rank: self.total_size: self.num_replicas])


class _DataParallel(DistributedDataParallel):
    """DDP that answers for its module's attributes (``pad_id``, ``aux_loss``), as ``caption_loss`` asks for them."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def _distributed_step(model: nn.Module, feats: torch.Tensor, tokens: torch.Tensor, cfg: TrainConfig,
                      world: int, image_index: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """One rank's loss, scaled so that DDP's gradient average is the gradient of the step's token mean over all
    ranks; returns (the loss to back-propagate, that token mean)."""
    import torch.distributed as dist

    with cfg.autocast():
        loss = caption_loss(model, feats, tokens, cfg.label_smoothing, image_index)
    n_local = (tokens[:, 1:] != model.pad_id).sum().to(torch.float64)
    totals = torch.stack([n_local, loss.detach().to(torch.float64) * n_local])
    dist.all_reduce(totals)
    return loss * (n_local * world / totals[0]).to(loss.dtype), float(totals[1] / totals[0])


def _val_figures(model: nn.Module, data: CaptionData, cfg: TrainConfig, rows: torch.Tensor,
                 refs: list[list[str]]) -> tuple[dict[str, float], list[str]]:
    """Greedy captions of the validation rows ``rows``: their BLEU-4 and CIDEr-D (coco-caption's)."""
    from llm_caption.evaluation.caption_metrics import CiderDScorer

    hyps = greedy_captions(model, data.features, rows, data.itos, cfg)
    gts = {str(i): list(r) for i, r in enumerate(refs)}
    res = {str(i): h for i, h in enumerate(hyps)}
    cider = CiderDScorer().score(gts, res).corpus["cider_d"] if hyps else 0.0
    return {"val_bleu4": bleu4(refs, hyps), "val_cider_d": float(cider)}, hyps


def train_captioner(model: nn.Module, data: CaptionData, cfg: TrainConfig, checkpoint_dir: str | Path,
                    name: str = "captioner", resume: bool = True,
                    on_epoch_end: Callable[[int, dict[str, float], str | None], None] | None = None) -> TrainResult:
    """Train ``model`` on ``data``; checkpoints in ``checkpoint_dir``.

    ``on_epoch_end(epoch, record, sample)`` is called after every epoch with its history record and a
    sample caption, and once per epoch restored from a checkpoint (``sample`` ``None``): that is where a
    caller logs to MLflow (:func:`llm_caption.tracking.epoch_logger`). Returns the history and the best
    checkpoint; ``model`` holds the best weights afterwards.

    A model with ``per_image`` set (:class:`.encoder_top.TopCaptioner`, whose encoder top runs once per image
    of a batch) trains on batches that hold each image's captions together, and its top at ``cfg.top_lr``.
    """
    fingerprint = _fingerprint(model, data, cfg)
    world = distributed.world_size() if distributed.ensure_process_group() else 1
    main = distributed.is_main_process()
    per_image = bool(getattr(model, "per_image", False))

    n_train = data.train.tokens.shape[0]
    sampler = EpochOrderSampler(n_train, world, distributed.rank(), cfg.seed) if world > 1 else None
    per_rank = len(sampler) if sampler is not None else n_train  # captions per rank and epoch
    total_steps = cfg.epochs * -(-per_rank // cfg.batch_size)

    def make_optim() -> tuple[torch.optim.Optimizer, Any]:
        optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.top_lr, cfg.weight_decay), lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        if cfg.lr_schedule == "cosine":
            return optimizer, torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: cosine_factor(step, total_steps, cfg.min_lr_ratio))
        return optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.lr_factor,
                                                                     patience=cfg.lr_patience)

    n_views = data.features.shape[1]
    bleu_rows = data.val_image_rows[: cfg.val_bleu_images] if cfg.val_bleu_images else data.val_image_rows
    bleu_refs = data.val_references[: len(bleu_rows)]
    trained = _DataParallel(model) if world > 1 else model

    def run_epoch(epoch: int, optimizer: torch.optim.Optimizer, scheduler: Any):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]  # the epoch's (first step's) learning rate
        model.train()
        gen = epoch_generator(cfg.seed, epoch)
        order = torch.randperm(n_train, generator=gen)
        if per_image:
            order = image_grouped_order(order, data.train.image_rows, gen, cfg.top_captions_per_image)
            views = torch.randint(n_views, (data.features.shape[0],), generator=gen) if n_views > 1 else None
        else:
            views = torch.randint(n_views, (n_train,), generator=gen) if n_views > 1 else None
        total, steps = 0.0, 0
        if sampler is not None:
            sampler.set_epoch(epoch)
            sampler.set_order(order)
            order = torch.tensor(list(sampler), dtype=torch.long)
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"{name} epoch {epoch}", unit="batch", leave=False,
                   disable=not main)
        for lo in bar:
            feats, tokens, image_index = _batch(data, data.train, order[lo: lo + cfg.batch_size], views, per_image)
            if sampler is None:
                with cfg.autocast():
                    loss = caption_loss(model, feats, tokens, cfg.label_smoothing, image_index)
                step_loss = None
            else:
                loss, step_loss = _distributed_step(trained, feats, tokens, cfg, world, image_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if cfg.lr_schedule == "cosine":
                scheduler.step()
            total += float(loss.detach()) if step_loss is None else step_loss
            steps += 1
        train_time = time.perf_counter() - t0
        val_loss = evaluate_loss(model, data, data.val, cfg)
        figures, hyps = _val_figures(model, data, cfg, bleu_rows, bleu_refs)
        if cfg.lr_schedule == "plateau":
            scheduler.step(val_loss)
        record = {"epoch": epoch, "train_loss": total / max(1, steps), "val_loss": val_loss, **figures, "lr": lr,
                  "epoch_time_s": time.perf_counter() - t0, "train_epoch_time_s": train_time}
        return record, hyps

    loop = run_epochs(model, make_optim, run_epoch, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint,
                      name=name, seed=cfg.seed, first_epoch=1, last_epoch=cfg.epochs, select_by="val_bleu4",
                      patience=cfg.patience, min_delta=cfg.min_delta, resume=resume,
                      reference=bleu_refs[0][0] if bleu_refs else "", on_epoch_end=on_epoch_end,
                      describe=lambda r: (f"train {r['train_loss']:.4f} val {r['val_loss']:.4f} BLEU-4 "
                                          f"{r['val_bleu4']:.4f} CIDEr-D {r['val_cider_d']:.4f} lr {r['lr']:.2e}"))
    history = loop.history
    return TrainResult(history=history, best_epoch=loop.best_epoch, best_val_bleu4=loop.best if history else 0.0,
                       epochs_run=len(history), resumed_from_epoch=loop.resumed_after or 0,
                       train_time_s=history_seconds(history), best_checkpoint=str(loop.best_path),
                       last_checkpoint=str(loop.last_path))
