"""The encoder check keeps watching: one seeded random batch of every measurement is checked again, cheaply.

The encoder cache compares its path with the plain one on one row of each copy of the first batch of a fit
(:meth:`~lightning_mc.core.encoder_cache.EncoderCache.run`). An encoder that reads another modality only on some
inputs passes that check: an image encoder with a FiLM term driven by a table flag that is off in the first batch and
on afterwards replays a clean output where the plain path would have changed. :class:`SpotCheck` picks, in every
measurement, one batch (seeded, uniformly among the number of batches the previous measurement had; the second batch
in the first measurement, whose first batch was just checked) and a seeded random sample of it. There the cache runs,
in one plain forward call, one row per modality: the sample with that modality's input clean and every other
modality occluded by its fill; each encoder's output on its own modality's row must equal its recorded clean output,
or it reads another modality's input. One forward call of one row per modality per measurement, whatever the number
of attributes: a cross-modal read that shows from some batch on is caught within a few measurements.

The draws depend only on the seed, the measurement (the monitor's ``global_step``) and the batch, so a resumed fit
checks what an uninterrupted one checks.

Example:
    >>> spot = SpotCheck()
    >>> spot.start(check=0, seed=0)
    >>> [spot.next_batch() for _ in range(3)]  # the first measurement: the second batch
    [False, True, True]
    >>> spot.done()
    >>> spot.next_batch()
    False
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Mixed into the spot check's seeds, so its draws are not those of the random fills.
_SEED_SALT = 0x73706F74


class SpotCheck:
    """Which batch of a measurement the encoder cache checks again, and a generator for the rows it checks."""

    def __init__(self) -> None:
        self._seed, self._check = 0, 0
        #: Batches seen in this measurement; the index of the batch to check; whether it was checked.
        self._batch, self._target, self._done = 0, 1, False
        #: Batches of the previous measurement (``None`` before the first one ended).
        self._previous: int | None = None
        #: Spot checks run so far.
        self.runs = 0

    def start(self, check: int, seed: int) -> None:
        """A measurement starts (``check``: the monitor's ``global_step``); draw the batch to check in it."""
        if self._batch:
            self._previous = self._batch
        self._seed, self._check, self._batch, self._done = seed, check, 0, False
        if self._previous is None:
            self._target = 1  # the first batch of a fit has the full check
        else:
            self._target = int(torch.randint(self._previous, (1,), generator=self._generator(-1)))

    def next_batch(self) -> bool:
        """Count one batch of the measurement; whether the spot check is due on it (it stays due until done)."""
        index = self._batch
        self._batch += 1
        return not self._done and index >= self._target

    def done(self) -> None:
        """The spot check of this measurement ran."""
        self._done = True
        self.runs += 1

    @property
    def batch(self) -> int:
        """The index of the batch counted last (for messages)."""
        return self._batch - 1

    def sample(self, batch_size: int, device: torch.device | str) -> Tensor:
        """A seeded random sample of the batch due, as a one-element index tensor on ``device``.

        Example:
            >>> spot = SpotCheck()
            >>> spot.start(check=3, seed=0)
            >>> spot.next_batch()
            False
            >>> spot.sample(8, "cpu")
            tensor([3])
        """
        return torch.randint(batch_size, (1,), generator=self._generator(self._batch)).to(device)

    def _generator(self, batch: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self._seed, _SEED_SALT, self._check, batch)) % 2**63)


__all__ = ["SpotCheck"]
