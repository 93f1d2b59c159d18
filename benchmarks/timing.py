"""Side-by-side timing: interleaved repeats, synchronised on CUDA, reported as median ratios with their spread."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch


def pick_device() -> torch.device:
    """CUDA when present, else CPU: the benchmarks run unchanged on both."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: Mapping[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = 1, inner: int = 1
) -> dict[str, list[float]]:
    """Wall-clock seconds of each function, run in turn ``repeats`` times (order reversed every other round).

    Interleaving puts the things compared under the same load at the same moment, so a ratio of the times of one
    round is far steadier on a shared machine than a ratio of separately taken medians. With ``inner > 1`` a round
    keeps the fastest of ``inner`` back-to-back calls of each function (other processes only ever add time).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        gc.collect()
        for name in names if round_ % 2 == 0 else reversed(names):
            best = float("inf")
            for _ in range(inner):
                synchronize(device)
                start = time.perf_counter()
                fns[name]()
                synchronize(device)
                best = min(best, time.perf_counter() - start)
            times[name].append(best)
    return times


@dataclass(frozen=True)
class Stat:
    """Median and interquartile range of repeated measurements (of a ratio or of seconds)."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        if len(values) == 1:
            return cls(values[0], values[0], values[0], 1)
        low, _, high = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), low, high, len(values))

    def format(self, digits: int = 2, unit: str = "") -> str:
        return f"{self.median:.{digits}f}{unit} [{self.low:.{digits}f}–{self.high:.{digits}f}]"

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "p25": self.low, "p75": self.high, "n": self.n}


def ratio(numerator: list[float], denominator: list[float]) -> Stat:
    """Per-round ratios ``numerator[r] / denominator[r]`` (same round = same machine load), summarised."""
    return Stat.of([a / b for a, b in zip(numerator, denominator)])
