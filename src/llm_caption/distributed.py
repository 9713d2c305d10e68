"""Several training processes (``torchrun`` / ``accelerate launch``): who is who, and the one process that records.

A launcher starts the same command once per process and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); this module reads them without importing torch, so
``settings.py`` can ask at import time. Rank 0 is the *main process*: it alone opens MLflow runs, writes
results and registers models; the other ranks train alongside it (DDP: gradients averaged every step, so
every rank ends with the same weights) and keep what they compute in memory.

:func:`ensure_process_group` joins the launcher's process group (gloo on CPU, NCCL on CUDA) before the first
collective call; the Trainer (through accelerate) and the captioner's training loop reuse it. One process
(no launcher) changes nothing: every helper here is then a no-op that returns the one-process answer.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

logger = logging.getLogger(__name__)

_OWNED_GROUP = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        return default


def _group_ready() -> bool:
    """Whether torch is already imported and a default process group is up (never imports torch itself)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return False
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized())


def world_size() -> int:
    """How many processes train together (1 without a launcher)."""
    if _group_ready():
        import torch.distributed as dist

        return dist.get_world_size()
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    if _group_ready():
        import torch.distributed as dist

        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its machine (picks its GPU)."""
    return _env_int("LOCAL_RANK", rank())


def is_distributed() -> bool:
    """True under a launcher with more than one process."""
    return world_size() > 1


def is_main_process() -> bool:
    """True for the process that logs, writes and registers (rank 0; the only process without a launcher)."""
    return rank() == 0


def backend() -> str:
    """The collective backend for this machine: NCCL with CUDA, gloo on CPU."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def ensure_process_group(timeout_s: float = 1800.0) -> bool:
    """Join the launcher's process group when there is more than one process and none is up yet.

    Returns whether a group is up afterwards. A group started here is torn down when the process exits
    (:func:`teardown`); one started by someone else (accelerate, a test) is left to its owner.
    """
    global _OWNED_GROUP
    if _env_int("WORLD_SIZE", 1) <= 1 and not _group_ready():
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    chosen = backend()
    if chosen == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=chosen, timeout=timedelta(seconds=timeout_s))
    _OWNED_GROUP = True
    atexit.register(teardown)
    logger.info("Process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), chosen)
    return True


def teardown() -> None:
    """Leave the process group this module started (no-op otherwise)."""
    global _OWNED_GROUP
    if not _OWNED_GROUP:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _OWNED_GROUP = False


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


def broadcast(value: Any, src: int = 0) -> Any:
    """``value`` as rank ``src`` has it, on every rank (picklable objects; identity in one process)."""
    if not _group_ready():
        return value
    import torch.distributed as dist

    box = [value if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a file), the other ranks after it is done."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()
