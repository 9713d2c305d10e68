"""The epoch loop every caption training stage shares (cross-entropy, SCST): resume, early stopping on a
validation figure, best-weights export and a checkpoint after every epoch.

Every epoch writes ``last.pt`` (model, optimizer, scheduler, epoch, RNG states as tensors, history and the
best weights so far); the one it replaces is kept as ``previous.pt``. The best epoch by the stage's validation
figure is also exported to ``best.pt``. A rerun with the same configuration resumes from ``last.pt`` and ends
with the same weights and metrics as an uninterrupted run, as long as the stage draws an epoch's randomness
from a generator seeded with ``(seed, epoch)`` (:func:`epoch_generator`) and the global RNG (dropout) is
restored from the checkpoint (done here).

Checkpoints are untrusted on the way in and crash-safe on the way out: every file is written to a temporary
name and moved into place with ``os.replace``; every load uses ``torch.load(weights_only=True)`` (nothing here
needs pickle); a checkpoint that cannot be read or does not hold what a checkpoint holds is named in a warning
and the previous one is tried, then training starts from scratch.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed

logger = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float], "str | None"], None]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s batch order and sampling (the same after a resume)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


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


@dataclass
class LoopResult:
    """What :func:`run_epochs` leaves: every epoch's record, the best epoch and its figure, where it resumed."""

    history: list[dict[str, float]]
    best_epoch: int
    best: float
    resumed_after: int | None  # the last epoch restored from a checkpoint; None when training started fresh
    best_path: Path
    last_path: Path


def run_epochs(model: nn.Module, make_optim: Callable[[], tuple[torch.optim.Optimizer, Any]],
               run_epoch: Callable[[int, torch.optim.Optimizer, Any], tuple[dict[str, float], list[str]]], *,
               checkpoint_dir: str | Path, fingerprint: str, name: str, seed: int, first_epoch: int, last_epoch: int,
               select_by: str, patience: int, min_delta: float = 0.0, resume: bool = True,
               reference: str = "", describe: Callable[[dict[str, float]], str] | None = None,
               on_epoch_end: EpochCallback | None = None) -> LoopResult:
    """Train ``model`` epoch by epoch from ``first_epoch`` to ``last_epoch`` with checkpoints in ``checkpoint_dir``.

    ``run_epoch(epoch, optimizer, scheduler)`` trains one epoch (and steps its scheduler) and returns its record
    (``epoch``, ``epoch_time_s``, ``val_bleu4`` and ``select_by`` at least) and the validation captions (the first
    is logged next to ``reference``). An epoch whose ``select_by`` beats the best by more than ``min_delta``
    becomes the best and is exported to ``best.pt``; ``patience`` epochs after ``first_epoch`` without one stop
    training. ``on_epoch_end(epoch, record, sample)`` is called after every epoch, and once per epoch restored from
    a checkpoint (``sample`` None). Rank 0 alone writes files and calls back. ``model`` holds the best weights
    afterwards.
    """
    ckpt_dir = Path(checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    main = distributed.is_main_process()
    _seed_all(seed)
    if main:
        _remove_partial_writes(ckpt_dir)
    if resume:
        progress, optimizer, scheduler = _resume(ckpt_dir, fingerprint, name, model, make_optim, seed)
    else:
        progress, (optimizer, scheduler) = _Progress(), make_optim()
    if progress.source is not None and on_epoch_end is not None and main:
        for record in progress.history:
            on_epoch_end(int(record["epoch"]), record, None)
    history, best, best_epoch = progress.history, progress.best, progress.best_epoch
    best_model, bad_epochs, stopped = progress.best_model, progress.bad_epochs, progress.stopped
    resumed = progress.source is not None
    start = progress.epoch + 1 if resumed else first_epoch
    for epoch in range(start, last_epoch + 1):
        if stopped:
            break
        record, hyps = run_epoch(epoch, optimizer, scheduler)
        history.append(record)
        value = float(record[select_by])
        if value > best + min_delta:
            best, best_epoch, bad_epochs = value, epoch, 0
            best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if main:
                _export_best(best_path, best_model, epoch, float(record["val_bleu4"]))
        elif epoch > 0:  # SCST's epoch 0 is its starting point
            bad_epochs += 1
        stopped = bad_epochs >= patience
        if main:
            _write_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history, "best": best,
                               "best_epoch": best_epoch, "best_model": best_model, "bad_epochs": bad_epochs,
                               "stopped": stopped, "fingerprint": fingerprint, "rng": rng_state()}, ckpt_dir)
        sample = f"Pred: {hyps[0] if hyps else ''} / GT: {reference}"
        logger.info("%s epoch %d: %s (%.1fs) %s", name, epoch,
                    describe(record) if describe else f"{select_by} {value:.4f}", record["epoch_time_s"], sample)
        if on_epoch_end is not None and main:
            on_epoch_end(epoch, record, sample)
        if stopped:
            logger.info("%s: early stop after epoch %d (no %s gain for %d epochs)", name, epoch, select_by, patience)
    if best_model is not None:
        model.load_state_dict(best_model)
        if main and not _best_file_matches(best_path, best_epoch):
            logger.warning("%s: %s was missing or damaged; rewritten from the checkpoint's best weights (epoch %d)",
                           name, best_path, best_epoch)
            best_bleu = next(float(r["val_bleu4"]) for r in history if int(r["epoch"]) == best_epoch)
            _export_best(best_path, best_model, best_epoch, best_bleu)
    distributed.barrier()  # the other ranks leave once rank 0's files are written
    return LoopResult(history, best_epoch, best, progress.epoch if resumed else None, best_path, last_path)
