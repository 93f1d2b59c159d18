"""A bounded, seeded, uniform sample of one epoch's training rows, kept where they are (no host sync per batch).

The collapse probe's power comes from the training samples that pass through ``on_train_batch_end`` anyway: a probe
cross-validated inside 40 validation samples can hardly tell anything. :class:`TrainingReservoir` keeps at most
:data:`CAPACITY` rows of the current epoch by reservoir sampling (Vitter's algorithm R, vectorised per batch: the
``t``-th row of the epoch replaces a random kept row with probability ``CAPACITY / (t + 1)``), so every row of the
epoch is kept with the same probability whatever the epoch's length. It starts empty each epoch: a sample appears at
most once (with a sampler that does not draw with replacement), so cross-validation never fits and scores one sample.

Example:
    >>> reservoir = TrainingReservoir(capacity=4)
    >>> reservoir.start(seed=0)
    >>> rows, slots = reservoir.slots(10)
    >>> reservoir.store(slots, {"x": torch.arange(10.0)[rows, None]}, torch.arange(10)[rows])
    >>> reservoir.count, sorted(reservoir.labels().tolist()) == sorted(set(reservoir.labels().tolist()))
    (4, True)
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Most training rows kept per epoch.
CAPACITY = 1024


class TrainingReservoir:
    """At most ``capacity`` rows of one epoch's training batches: features per modality and the labels.

    Args:
        capacity: Most rows kept.
    """

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._seen = 0
        self._generator: torch.Generator | None = None
        self._features: dict[str, Tensor] = {}
        self._labels: Tensor | None = None

    def __getstate__(self) -> dict[str, object]:
        # ddp_spawn pickles the callbacks: a generator does not travel, and no rows are kept between runs
        return {"capacity": self.capacity, "_seen": 0, "_generator": None, "_features": {}, "_labels": None}

    @property
    def count(self) -> int:
        """Rows kept."""
        return min(self._seen, self.capacity)

    def start(self, seed: int) -> None:
        """An epoch starts: drop every row, seed the draws."""
        self._seen = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._features, self._labels = {}, None

    def slots(self, num_rows: int) -> tuple[Tensor | slice, Tensor | slice]:
        """Which of the next ``num_rows`` rows to keep and the slot each goes to (the last of a slot's rows wins).

        While the reservoir fills, every row is kept in the next free slots: both are slices (no draw, no index).
        """
        start = self._seen
        self._seen += num_rows
        if self._seen <= self.capacity:
            return slice(0, num_rows), slice(start, self._seen)
        index = torch.arange(start, self._seen)
        drawn = (torch.rand(num_rows, generator=self._generator, dtype=torch.float64) * (index + 1)).long()
        slot = torch.where(index < self.capacity, index, drawn)
        candidates = torch.nonzero(slot < self.capacity).flatten()
        # two rows of one batch drawn for one slot: the later one replaces the earlier, as one row at a time would
        last = torch.full((self.capacity,), -1, dtype=torch.long)
        last.scatter_reduce_(0, slot[candidates], candidates, reduce="amax")
        filled = torch.nonzero(last >= 0).flatten()
        return last[filled], filled

    def store(self, slots: Tensor | slice, features: dict[str, Tensor], labels: Tensor) -> None:
        """Put rows in ``slots``: ``features[name]`` and ``labels`` hold one row per slot."""
        if labels.shape[0] == 0:
            return
        for name, values in features.items():
            if name not in self._features:
                self._features[name] = values.new_zeros(self.capacity, *values.shape[1:])
            self._features[name][index_on(slots, values.device)] = values
        if self._labels is None:
            self._labels = labels.new_zeros(self.capacity, *labels.shape[1:])
        self._labels[index_on(slots, labels.device)] = labels

    def features(self, name: str) -> Tensor | None:
        """The kept rows of ``name`` (``None``: none stored)."""
        values = self._features.get(name)
        return None if values is None else values[: self.count]

    def labels(self) -> Tensor | None:
        """The kept rows' labels (``None``: none stored)."""
        return None if self._labels is None else self._labels[: self.count]

    def drop(self, name: str) -> None:
        """Forget ``name``'s features (they cannot all be had this epoch)."""
        self._features.pop(name, None)


def index_on(index: Tensor | slice, device: torch.device) -> Tensor | slice:
    """``index`` (rows or slots) where it indexes a tensor on ``device``: a slice as it is."""
    return index if isinstance(index, slice) else index.to(device, non_blocking=True)


__all__ = ["CAPACITY", "TrainingReservoir", "index_on"]
