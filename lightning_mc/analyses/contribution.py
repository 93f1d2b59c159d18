"""The contribution sums behind the shares (Algorithm 1): the analysis every measurement runs."""

from __future__ import annotations

from lightning_mc.analyses.part import Passes
from lightning_mc.core.engine import OccludedOutputs
from lightning_mc.core.metric import ModalityContribution
from lightning_mc.core.result import ContributionResult


class ContributionSums:
    """Owns the :class:`~lightning_mc.ModalityContribution` sums; its result is the one the other analyses fill in.

    Args:
        normalization: How raw values become shares.
    """

    def __init__(self, normalization: str) -> None:
        self.normalization = normalization
        self.metric: ModalityContribution | None = None

    def prepare(self, outputs: OccludedOutputs) -> None:
        """Builds the sums for the outputs' attributes and number of outputs, on their device."""
        metric = ModalityContribution(
            outputs.attribute_names, num_outputs=outputs.clean.shape[1], normalization=self.normalization
        )
        self.metric = metric.to(outputs.clean.device)

    def update(self, passes: Passes) -> None:
        """Adds the one-at-a-time movements."""
        assert self.metric is not None  # prepared
        self.metric.update(passes.outputs.clean, passes.outputs.occluded)

    def reset(self) -> None:
        """Zeroes the sums."""
        if self.metric is not None:
            self.metric.reset()

    def result(self) -> ContributionResult:
        """Shares, raw values, attribute values, per-output shares and counts (reduced across processes)."""
        assert self.metric is not None
        return ContributionResult.from_values(self.metric.compute(), self.metric.attribute_names, self.normalization)
