"""Training loop for the caption decoders on cached feature grids.

Teacher forcing with label-smoothed cross-entropy (``<pad>`` ignored), AdamW, ReduceLROnPlateau
on the validation loss, gradient clipping, early stopping on validation BLEU-4 (greedy). Every
epoch writes ``last.pt`` (model, optimizer, scheduler, epoch, RNG states as tensors, history and
the best weights so far); the one it replaces is kept as ``previous.pt``. The best epoch by
validation BLEU-4 is also exported to ``best.pt``. A rerun with the same configuration resumes
from ``last.pt`` and ends with the same weights and metrics as an uninterrupted run: the
batch order of epoch ``e`` comes from a generator seeded with ``(seed, e)`` and the global RNG
(dropout) is restored from the checkpoint.

Checkpoints are untrusted on the way in and crash-safe on the way out: every file is written to
a temporary name and moved into place with ``os.replace``; every load uses
``torch.load(weights_only=True)`` (nothing here needs pickle); a checkpoint that cannot be read
or does not hold what a checkpoint holds is named in a warning and the previous one is tried,
then training starts from scratch.

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
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from .. import distributed
from ..common import effective_precision
from ..limits import config_values
from .decoding import decode_batched, ids_to_words
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


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def _batch(data: CaptionData, split: CaptionSplit, idx: torch.Tensor, views: torch.Tensor | None):
    rows = split.image_rows[idx]
    view = views[idx] if views is not None else torch.zeros_like(rows)
    feats = data.features[rows, view].float()
    tokens = split.tokens[idx]
    length = int((tokens != 0).sum(dim=1).max())
    return feats, tokens[:, :length]


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: CaptionData, split: CaptionSplit, cfg: TrainConfig) -> float:
    """Mean teacher-forced loss (same objective as training) over a split, in eval mode."""
    model.eval()
    total, batches = 0.0, 0
    order = torch.arange(split.tokens.shape[0])
    for lo in range(0, len(order), cfg.eval_batch_size):
        feats, tokens = _batch(data, split, order[lo: lo + cfg.eval_batch_size], None)
        with cfg.autocast():
            total += float(caption_loss(model, feats, tokens, cfg.label_smoothing))
        batches += 1
    return total / max(1, batches)


def greedy_captions(model: nn.Module, features: torch.Tensor, rows: torch.Tensor, itos: list[str],
                    cfg: TrainConfig) -> list[str]:
    """Greedy captions (view 0) of the feature rows ``rows``."""
    decoded = decode_batched(model, features[rows, 0], cfg.eval_batch_size, beam_size=1, max_len=cfg.max_decode_len)
    return [" ".join(ids_to_words(t, itos)) for t in decoded.tokens]


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "best", "best_epoch", "best_model",
                   "bad_epochs", "stopped", "fingerprint", "rng")


def _write_synced(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path``, flushed and fsynced before returning."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, flushed to disk, then ``os.replace``d onto ``path``.

    A process killed during the write leaves ``path`` as it was (only the temporary file is partial).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_synced(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """The torch, numpy and Python global RNG states as tensors and plain numbers (loadable with ``weights_only``)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss),
            "python_version": int(py_version), "python_internal": torch.tensor(py_internal, dtype=torch.int64),
            "python_gauss": py_gauss}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"]),
                         int(state["numpy_has_gauss"]), float(state["numpy_gauss"])))
    random.setstate((int(state["python_version"]), tuple(int(v) for v in state["python_internal"].tolist()),
                     state["python_gauss"]))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, loaded without pickle; ``ValueError`` naming the file when it is unreadable or partial."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle payload, I/O error: all mean "not usable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {path} cannot be read safely ({type(exc).__name__}: {reason[:300]})") from exc
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a training checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} is missing {missing}")
    return state


def _checkpoint_candidates(ckpt_dir: Path) -> list[Path]:
    return [ckpt_dir / "last.pt", ckpt_dir / "previous.pt"]


def _write_checkpoint(state: dict[str, Any], ckpt_dir: Path) -> Path:
    """Write ``last.pt``; the one it replaces becomes ``previous.pt`` (a fallback if the new one is ever damaged).

    Killed at any point, the folder keeps at least one complete checkpoint: the new one is complete on disk
    before ``last.pt`` is renamed to ``previous.pt`` and the new one to ``last.pt``.
    """
    last, previous = _checkpoint_candidates(ckpt_dir)
    tmp = last.with_name(f".{last.name}.tmp-{os.getpid()}")
    try:
        _write_synced(state, tmp)
        if last.exists():
            os.replace(last, previous)
        os.replace(tmp, last)
    finally:
        tmp.unlink(missing_ok=True)
    return last


def _remove_partial_writes(ckpt_dir: Path) -> None:
    """Delete temporary files that a killed process left behind."""
    for leftover in ckpt_dir.glob(".*.pt.tmp-*"):
        logger.info("Removing the partial write %s of an interrupted run", leftover)
        leftover.unlink(missing_ok=True)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@dataclass
