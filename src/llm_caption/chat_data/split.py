"""De-duplication, seeded sampling and the seeded train/test split of accepted conversations."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from .records import ChatRecord

logger = logging.getLogger(__name__)


def deduplicate(records: Sequence[ChatRecord]) -> list[ChatRecord]:
    """Reject every accepted record whose (normalised) conversation appeared earlier, naming the first one.

    Records are compared by ``conversation_id`` (a hash of the normalised roles and contents);
    the first occurrence stays accepted.
    """
    first_seen: dict[str, str] = {}
    out = []
    for r in records:
        if r.accepted:
            if r.conversation_id in first_seen:
                r = replace(r, reason="duplicate", detail=f"duplicate of {first_seen[r.conversation_id]}")
            else:
                first_seen[r.conversation_id] = r.location
        out.append(r)
    return out


def sample(records: Sequence[ChatRecord], n_samples: int | None, seed: int) -> list[ChatRecord]:
    """``n_samples`` of ``records`` drawn without replacement with ``seed``, in input order.

    All of them (and a log line saying so) when there are not more than ``n_samples``;
    ``n_samples`` null means all.
    """
    if n_samples is None or n_samples >= len(records):
        if n_samples is not None and n_samples > len(records):
            logger.warning("Asked for %d chat conversations but only %d are accepted; using all %d",
                           n_samples, len(records), len(records))
        return list(records)
    if n_samples < 1:
        raise ValueError(f"chat_data.n_samples must be a positive number or null, got {n_samples}")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(records), size=n_samples, replace=False))
    return [records[i] for i in chosen]


def train_test_split(records: Sequence[ChatRecord], test_size: float, seed: int) -> tuple[list[ChatRecord], list[ChatRecord]]:
    """A seeded shuffle split: ``round(test_size * n)`` records (at least 1 when n >= 2) go to test.

    The same records, ``test_size`` and ``seed`` always give the same split; the two parts are
    disjoint and together hold every record.
    """
    if not 0 < test_size < 1:
        raise ValueError(f"chat_data.test_size must be between 0 and 1, got {test_size}")
    n = len(records)
    n_test = int(round(test_size * n))
    if n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    test_idx = set(order[:n_test].tolist())
    train = [r for i, r in enumerate(records) if i not in test_idx]
    test = [r for i, r in enumerate(records) if i in test_idx]
    return train, test
