"""Which samples of a validation run a monitor measures: its loader, the batch limit, the sampler's padding.

And what the processes of a distributed run agree on: where a ``tolerance`` decision is reached by all, whether they
hold the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DistributedSampler

from lightning_mc.analyses.options import document_options
from lightning_mc.core.checks import check_int, is_number
from lightning_mc.measurement import ContributionMeasurement

#: Under several processes ``tolerance`` is decided after every ``CHECK_EVERY``-th measured batch (one collective
#: each), not after every batch, and only up to the fewest batches any process measures.
CHECK_EVERY = 8
#: The warning of a distributed run whose processes all measured the same samples.
DUPLICATES_MESSAGE = (
    "ModalityContributionMonitor: all {world_size} processes measured the same validation samples (the measured loader "
    "has no DistributedSampler: Trainer(use_distributed_sampler=False), or a loader built the same on every process); "
    "they are counted once and tolerance decides on one process's samples. Shard the validation set "
    "(use_distributed_sampler=True, the default) to measure {world_size} times as many samples in the same time."
)
#: The warning of a ``tolerance`` that cannot stop a distributed run early.
UNKNOWN_LENGTH_MESSAGE = (
    "ModalityContributionMonitor: tolerance cannot stop this validation run early: some process's validation loader "
    "has no length, so no batch is sure to be reached by every process (a decision there could hang); every batch is "
    "measured. Give the loader a length (a map-style dataset or IterableDataset.__len__) or use limit_batches."
)


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


def measured_sampler(trainer: pl.Trainer, dataloader_idx: int) -> Any:
    """The sampler of validation loader ``dataloader_idx`` as the trainer runs it (``None`` if it has none)."""
    loop = trainer.validate_loop if trainer.state.fn == TrainerFn.VALIDATING else trainer.fit_loop.epoch_loop.val_loop
    combined = getattr(loop, "_combined_loader", None)
    loaders = combined.iterables if combined is not None else trainer.val_dataloaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    return getattr(loaders[dataloader_idx], "sampler", None) if dataloader_idx < len(loaders) else None


def unpadded_samples(trainer: pl.Trainer, dataloader_idx: int) -> int | None:
    """Samples of loader ``dataloader_idx`` this process holds before ``DistributedSampler``'s padding (None: none).

    ``DistributedSampler(drop_last=False)`` gives rank ``r`` the samples at padded positions ``r, r + W, r + 2W, ...``
    of the dataset's ``N`` indices followed by repeats of the first ones: this rank's real ones are its first
    ``ceil((N - r) / W)``; the rest repeat samples another rank measures.
    """
    sampler = measured_sampler(trainer, dataloader_idx)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    return max(0, math.ceil((len(sampler.dataset) - sampler.rank) / sampler.num_replicas))


class SampleFingerprint:
    """An order-free summary of the samples a process measured: equal on two processes that measured the same ones.

    Each sample's values are projected on a fixed pseudo-random vector; the count, the sum and the sum of squares of
    the projections are kept (float64), so the batching and the order of the samples do not matter.

    Example:
        >>> first, second = SampleFingerprint(), SampleFingerprint()
        >>> x = torch.arange(12.0).reshape(6, 2)
        >>> first.add(x)
        >>> second.add(x[3:]); second.add(x[:3])
        >>> torch.allclose(first.value(), second.value())
        True
    """

    def __init__(self) -> None:
        self._sums = torch.zeros(3, dtype=torch.float64)
        self._weights: dict[tuple[int, torch.device], Tensor] = {}

    def reset(self) -> None:
        """Forget every sample."""
        self._sums = torch.zeros(3, dtype=torch.float64)

    def add(self, samples: Tensor) -> None:
        """Add ``samples`` ``(N, ...)`` (any dtype)."""
        if samples.shape[0] == 0:
            return
        rows = samples.detach().reshape(samples.shape[0], -1).float()
        key = (rows.shape[1], rows.device)
        if key not in self._weights:
            generator = torch.Generator().manual_seed(rows.shape[1])
            self._weights[key] = torch.rand(rows.shape[1], generator=generator).to(rows.device) - 0.5
        projections = (rows @ self._weights[key]).double().cpu()
        self._sums += torch.stack([torch.tensor(float(rows.shape[0])), projections.sum(), projections.square().sum()])

    def value(self, device: torch.device | str = "cpu") -> Tensor:
        """``(count, Σ projection, Σ projection²)`` float64 on ``device``."""
        return self._sums.to(device)


class Processes:
    """What the processes of a measured validation run agree on, and the collectives they all reach.

    At the run's start one all-gather of each process's planned batch count and sampler; with ``tolerance`` one
    collective after every :data:`CHECK_EVERY`-th measured batch up to the fewest batches any process runs (every
    process reaches those, so unequal batch counts cannot hang: past the last common check, a process with more
    batches measures them all and the decision is not revisited); at the run's end, without a ``DistributedSampler``,
    one all-gather of the :class:`SampleFingerprint` that tells whether every process measured the same samples. One
    process: no collective at all, and the decision after every batch.
    """

    def __init__(self) -> None:
        self.world_size = 1
        #: The last measured-batch count at which every process decides (0: never; ``math.inf``: one process).
        self.last_check: float = 0
        #: Whether every process draws its samples from a ``DistributedSampler`` (so no two hold the same one).
        self.distinct = True
        #: Whether some process's batch count is unknown (a loader without a length): ``tolerance`` cannot stop early.
        self.unknown_length = False
        #: This process's measured samples.
        self.fingerprint = SampleFingerprint()

    def start(self, trainer: pl.Trainer, planned: float, distributed_sampler: bool, decides: bool) -> None:
        """A measured run starts: this process plans ``planned`` batches (``math.inf``: unknown)."""
        self.world_size, self.unknown_length = trainer.world_size, False
        self.fingerprint.reset()
        if self.world_size == 1:
            self.last_check, self.distinct = (math.inf if decides else 0), True
            return
        local = torch.tensor([planned if math.isfinite(planned) else -1.0, float(distributed_sampler)])
        gathered = trainer.strategy.all_gather(local.to(trainer.strategy.root_device)).reshape(-1, 2).cpu()
        counts = gathered[:, 0]
        self.unknown_length = bool((counts < 0).any())
        self.last_check = 0 if not decides or self.unknown_length else float(counts.min())
        self.distinct = bool((gathered[:, 1] > 0).all())

    def checks_after(self, measured: int) -> bool:
        """Whether every process decides on ``tolerance`` after its ``measured``-th measured batch."""
        if measured > self.last_check:
            return False
        return self.world_size == 1 or measured % CHECK_EVERY == 0 or measured == self.last_check

    def converged(self, trainer: pl.Trainer, measurement: ContributionMeasurement) -> bool:
        """The ``tolerance`` decision, the same on every process (call it where :meth:`checks_after` says).

        With a ``DistributedSampler`` on every process the half-widths are those of the union of their samples (one
        ``all_reduce`` of the sums); otherwise every process must be precise enough on its own samples (they may be the
        same samples: their union would claim a precision it does not have), one ``all_reduce`` of the undecided.
        """
        if self.world_size == 1:
            return measurement.converged
        if self.distinct:
            return measurement.converged_across(lambda sums: _sum_across(trainer, sums))
        undecided = torch.tensor([0.0 if measurement.converged else 1.0], device=trainer.strategy.root_device)
        return not bool(_sum_across(trainer, undecided) > 0)

    def same_samples(self, trainer: pl.Trainer) -> bool:
        """At the run's end: whether every process measured the same samples (only without a ``DistributedSampler``)."""
        if self.world_size == 1 or self.distinct:
            return False
        fingerprints = trainer.strategy.all_gather(self.fingerprint.value(trainer.strategy.root_device)).cpu()
        fingerprints = fingerprints.reshape(-1, 3)
        return bool(fingerprints[0, 0] > 0) and torch.allclose(fingerprints, fingerprints[0].expand_as(fingerprints))


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


