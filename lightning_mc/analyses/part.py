"""One analysis of a measurement: the passes it reads, the accumulator it owns, the part of the result it writes.

:class:`~lightning_mc.ContributionMeasurement` keeps one :class:`Analysis` per enabled option, runs the passes their
:attr:`~Analysis.needs` ask for (as few copies as possible), hands every analysis the same :class:`Passes` and lets
each write its fields of the :class:`~lightning_mc.ContributionResult`. A new analysis is one module with a subclass
and one line in ``lightning_mc.measurement.ANALYSES``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar, Literal

from torch import Tensor
from torchmetrics import Metric

from lightning_mc.core.engine import OccludedOutputs
from lightning_mc.core.metric import per_sample_values
from lightning_mc.core.modality import Batch
from lightning_mc.core.result import ContributionResult

if TYPE_CHECKING:
    from lightning_mc.analyses.options import MeasurementOptions

#: Passes beyond the clean outputs and the one-at-a-time occlusions: every modality occluded at once, every
#: coalition of whole modalities (which includes the former and ``"whole"``), each whole modality occluded.
PassName = Literal["all_occluded", "coalitions", "whole"]


@dataclasses.dataclass
class Passes:
    """The model outputs of one batch, read by every analysis (derived values are computed once, on first use).

    Attributes:
        outputs: Clean outputs and one-at-a-time occlusions (per attribute).
        batch: The batch (for what an analysis reads from it, e.g. targets).
        num_samples: How many of the batch's first samples count (the rest repeat samples counted elsewhere).
        coalitions: ``(N, K, C)``: every coalition (``"coalitions"``) or only "all modalities" (``"all_occluded"``),
            the coalition of every modality last.
        whole: ``name -> (N, C)`` with each whole modality occluded (``"whole"``).
    """

    outputs: OccludedOutputs
    batch: Batch
    num_samples: int
    coalitions: Tensor | None = None
    whole: dict[str, Tensor] | None = None
    _per_sample: Tensor | None = dataclasses.field(default=None, repr=False)

    @property
    def all_occluded(self) -> Tensor:
        """``(N, C)``: the outputs with every modality occluded at once (``"all_occluded"`` or ``"coalitions"``)."""
        assert self.coalitions is not None, "an analysis read all_occluded without asking for it in needs"
        return self.coalitions[:, -1]

    @property
    def per_sample(self) -> Tensor:
        """``(N, M)`` float64 per-sample raw values (:func:`~lightning_mc.core.metric.per_sample_values`)."""
        if self._per_sample is None:
            self._per_sample = per_sample_values(self.outputs.clean, self.outputs.occluded)
        return self._per_sample

    def first(self, count: int) -> Passes:
        """The passes of the first ``count`` samples only."""
        outputs = self.outputs
        return Passes(
            OccludedOutputs(
                outputs.clean[:count],
                {name: value[:count] for name, value in outputs.occluded.items()},
                outputs.attribute_names,
            ),
            self.batch,
            count,
            None if self.coalitions is None else self.coalitions[:count],
            None if self.whole is None else {name: value[:count] for name, value in self.whole.items()},
        )


class Analysis:
    """One part of a measurement: built from the options when they ask for it, fed every batch, written once.

    Subclasses set :attr:`needs`, implement :meth:`from_options`, :meth:`prepare`, :meth:`update`, :meth:`reset` and
    :meth:`write`, and may give an opinion in :meth:`converged`.
    """

    #: The passes this analysis reads besides the clean and one-at-a-time outputs.
    needs: ClassVar[frozenset[PassName]] = frozenset()

    @classmethod
    def from_options(cls, options: MeasurementOptions, modality_names: tuple[str, ...]) -> Analysis | None:
        """The analysis the options ask for, or ``None`` when they do not."""
        raise NotImplementedError

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

    def converged(self) -> bool | None:
        """Whether enough batches were added for this analysis (``None``: no opinion; it never stops a measurement)."""
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
