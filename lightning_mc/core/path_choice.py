"""Never dearer than without: the encoder cache's path chosen from the first batches' timing.

Replaying encoders saves their forward passes but adds work of its own (hooks, indexing the recorded rows, one forward
call per kind of copy instead of chunks that mix them). Where the encoders are tiny, that work costs more than it
saves. :class:`PathChoice` times the first batch after the check on the cached path and the next one on the plain
path, per model-input row, and keeps the plain path for the rest of the fit when the cached one was dearer (said once,
with both figures). Both paths give the same numbers, so which one ran a batch never shows in a result.

Example:
    >>> ticks = iter([0.0, 3.0, 10.0, 12.0])  # the cached batch takes 3 s, the plain one 2 s, for the same rows
    >>> choice = PathChoice(clock=lambda: next(ticks))
    >>> for path in ("cached", "plain"):
    ...     with choice.timing(path, rows=100, device=None):
    ...         pass
    >>> choice.plain
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torchmetrics.utilities import rank_zero_warn

Path = Literal["cached", "plain"]

#: The plain path is kept when the cached path's seconds per row on the first batches exceed this multiple of the
#: plain path's; ``None``: the cached path is always kept (the tests set it; 0 always takes the plain path).
PLAIN_IF_DEARER: float | None = 1.0


class PathChoice:
    """Which path the encoder cache takes: ``"cached"`` on the first batch, ``"plain"`` on the next, then the cheaper.

    Args:
        clock: Seconds (``time.perf_counter`` by default); CUDA work is synchronised around each timed batch.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        #: Whether the plain path was chosen (for the rest of the fit).
        self.plain = False
        self._seconds_per_row: dict[str, float] = {}
        self._said = False

    def restart(self) -> None:
        """Time both paths again (a new fit: the model, its size or the machine may differ)."""
        self.plain = False
        self._seconds_per_row.clear()

    @property
    def next_to_time(self) -> Path | None:
        """The path the next batch should take to be timed; ``None`` once chosen (or never, without a threshold)."""
        if PLAIN_IF_DEARER is None or len(self._seconds_per_row) == 2:
            return None
        return "cached" if "cached" not in self._seconds_per_row else "plain"

    @contextmanager
    def timing(self, path: Path, rows: int, device: torch.device | None) -> Iterator[None]:
        """Time the block as one batch of ``rows`` model-input rows on ``path``; choose once both were timed."""
        _synchronize(device)
        start = self.clock()
        yield
        _synchronize(device)
        self._seconds_per_row[path] = (self.clock() - start) / max(rows, 1)
        if len(self._seconds_per_row) == 2:
            self._choose()

    def _choose(self) -> None:
        cached, plain = self._seconds_per_row["cached"], self._seconds_per_row["plain"]
        self.plain = PLAIN_IF_DEARER is not None and cached > PLAIN_IF_DEARER * plain
        if self.plain and not self._said:
            self._said = True
            rank_zero_warn(
                f"encoders: replaying the encoders cost {cached * 1e6:.3g} µs per model-input row on the first batch, "
                f"running the whole model {plain * 1e6:.3g} µs on the next: the encoders are too small for caching to "
                "pay, so every copy runs the whole model for the rest of this fit (the same numbers). Leave encoders "
                "out for this model.",
                UserWarning,
            )


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["PLAIN_IF_DEARER", "PathChoice"]
