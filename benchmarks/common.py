"""Timing, memory and machine-peak helpers shared by the benchmarks."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Series:
    """Repeated measurements of one figure of one side."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(float(value))

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def spread(self) -> float:
        """Half the range (max - min) / 2: with two or three repetitions, the honest error bar."""
        return (max(self.values) - min(self.values)) / 2 if len(self.values) > 1 else 0.0

    def text(self, fmt: str = "{:.3g}") -> str:
        if not self.values:
            return "n/a"
        return f"{fmt.format(self.median)} ± {fmt.format(self.spread)}"


def alternate(sides: dict[str, Callable[[int], Any]], reps: int) -> dict[str, list[Any]]:
    """Run every side once per repetition, in alternating order (ABAB, then BABA ...), so that a slow
    period of a shared machine hits every side alike. Returns each side's results in repetition order."""
    names = list(sides)
    out: dict[str, list[Any]] = {name: [] for name in names}
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            gc.collect()
            out[name].append(sides[name](rep))
    return out


def matmul_gflops(dtype: torch.dtype, size: int = 2048, seconds: float = 2.0) -> Series:
    """Measured dense matmul throughput (GFLOP/s, 2*n^3 per product) of this CPU at the current thread count."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(2):
        torch.mm(a, b)
    series = Series()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(series.values) < 3:
        start = time.perf_counter()
        torch.mm(a, b)
        series.add(2 * size**3 / (time.perf_counter() - start) / 1e9)
    return series


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter`` counts them (matmuls, convolutions and
    attention, forward and backward; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())