def _sum_across(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
    """``tensor`` summed over the processes: one ``all_reduce`` (Lightning's ``strategy.reduce`` adds a barrier)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
        return tensor
    return trainer.strategy.reduce(tensor, reduce_op="sum")


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
        #: What the processes of the current run agree on (:class:`Processes`).
        self.processes = Processes()
        #: Whether the current validation run is measured, and whether its measurement is precise enough already.
        self.measuring, self.converged = False, False

    def begin(self, trainer: pl.Trainer, decides: bool = False) -> bool:
        """A validation run starts: whether it is measured (then the loader is checked and its padding counted).

        ``decides``: whether a ``tolerance`` may stop the run early (then the processes agree where they decide).
        """
        self.measuring, self.converged = self.should_measure(trainer), False
        if self.measuring:
            self.start(trainer, decides)
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

    def start(self, trainer: pl.Trainer, decides: bool = False) -> None:
        """A measured run starts: check the loader exists, count this process's real samples, agree with the others."""
        if self.dataloader_idx >= len(trainer.num_val_batches):
            raise ValueError(
                f"dataloader_idx={self.dataloader_idx} but the trainer has {len(trainer.num_val_batches)} validation "
                f"dataloader(s); valid: 0..{len(trainer.num_val_batches) - 1}."
            )
        self.padding.start(unpadded_samples(trainer, self.dataloader_idx))
        planned = min(batch_limit(self.limit_batches, trainer, self.dataloader_idx), self._available(trainer))
        sampler = isinstance(measured_sampler(trainer, self.dataloader_idx), DistributedSampler)
        self.processes.start(trainer, planned, sampler, decides)

    def _available(self, trainer: pl.Trainer) -> float:
        return float(trainer.num_val_batches[self.dataloader_idx])

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
