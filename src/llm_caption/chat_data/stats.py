"""Token lengths under the model's chat template, the length filter, summary statistics and the histogram."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .records import ChatRecord

logger = logging.getLogger(__name__)


def token_lengths(tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]], batch_size: int = 512) -> list[int]:
    """Number of tokens of each conversation rendered with ``tokenizer``'s chat template (what training sees)."""
    lengths: list[int] = []
    for start in tqdm(range(0, len(conversations), batch_size), desc="token lengths", unit="batch",
                      disable=len(conversations) <= batch_size):
        batch = conversations[start:start + batch_size]
        texts = [tokenizer.apply_chat_template(list(m), tokenize=False) for m in batch]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        lengths.extend(len(x) for x in ids)
    return lengths


def apply_length_filter(records: Sequence[ChatRecord], tokenizer: Any, max_seq_len: int) -> list[ChatRecord]:
    """Every record, the accepted ones with ``n_tokens`` set; those longer than ``max_seq_len`` rejected as ``too_long``."""
    if max_seq_len < 1:
        raise ValueError(f"chat_data.max_seq_len must be positive, got {max_seq_len}")
    accepted = [i for i, r in enumerate(records) if r.accepted]
    lengths = token_lengths(tokenizer, [records[i].messages for i in accepted])
    out = list(records)
    for i, n in zip(accepted, lengths):
        r = replace(out[i], n_tokens=int(n))
        if n > max_seq_len:
            r = replace(r, reason="too_long", detail=f"{n} tokens > max_seq_len {max_seq_len}")
        out[i] = r
    return out


def length_summary(lengths: Sequence[int]) -> dict[str, float]:
    """count, min, mean, percentiles (50, 90, 95, 99) and max of ``lengths`` (zeros when empty)."""
    if len(lengths) == 0:
        return {"count": 0, "min": 0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p95": 0.0, "p99": 0.0, "max": 0}
    a = np.asarray(lengths)
    p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])
    return {"count": int(a.size), "min": int(a.min()), "mean": round(float(a.mean()), 2),
            "p50": float(p50), "p90": float(p90), "p95": float(p95), "p99": float(p99), "max": int(a.max())}


def length_histogram(lengths: Sequence[int], max_seq_len: int, bins: int = 50, title: str = ""):
    """A matplotlib Figure: histogram of token lengths with the ``max_seq_len`` cut-off as a dashed line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    a = np.asarray(lengths)
    if a.size:
        upper = max(int(a.max()), max_seq_len)
        # Very long outliers would squeeze the bulk into one bar: clip the range at 3x the cut-off.
        upper = min(upper, 3 * max_seq_len)
        over = int((a > upper).sum())
        ax.hist(np.clip(a, None, upper), bins=bins, range=(0, upper), color="#4c72b0", edgecolor="white")
        if over:
            ax.text(0.99, 0.85, f"{over} longer than {upper} shown in the last bar",
                    transform=ax.transAxes, ha="right", fontsize=8)
    kept = int((a <= max_seq_len).sum())
    ax.axvline(max_seq_len, color="#c44e52", linestyle="--",
               label=f"max_seq_len = {max_seq_len} ({kept} of {a.size} fit)")
    ax.set_xlabel("tokens under the chat template")
    ax.set_ylabel("conversations")
    ax.set_title(title or "Chat conversation length")
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig
