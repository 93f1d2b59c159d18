"""Which samples of a validation run a monitor measures: its loader, the batch limit, the sampler's padding."""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DistributedSampler


def check_limit_batches(limit_batches: int | float | None) -> None:
    """Raise unless ``limit_batches`` is ``None``, a positive int or a float in ``(0, 1]``.

    Example:
        >>> check_limit_batches(0.5)
    """
    if limit_batches is None:
        return
    if isinstance(limit_batches, bool) or not isinstance(limit_batches, (int, float)):
        raise TypeError(f"limit_batches={limit_batches!r} must be an int, a float in (0, 1] or None.")
    if isinstance(limit_batches, int) and limit_batches < 1:
        raise ValueError(f"limit_batches={limit_batches!r} must be at least 1 (or None for all batches).")
    if isinstance(limit_batches, float) and not 0.0 < limit_batches <= 1.0:
        raise ValueError(f"limit_batches={limit_batches!r} as a fraction must be in (0, 1].")


def batch_limit(limit_batches: int | float | None, trainer: pl.Trainer, dataloader_idx: int) -> float:
    """How many batches of loader ``dataloader_idx`` are measured this run (``math.inf``: all)."""
    if limit_batches is None:
        return math.inf
    if isinstance(limit_batches, int):
        return limit_batches
    available = trainer.num_val_batches[dataloader_idx]
    return max(1, math.ceil(limit_batches * available)) if math.isfinite(available) else math.inf


def unpadded_samples(trainer: pl.Trainer, dataloader_idx: int) -> int | None:
    """Samples of loader ``dataloader_idx`` this process holds before ``DistributedSampler``'s padding (None: none).

    ``DistributedSampler(drop_last=False)`` gives rank ``r`` the samples at padded positions ``r, r + W, r + 2W, ...``
    of the dataset's ``N`` indices followed by repeats of the first ones: this rank's real ones are its first
    ``ceil((N - r) / W)``; the rest repeat samples another rank measures.
    """
    loop = trainer.validate_loop if trainer.state.fn == TrainerFn.VALIDATING else trainer.fit_loop.epoch_loop.val_loop
    combined = getattr(loop, "_combined_loader", None)
    loaders = combined.iterables if combined is not None else trainer.val_dataloaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    sampler = getattr(loaders[dataloader_idx], "sampler", None) if dataloader_idx < len(loaders) else None
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    return max(0, math.ceil((len(sampler.dataset) - sampler.rank) / sampler.num_replicas))


class PaddingTrim:
    """Counts the samples of a validation run and tells how many of the next batch are real (not sampler padding).

    Example:
        >>> trim = PaddingTrim()
        >>> trim.start(10)  # this rank holds 10 real samples, then padding
        >>> trim.advance(8)
        >>> trim.remaining, trim.seen
        (2, 8)
    """

    def __init__(self) -> None:
        self.unpadded: int | None = None
        #: Samples of this run's measured batches so far, padding included.
        self.seen = 0

    def start(self, unpadded: int | None) -> None:
        """A new run with ``unpadded`` real samples on this process (``None``: no padding)."""
        self.unpadded, self.seen = unpadded, 0

    @property
    def remaining(self) -> int | None:
        """Real samples not yet seen (the first ones of the next batch are real), ``None`` without padding."""
        return None if self.unpadded is None else max(0, self.unpadded - self.seen)

    def advance(self, batch_size: int) -> None:
        """Count a measured batch of ``batch_size`` samples."""
        self.seen += batch_size
