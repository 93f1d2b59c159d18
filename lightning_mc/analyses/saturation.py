"""On with a probability transform: a warning when saturated probabilities hide what the occlusions move.

Float32 softmax saturates: with a logit gap above about 17 the top probability is exactly 1.0 and the others
underflow relative to it, so an occlusion that moves the logits by a lot can leave the probabilities bit-identical.
A sample counts as saturated when one of its clean outputs is exactly 1.0 (or, under ``"sigmoid"``, exactly 0.0).
When at least :data:`WARN_FRACTION` of the samples are, the shares come mostly from the others: the warning gives the
fraction and the fix (``output_transform="log_softmax"``, or the logits).
"""

from __future__ import annotations

import torch
import torch.distributed
from torch import Tensor

from lightning_mc.analyses.options import MeasurementOptions
from lightning_mc.analyses.part import Analysis, Passes
from lightning_mc.core.engine import OccludedOutputs
from lightning_mc.core.outputs import PROBABILITY_TRANSFORMS
from lightning_mc.core.result import ContributionResult
from lightning_mc.core.warn_once import WarnOnce

#: The fraction of saturated samples from which the shares are called into doubt.
WARN_FRACTION = 0.1


class SaturationCheck(Analysis):
    """Warns (once per measurement object) when many samples' probabilities are saturated.

    Two counters, not a torchmetrics ``Metric`` (building one per measurement cost more than its batches' updates):
    the saturated samples, a tensor on the outputs' device (no host sync per batch), and the samples seen, an ``int``.

    Args:
        output_transform: The named probability transform (``"softmax"``, ``"softmax:1"``, ... or ``"sigmoid"``).

    Example:
        >>> check = SaturationCheck("softmax")
        >>> check.count(torch.tensor([[1.0, 0.0], [0.7, 0.3]]))
        >>> check.fraction()
        0.5
    """

    def __init__(self, output_transform: str) -> None:
        self.output_transform = output_transform
        self.zeros = output_transform == "sigmoid"
        #: Saturated samples so far (on the outputs' device), and all samples so far.
        self.saturated, self.total = torch.zeros((), dtype=torch.long), 0
        self._warn = WarnOnce()

    @classmethod
    def from_options(cls, options: MeasurementOptions, modality_names: tuple[str, ...]) -> SaturationCheck | None:
        """Built when ``output_transform`` names a probability transform."""
        transform = options.output_transform
        return cls(transform) if isinstance(transform, str) and transform in PROBABILITY_TRANSFORMS else None

    def prepare(self, outputs: OccludedOutputs) -> None:
        """Moves the saturated count to the outputs' device."""
        self.saturated = self.saturated.to(outputs.clean.device)

    def reset(self) -> None:
        """Forgets the counts."""
        self.saturated, self.total = torch.zeros_like(self.saturated), 0

    def update(self, passes: Passes) -> None:
        """Counts the batch's saturated samples."""
        self.count(passes.outputs.clean[: passes.num_samples])

    def count(self, clean: Tensor) -> None:
        """Adds the clean outputs ``(N, C)`` of a batch: the samples whose outputs hold an exact 1.0 (or 0.0)."""
        hits = clean == 1.0
        if self.zeros:
            hits |= clean == 0.0
        self.saturated = self.saturated + hits.any(dim=-1).sum()
        self.total += clean.shape[0]

    def fraction(self) -> float:
        """The fraction of saturated samples (0 without samples), of every process's under :attr:`sync`."""
        counts = torch.stack([self.saturated, torch.tensor(self.total, device=self.saturated.device)])
        if self.sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        saturated, total = counts.tolist()
        return saturated / max(total, 1)

    def write(self, result: ContributionResult) -> ContributionResult:
        """Warns when at least :data:`WARN_FRACTION` of the samples were saturated; the result is unchanged."""
        fraction = self.fraction()
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


__all__ = ["WARN_FRACTION", "SaturationCheck"]
