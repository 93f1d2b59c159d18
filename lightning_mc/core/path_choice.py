"""Never dearer than without: the encoder cache's path chosen on one batch, without running it the slow way.

Replaying encoders saves their forward passes but adds work of its own (hooks, indexing the recorded rows, one forward
call per kind of copy instead of chunks that mix them). Where the encoders are tiny, that work costs more than it
saves. The clean pass the cache records the encoders in is the plain path's work on the clean rows (the whole model,
encoders included), so :class:`PathChoice` times it on the batch after the check (whose clean pass is the model's
first call with these shapes), and the occluded copies of the same batch on the cached path, per model-input row;
where the cached rows were dearer, the plain path is kept for the rest of the fit (said once, with both figures).
Where no clean pass runs (the clean outputs and the encoders' recording given, as ``reuse_outputs`` does), the batch
after is timed on the plain path instead. Both paths give the same numbers, so which
one ran a batch never shows in a result.

Example:
    >>> ticks = iter([0.0, 3.0, 10.0, 12.0])  # the cached rows take 3 s, the clean pass 2 s, for as many rows
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

#: The plain path is kept when the cached path's seconds per row on the timed batch exceed this multiple of the
#: plain path's; ``None``: the cached path is always kept (the tests set it; 0 always takes the plain path).
PLAIN_IF_DEARER: float | None = 1.0


class PathChoice:
    """Which path the encoder cache takes: the cheaper per row of one batch's clean pass and cached copies.

    Args:
        clock: Seconds (``time.perf_counter`` by default); CUDA work is synchronised around each timed batch.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        #: Whether the plain path was chosen (for the rest of the fit).
        self.plain = False
        self._seconds_per_row: dict[str, float] = {}
        self._timed_on: dict[str, str] = {}
        self._said = False

    def restart(self) -> None:
        """Time both paths again (a new fit: the model, its size or the machine may differ)."""
        self.plain = False
        self._seconds_per_row.clear()
        self._timed_on.clear()

    @property
    def next_to_time(self) -> Path | None:
        """The path still to time (``"cached"`` first: its batch times its clean pass too); ``None`` once chosen.

        ``None`` too without a threshold (:data:`PLAIN_IF_DEARER` is ``None``: never timed).
        """
        if PLAIN_IF_DEARER is None or len(self._seconds_per_row) == 2:
            return None
        return "cached" if "cached" not in self._seconds_per_row else "plain"

    @contextmanager
    def timing(
        self, path: Path, rows: int, device: torch.device | None, timed_on: str = "on the batch after the check"
    ) -> Iterator[None]:
        """Time the block as ``rows`` model-input rows on ``path``; choose once both were timed.

        Args:
            path: Which path the block runs.
            rows: The model-input rows it runs.
            device: Synchronised around the block (CUDA).
            timed_on: What the block ran, for the warning (``"on its clean rows"``).
        """
        _synchronize(device)
        start = self.clock()
        yield
        _synchronize(device)
        self._seconds_per_row[path] = (self.clock() - start) / max(rows, 1)
        self._timed_on[path] = timed_on
        if len(self._seconds_per_row) == 2:
            self._choose()

    def _choose(self) -> None:
        cached, plain = self._seconds_per_row["cached"], self._seconds_per_row["plain"]
        self.plain = PLAIN_IF_DEARER is not None and cached > PLAIN_IF_DEARER * plain
        if self.plain and not self._said:
            self._said = True
            rank_zero_warn(
                f"encoders: replaying the encoders cost {cached * 1e6:.3g} µs per model-input row "
                f"{self._timed_on['cached']}, running the whole model {plain * 1e6:.3g} µs {self._timed_on['plain']}: "
                "the encoders are too small for caching to pay, so every copy runs the whole model for the rest of "
                "this fit (the same numbers). Leave encoders out for this model.",
                UserWarning,
            )


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["PLAIN_IF_DEARER", "PathChoice"]
