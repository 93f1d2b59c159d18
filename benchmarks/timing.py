"""Side-by-side timing: interleaved repeats, synchronised on CUDA, reported as median ratios with their spread."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

DEVICES = ("auto", "cpu", "cuda")


def pick_device(requested: str = "auto") -> torch.device:
    """``"auto"``: CUDA when present, else CPU (the benchmarks run unchanged on both); or the device asked for.

    Raises:
        ValueError: If ``requested`` is not one of :data:`DEVICES`, or is ``"cuda"`` without a CUDA device.
    """
    if requested not in DEVICES:
        raise ValueError(f"device={requested!r} is not one of {DEVICES}.")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device='cuda' was asked for but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}); use 'cpu' or 'auto'."
        )
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


CLOCKS = ("auto", "wall", "thread")
_clock: Callable[[], float] = time.perf_counter


def choose_clock(requested: str, device: torch.device, threads: int) -> str:
    """The clock the timings use: ``"wall"`` (``time.perf_counter``) or ``"thread"`` (``time.thread_time``).

    ``"auto"`` takes the calling thread's CPU time on CPU with one intra-op thread, where every op of the timed code
    runs in that thread: on a shared machine it leaves out the time the process waited for a core, which a wall clock
    adds to whichever side of a ratio was descheduled. Anywhere else (CUDA, several threads) work happens outside the
    thread, so it takes the wall clock.

    Raises:
        ValueError: If ``requested`` is not one of :data:`CLOCKS`, or is ``"thread"`` where it would miss work.
    """
    if requested not in CLOCKS:
        raise ValueError(f"clock={requested!r} is not one of {CLOCKS}.")
    single_thread_cpu = device.type == "cpu" and threads == 1
    if requested == "thread" and not single_thread_cpu:
        raise ValueError(
            f"clock='thread' needs a CPU run with 1 intra-op thread (got device {device}, {threads} threads): the "
            "work of other threads or of a GPU is not in the calling thread's CPU time."
        )
    if requested == "auto":
        requested = "thread" if single_thread_cpu else "wall"
    return requested


def set_clock(name: str) -> None:
    """Make :func:`now` read the wall clock (``"wall"``) or the calling thread's CPU time (``"thread"``)."""
    global _clock
    _clock = time.thread_time if name == "thread" else time.perf_counter


def now() -> float:
    """Seconds on the clock chosen with :func:`set_clock` (the wall clock unless told otherwise)."""
    return _clock()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: Mapping[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = 1, inner: int = 1
) -> dict[str, list[float]]:
    """Seconds (on the clock of :func:`now`) of each function, run in turn ``repeats`` times (order reversed every other
    round).

    Interleaving puts the things compared under the same load at the same moment, so a ratio of the times of one
    round is far steadier on a shared machine than a ratio of separately taken medians. With ``inner > 1`` a round
    keeps the fastest of ``inner`` back-to-back calls of each function (other processes only ever add time).

    Garbage is collected once before the rounds and the collector stays off during them, so no collection lands in a
    timed call. A ``gc.collect()`` at the start of every round made whichever function ran first in the round slower
    (it walks the whole heap, leaving the caches cold): measured on the tiny MLP of P10, a measurement ÷ its floor
    was 9.9 in the rounds where the measurement ran first and 6.3 where the floor did, so the per-round ratios were
    bimodal by round parity and a median of 9 rounds jumped between the two modes from run to run; with the
    collector off the two orders gave 8.8 and 10.3.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for round_ in range(repeats):
            for name in names if round_ % 2 == 0 else reversed(names):
                best = float("inf")
                for _ in range(inner):
                    synchronize(device)
                    start = now()
                    fns[name]()
                    synchronize(device)
                    best = min(best, now() - start)
                times[name].append(best)
    finally:
        if collecting:
            gc.enable()
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