class _Progress:
    """Where training stands: restored from a checkpoint or fresh."""

    history: list[dict[str, float]] = field(default_factory=list)
    best: float = float("-inf")
    best_epoch: int = 0
    best_model: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0
    stopped: bool = False
    epoch: int = 0  # last finished epoch
    source: Path | None = None


def _restore(state: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any) -> _Progress:
    """Load a checkpoint's states into the objects; raises on any mismatch."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    best_model = {k: v.clone() for k, v in state["best_model"].items()} if state["best_model"] else None
    return _Progress(history=list(state["history"]), best=float(state["best"]), best_epoch=int(state["best_epoch"]),
                     best_model=best_model, bad_epochs=int(state["bad_epochs"]), stopped=bool(state["stopped"]),
                     epoch=int(state["epoch"]))


def _resume(ckpt_dir: Path, fingerprint: str, name: str, model: nn.Module,
            make_optim: Callable[[], tuple[torch.optim.Optimizer, Any]], seed: int):
    """Restore the newest usable checkpoint of ``ckpt_dir``; returns ``(progress, optimizer, scheduler)``.

    Each candidate that cannot be used is named in a warning; with none usable, training starts fresh
    (same initial weights and RNG state as a run without checkpoints).
    """
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    for path in _checkpoint_candidates(ckpt_dir):
        if not path.exists():
            continue
        try:
            state = read_checkpoint(path)
        except ValueError as exc:
            logger.warning("%s: %s; skipped", name, exc)
            continue
        if state.get("fingerprint") != fingerprint:
            logger.warning("%s: checkpoint %s was written for another model/data/config; not resumed", name, path)
            continue
        optimizer, scheduler = make_optim()
        try:
            progress = _restore(state, model, optimizer, scheduler)
        except Exception as exc:  # noqa: BLE001 - a damaged state: fall back, never crash the run
            logger.warning("%s: checkpoint %s does not restore (%s: %s); skipped", name, path,
                           type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
            model.load_state_dict(initial)
            _seed_all(seed)
            continue
        progress.source = path
        logger.info("%s: resuming after epoch %d from %s", name, progress.epoch, path)
        return (progress, optimizer, scheduler)
    if any(p.exists() for p in _checkpoint_candidates(ckpt_dir)):
        logger.warning("%s: no usable checkpoint in %s; training from scratch", name, ckpt_dir)
    optimizer, scheduler = make_optim()
    return _Progress(), optimizer, scheduler


def _export_best(best_path: Path, best_model: Mapping[str, torch.Tensor], epoch: int, val_bleu: float) -> None:
    save_atomic({"model": dict(best_model), "epoch": epoch, "val_bleu4": val_bleu}, best_path)


def _best_file_matches(best_path: Path, epoch: int) -> bool:
    """True when ``best.pt`` can be read safely and holds the weights of ``epoch``."""
    try:
        best = torch.load(best_path, map_location="cpu", weights_only=True)
        return isinstance(best, dict) and int(best.get("epoch", -1)) == epoch and isinstance(best.get("model"), dict)
    except Exception:  # noqa: BLE001 - missing, truncated or hostile: rewrite it
        return False


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
                      world: int) -> tuple[torch.Tensor, float]:
    """One rank's loss, scaled so that DDP's gradient average is the gradient of the step's token mean over all
    ranks; returns (the loss to back-propagate, that token mean)."""
    import torch.distributed as dist

    with cfg.autocast():
        loss = caption_loss(model, feats, tokens, cfg.label_smoothing)
    n_local = (tokens[:, 1:] != model.pad_id).sum().to(torch.float64)
    totals = torch.stack([n_local, loss.detach().to(torch.float64) * n_local])
    dist.all_reduce(totals)
    return loss * (n_local * world / totals[0]).to(loss.dtype), float(totals[1] / totals[0])


def train_captioner(model: nn.Module, data: CaptionData, cfg: TrainConfig, checkpoint_dir: str | Path,
                    name: str = "captioner", resume: bool = True,
                    on_epoch_end: Callable[[int, dict[str, float], str | None], None] | None = None) -> TrainResult:
    """Train ``model`` on ``data``; checkpoints in ``checkpoint_dir``.

    ``on_epoch_end(epoch, record, sample)`` is called after every epoch with its history record and a
    sample caption, and once per epoch restored from a checkpoint (``sample`` ``None``): that is where a
    caller logs to MLflow (:func:`llm_caption.tracking.epoch_logger`). Returns the history and the best
    checkpoint; ``model`` holds the best weights afterwards.
    """
    ckpt_dir = Path(checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    fingerprint = _fingerprint(model, data, cfg)
    world = distributed.world_size() if distributed.ensure_process_group() else 1
    main = distributed.is_main_process()

    n_train = data.train.tokens.shape[0]
    sampler = EpochOrderSampler(n_train, world, distributed.rank(), cfg.seed) if world > 1 else None
    per_rank = len(sampler) if sampler is not None else n_train  # captions per rank and epoch
    total_steps = cfg.epochs * -(-per_rank // cfg.batch_size)

    def make_optim() -> tuple[torch.optim.Optimizer, Any]:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        if cfg.lr_schedule == "cosine":
            return optimizer, torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: cosine_factor(step, total_steps, cfg.min_lr_ratio))
        return optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.lr_factor,
                                                                     patience=cfg.lr_patience)

    _seed_all(cfg.seed)
    if main:
        _remove_partial_writes(ckpt_dir)
    if resume:
        progress, optimizer, scheduler = _resume(ckpt_dir, fingerprint, name, model, make_optim, cfg.seed)
    else:
        progress, (optimizer, scheduler) = _Progress(), make_optim()
    if progress.source is not None and on_epoch_end is not None and main:
        for record in progress.history:
            on_epoch_end(int(record["epoch"]), record, None)
    history, best, best_epoch = progress.history, progress.best, progress.best_epoch
    best_model, bad_epochs, stopped = progress.best_model, progress.bad_epochs, progress.stopped
    start_epoch = progress.epoch + 1
    resumed_from = start_epoch - 1

    n_views = data.features.shape[1]
    bleu_rows = data.val_image_rows[: cfg.val_bleu_images] if cfg.val_bleu_images else data.val_image_rows
    bleu_refs = data.val_references[: len(bleu_rows)]
    trained = _DataParallel(model) if world > 1 else model
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stopped:
            break
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]  # the epoch's (first step's) learning rate
        model.train()
        gen = _epoch_generator(cfg.seed, epoch)
        order = torch.randperm(n_train, generator=gen)
        views = torch.randint(n_views, (n_train,), generator=gen) if n_views > 1 else None
        total, steps = 0.0, 0
        if sampler is not None:
            sampler.set_epoch(epoch)
            sampler.set_order(order)
            order = torch.tensor(list(sampler), dtype=torch.long)
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"{name} epoch {epoch}", unit="batch", leave=False,
                   disable=not main)
        for lo in bar:
            feats, tokens = _batch(data, data.train, order[lo: lo + cfg.batch_size], views)
            if sampler is None:
                with cfg.autocast():
                    loss = caption_loss(model, feats, tokens, cfg.label_smoothing)
                step_loss = None
            else:
                loss, step_loss = _distributed_step(trained, feats, tokens, cfg, world)
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
        train_loss = total / max(1, steps)
        val_loss = evaluate_loss(model, data, data.val, cfg)
        hyps = greedy_captions(model, data.features, bleu_rows, data.itos, cfg)
        val_bleu = bleu4(bleu_refs, hyps)
        if cfg.lr_schedule == "plateau":
            scheduler.step(val_loss)
        record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_bleu4": val_bleu, "lr": lr,
                  "epoch_time_s": time.perf_counter() - t0, "train_epoch_time_s": train_time}
        history.append(record)
        if val_bleu > best + cfg.min_delta:
            best, best_epoch, bad_epochs = val_bleu, epoch, 0
            best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if main:
                _export_best(best_path, best_model, epoch, val_bleu)
        else:
            bad_epochs += 1
        stopped = bad_epochs >= cfg.patience
        if main:
            _write_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history, "best": best,
                               "best_epoch": best_epoch, "best_model": best_model, "bad_epochs": bad_epochs,
                               "stopped": stopped, "fingerprint": fingerprint, "rng": rng_state()}, ckpt_dir)
        sample = f"Pred: {hyps[0] if hyps else ''} / GT: {bleu_refs[0][0] if bleu_refs else ''}"
        logger.info("%s epoch %d: train %.4f val %.4f BLEU-4 %.4f lr %.2e (%.1fs) %s", name, epoch, train_loss,
                    val_loss, val_bleu, lr, record["epoch_time_s"], sample)
        if on_epoch_end is not None and main:
            on_epoch_end(epoch, record, sample)
        if stopped:
            logger.info("%s: early stop after epoch %d (no BLEU-4 gain for %d epochs)", name, epoch, cfg.patience)
    if best_model is not None:
        model.load_state_dict(best_model)
        if main and not _best_file_matches(best_path, best_epoch):
            logger.warning("%s: %s was missing or damaged; rewritten from the checkpoint's best weights (epoch %d)",
                           name, best_path, best_epoch)
            _export_best(best_path, best_model, best_epoch, best)
    distributed.barrier()  # the other ranks leave once rank 0's files are written
    return TrainResult(history=history, best_epoch=best_epoch, best_val_bleu4=best if history else 0.0,
                       epochs_run=len(history), resumed_from_epoch=resumed_from,
                       train_time_s=history_seconds(history), best_checkpoint=str(best_path),
                       last_checkpoint=str(last_path))
