"""Which samples of a validation run a monitor measures: its loader, the batch limit, the sampler's padding."""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DistributedSampler

from lightning_mc.analyses.options import document_options
from lightning_mc.core.checks import check_int, is_number


def check_limit_batches(limit_batches: int | float | None) -> None:
    """Raise unless ``limit_batches`` is ``None``, a positive int or a float in ``(0, 1]``.

    Example:
        >>> check_limit_batches(0.5)
    """
    if limit_batches is None:
        return
    if not is_number(limit_batches):
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


#: The docs of :class:`CheckSchedule`'s arguments (and the monitor's, which passes them on).
SCHEDULE_DOCS = {
    "every_n_epochs": "Measure on validation runs of every n-th epoch (``(epoch + 1) % n == 0``).",
    "limit_batches": "Validation batches measured per run: an int, a float in ``(0, 1]`` (fraction of "
    "``trainer.num_val_batches``) or ``None`` (all).",
    "dataloader_idx": "Index of the validation dataloader to measure (position in a list, or in a dict's order).",
    "run_on_sanity_check": "Also measure during the sanity check.",
    "run_on_fast_dev_run": "Also measure when the trainer runs with ``fast_dev_run``.",
    "run_on_validate": "Also measure in ``trainer.validate()``; by default only fitting is measured, and "
    "``trainer.validate()`` warns once that it measured nothing. ``trainer.test()`` and ``trainer.predict()`` are "
    "never measured (:func:`~lightning_mc.functional.modality_contribution` measures any loader).",
}


@document_options(docs=SCHEDULE_DOCS, after="Args")
class CheckSchedule:
    """When a monitor measures and on which batches: the epochs, the trainer stages, the loader and its batch limit.

    Args:

    Raises:
        ValueError: If ``every_n_epochs``, ``limit_batches`` or ``dataloader_idx`` is invalid.
        TypeError: If ``limit_batches`` is not a number or ``None``.
    """  # noqa: D414 (the Args come from SCHEDULE_DOCS)

    def __init__(
        self,
        every_n_epochs: int = 1,
        limit_batches: int | float | None = None,
        dataloader_idx: int = 0,
        run_on_sanity_check: bool = False,
        run_on_fast_dev_run: bool = False,
        run_on_validate: bool = False,
    ) -> None:
        check_int("every_n_epochs", every_n_epochs)
        check_limit_batches(limit_batches)
        check_int("dataloader_idx", dataloader_idx, minimum=0)
        self.every_n_epochs, self.limit_batches, self.dataloader_idx = every_n_epochs, limit_batches, dataloader_idx
        self.run_on_sanity_check, self.run_on_fast_dev_run = run_on_sanity_check, run_on_fast_dev_run
        self.run_on_validate = run_on_validate
        #: The sampler padding of the current run.
        self.padding = PaddingTrim()
        #: Whether the current validation run is measured, and whether its measurement is precise enough already.
        self.measuring, self.converged = False, False

    def begin(self, trainer: pl.Trainer) -> bool:
        """A validation run starts: whether it is measured (then the loader is checked and its padding counted)."""
        self.measuring, self.converged = self.should_measure(trainer), False
        if self.measuring:
            self.start(trainer)
        return self.measuring

    def end(self) -> bool:
        """The validation run ends (or fails): whether it was measured."""
        measured, self.measuring = self.measuring, False
        return measured

    def should_measure(self, trainer: pl.Trainer) -> bool:
        """Whether the validation run the trainer starts now is measured."""
        if trainer.sanity_checking:
            return self.run_on_sanity_check
        if trainer.fast_dev_run and not self.run_on_fast_dev_run:
            return False
        if trainer.state.fn == TrainerFn.VALIDATING:
            return self.run_on_validate
        if trainer.state.fn != TrainerFn.FITTING:
            return False
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def start(self, trainer: pl.Trainer) -> None:
        """A measured run starts: check the loader exists and count this process's real samples."""
        if self.dataloader_idx >= len(trainer.num_val_batches):
            raise ValueError(
                f"dataloader_idx={self.dataloader_idx} but the trainer has {len(trainer.num_val_batches)} validation "
                f"dataloader(s); valid: 0..{len(trainer.num_val_batches) - 1}."
            )
        self.padding.start(unpadded_samples(trainer, self.dataloader_idx))

    def measures(self, trainer: pl.Trainer, batch_idx: int, dataloader_idx: int) -> bool:
        """Whether batch ``batch_idx`` of loader ``dataloader_idx`` is measured (none once :attr:`converged`)."""
        if not self.measuring or self.converged or dataloader_idx != self.dataloader_idx:
            return False
        return batch_idx < batch_limit(self.limit_batches, trainer, self.dataloader_idx)

    @property
    def empty_message(self) -> str:
        """The warning of a measured run without a measured batch."""
        return (
            f"ModalityContributionMonitor measured no batch of validation dataloader {self.dataloader_idx} "
            "(the loader is empty or limit_batches excluded every batch); nothing is logged."
        )

    def skips_validate(self, trainer: pl.Trainer) -> bool:
        """Whether this is a ``trainer.validate()`` run that is not measured (``run_on_validate=False``)."""
        return trainer.state.fn == TrainerFn.VALIDATING and not self.run_on_validate and not trainer.sanity_checking

    @property
    def validate_message(self) -> str:
        """The warning of a ``trainer.validate()`` run that is not measured."""
        return (
            "ModalityContributionMonitor does not measure trainer.validate() (run_on_validate=False, the default): "
            "nothing is logged and the history is unchanged. Pass ModalityContributionMonitor(..., "
            "run_on_validate=True) to measure it, or measure a trained model on any loader with "
            "lightning_mc.functional.modality_contribution."
        )

    def loader_is_empty(self, trainer: pl.Trainer) -> bool:
        """Whether the measured loader has no batch (Lightning then runs no validation hook at all)."""
        num_val_batches = trainer.num_val_batches
        return self.dataloader_idx < len(num_val_batches) and num_val_batches[self.dataloader_idx] == 0
