"""One analysis of a measurement: the options it checks, the passes it reads, the accumulator it owns, what it writes.

:class:`~lightning_mc.ContributionMeasurement` keeps one :class:`Analysis` per enabled option, runs the coalitions
their :meth:`~Analysis.coalitions` ask for together with the one-at-a-time copies (as few copies as possible), hands
every analysis the same :class:`Passes` and lets each write its fields of the :class:`~lightning_mc.ContributionResult`.
A new analysis is one module with a subclass and one line in ``lightning_mc.measurement.ANALYSES``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import Tensor
from torchmetrics import Metric

from lightning_mc.analyses.options import MeasurementOptions
from lightning_mc.core.engine import OccludedOutputs
from lightning_mc.core.metric import per_sample_values
from lightning_mc.core.modality import Batch
from lightning_mc.core.result import ContributionResult

#: Sums a tensor over processes: a collective every process calls with a tensor of the same shape.
Reduce = Callable[[Tensor], Tensor]


@dataclasses.dataclass
class Passes:
    """The model outputs of one batch, read by every analysis (derived values are computed once, on first use).

    Attributes:
        outputs: Clean outputs, one-at-a-time occlusions (per attribute) and the coalitions the analyses asked for.
        batch: The batch (for what an analysis reads from it, e.g. targets).
        num_samples: How many of the batch's first samples count (the rest repeat samples counted elsewhere).
    """

    outputs: OccludedOutputs
    batch: Batch
    num_samples: int
    _per_sample: Tensor | None = dataclasses.field(default=None, repr=False)

    def coalition(self, members: frozenset[int]) -> Tensor:
        """``(N, C)``: the outputs with every modality in ``members`` (indices) occluded whole at once."""
        assert members in self.outputs.coalitions, "an analysis read a coalition it did not ask for in coalitions()"
        return self.outputs.coalitions[members]

    @property
    def per_sample(self) -> Tensor:
        """``(N, M)`` float64 per-sample raw values (:func:`~lightning_mc.core.metric.per_sample_values`)."""
        if self._per_sample is None:
            self._per_sample = per_sample_values(self.outputs.clean, self.outputs.occluded)
        return self._per_sample

    def first(self, count: int) -> Passes:
        """The passes of the first ``count`` samples only."""
        return Passes(self.outputs.first(count), self.batch, count)


class Analysis:
    """One part of a measurement: built from the options when they ask for it, fed every batch, written once.

    Subclasses implement :meth:`from_options` (which checks the options the analysis owns, whether it is enabled or
    not), :meth:`prepare`, :meth:`update`, :meth:`reset` and :meth:`write`, name the passes they read besides the clean
    and one-at-a-time outputs in :meth:`coalitions`, and may give an opinion in :meth:`converged`.
    """

    #: Whether :meth:`write` reduces across processes (set by the measurement before each write); an analysis that
    #: keeps torchmetrics metrics gets them synced instead (:meth:`metrics`).
    sync: bool = False

    @classmethod
    def from_options(cls, options: MeasurementOptions, modality_names: tuple[str, ...]) -> Analysis | None:
        """Check the options this analysis owns; the analysis they ask for, or ``None`` when they do not.

        Raises:
            ValueError: On an invalid option of this analysis (the message names it and what is valid).
            TypeError: On an option of the wrong type.
        """
        raise NotImplementedError

    def coalitions(self) -> tuple[frozenset[int], ...]:
        """The coalitions of whole modalities (sets of modality indices) whose outputs this analysis reads.

        The measurement runs the union of every analysis's coalitions once per batch (:meth:`Passes.coalition`); a
        single modality measured whole costs nothing extra (its one-at-a-time copy is the coalition's).
        """
        return ()

    def prepare(self, outputs: OccludedOutputs) -> None:
        """Build the accumulator for batches like ``outputs`` (their attributes, outputs and device), before the first.

        Called again only when a new measurement's batches differ; the accumulator is otherwise reset and reused.
        """
        raise NotImplementedError

    def update(self, passes: Passes) -> None:
        """Add one batch."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget every batch added so far (the accumulator is kept)."""
        raise NotImplementedError

    def write(self, result: ContributionResult) -> ContributionResult:
        """``result`` with this analysis's fields filled in (reduced across processes)."""
        raise NotImplementedError

    def metrics(self) -> tuple[Metric, ...]:
        """The torchmetrics metrics this analysis accumulates in (the measurement sets their process syncing)."""
        return ()

    def converged(self, reduce: Reduce | None = None) -> bool | None:
        """Whether enough batches were added for this analysis (``None``: no opinion; it never stops a measurement).

        Args:
            reduce: Sums a tensor across processes (one collective, which every process must call); ``None``: decide
                on this process's batches, with no collective.
        """
        return None


class MetricAnalysis(Analysis):
    """An analysis whose accumulator is one torchmetrics ``Metric`` (its ``metric``), built in ``__init__``."""

    metric: Metric

    def prepare(self, outputs: OccludedOutputs) -> None:
        """Moves the metric's states to the outputs' device."""
        self.metric = self.metric.to(outputs.clean.device)

    def reset(self) -> None:
        """Resets the metric's states."""
        self.metric.reset()

    def metrics(self) -> tuple[Metric, ...]:
        """The one metric."""
        return (self.metric,)
