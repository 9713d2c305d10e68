"""Small checks shared by both studies: a table's required columns and a model's parameter counts."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pandas as pd
import torch


def require_columns(frame: pd.DataFrame, name: str, columns: Iterable[str], allow_empty: bool = True) -> None:
    """Fail, naming dataset ``name``, when ``frame`` lacks any of ``columns`` (or has no rows and
    ``allow_empty`` is false); the columns of every dataset are in docs/datasets.md."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing} (has {list(frame.columns)}); see docs/datasets.md")
    if not allow_empty and frame.empty:
        raise ValueError(f"{name}: no rows")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; bitsandbytes 4-bit weights count as their unpacked number of values."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            state = getattr(param, "quant_state", None)
            n = int(torch.Size(state.shape).numel()) if state is not None else n * 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def cpu_supports_bf16() -> bool:
    """True when oneDNN reports native bf16 on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def effective_precision(precision: str, where: str) -> str:
    """``precision``, except ``bf16`` on a CPU without native bf16: there it is emulated (many times slower) and
    oneDNN has no bf16 LSTM, so ``fp32`` is used instead, with a warning naming ``where``."""
    if precision == "bf16" and not cpu_supports_bf16():
        logging.getLogger(__name__).warning("%s: precision bf16 asked, but this CPU has no native bf16 "
                                            "(AVX512-BF16 or AMX); running in fp32", where)
        return "fp32"
    return precision
