"""On with a probability transform: a warning when saturated probabilities hide what the occlusions move.

Float32 softmax saturates: with a logit gap above about 17 the top probability is exactly 1.0 and the others
underflow relative to it, so an occlusion that moves the logits by a lot can leave the probabilities bit-identical.
A sample counts as saturated when one of its clean outputs is exactly 1.0 (or, under ``"sigmoid"``, exactly 0.0).
When at least :data:`WARN_FRACTION` of the samples are, the shares come mostly from the others: the warning gives the
fraction and the fix (``output_transform="log_softmax"``, or the logits).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_mc.analyses.options import MeasurementOptions
from lightning_mc.analyses.part import MetricAnalysis, Passes
from lightning_mc.core.outputs import PROBABILITY_TRANSFORMS
from lightning_mc.core.result import ContributionResult
from lightning_mc.core.warn_once import WarnOnce

#: The fraction of saturated samples from which the shares are called into doubt.
WARN_FRACTION = 0.1


class SaturatedSamples(Metric):
    """Counts the samples whose outputs hold an exact 1.0 (or 0.0 with ``zeros``), out of all samples seen.

    Example:
        >>> metric = SaturatedSamples(zeros=False)
        >>> metric.update(torch.tensor([[1.0, 0.0], [0.7, 0.3]]))
        >>> metric.compute().item()
        0.5
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, zeros: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.zeros = zeros
        self.add_state("saturated", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, clean: Tensor) -> None:
        """Add the clean outputs ``(N, C)`` of a batch."""
        hits = clean == 1.0
        if self.zeros:
            hits |= clean == 0.0
        self.saturated += hits.any(dim=-1).sum()
        self.total += clean.shape[0]

    def compute(self) -> Tensor:
        """The fraction of saturated samples (0 without samples)."""
        return self.saturated / self.total.clamp_min(1)


class SaturationCheck(MetricAnalysis):
    """Warns (once per measurement object) when many samples' probabilities are saturated.

    Args:
        output_transform: The named probability transform (``"softmax"``, ``"softmax:1"``, ... or ``"sigmoid"``).
    """

    def __init__(self, output_transform: str) -> None:
        self.output_transform = output_transform
        self.metric = SaturatedSamples(zeros=output_transform == "sigmoid")
        self._warn = WarnOnce()

    @classmethod
    def from_options(cls, options: MeasurementOptions, modality_names: tuple[str, ...]) -> SaturationCheck | None:
        """Built when ``output_transform`` names a probability transform."""
        transform = options.output_transform
        return cls(transform) if isinstance(transform, str) and transform in PROBABILITY_TRANSFORMS else None

    def update(self, passes: Passes) -> None:
        """Counts the batch's saturated samples."""
        self.metric.update(passes.outputs.clean[: passes.num_samples])

    def write(self, result: ContributionResult) -> ContributionResult:
        """Warns when at least :data:`WARN_FRACTION` of the samples were saturated; the result is unchanged."""
        fraction = float(self.metric.compute())
        if fraction >= WARN_FRACTION:
            self._warn("saturated", self.message(fraction, any(share != share for share in result.shares.values())))
        return result

    def message(self, fraction: float, shares_are_nan: bool) -> str:
        """The warning for ``fraction`` saturated samples."""
        fix = (
            "output_transform=None (the logits)"
            if self.output_transform == "sigmoid"
            else (
                f"output_transform={self.output_transform.replace('softmax', 'log_softmax')!r} (log-probabilities keep "
                "the differences) or None (the logits)"
            )
        )
        consequence = (
            "every share is NaN for this reason" if shares_are_nan else "the shares come mostly from the other samples"
        )
        return (
            f"{fraction:.0%} of the samples have saturated outputs under output_transform={self.output_transform!r} "
            "(a probability of exactly 1.0 or 0.0 in float32): an occlusion that moves their logits leaves their "
            f"probabilities unchanged, so {consequence}. Use {fix}."
        )


__all__ = ["WARN_FRACTION", "SaturatedSamples", "SaturationCheck"]
