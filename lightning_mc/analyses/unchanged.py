"""Always on: a warning when a modality's (or an attribute's) occlusion changed no input in a whole measurement.

Rows whose occluded input equals the clean input are never run (:mod:`~lightning_mc.core.changed_rows`):
they contribute exactly 0. When that holds for every sample of a measurement, the modality's raw value is 0 by
construction, not because the model ignores it, and the user is told why: ``"permute"`` on batches of one sample is
the identity; a fill equal to the data (``"zeros"`` on an all-zero input) changes nothing either.
"""

from __future__ import annotations

import torch

from lightning_mc.analyses.options import MeasurementOptions
from lightning_mc.analyses.part import Analysis, Passes
from lightning_mc.core.engine import OccludedOutputs
from lightning_mc.core.result import ContributionResult
from lightning_mc.core.warn_once import WarnOnce

#: Attributes named in one warning at most.
_NAMED = 5


class UnchangedOcclusions(Analysis):
    """Tracks, per attribute, whether its occlusion changed any input; warns once per modality when none did.

    Args:
        modality_names: The measured modalities, in order.
    """

    def __init__(self, modality_names: tuple[str, ...]) -> None:
        self.modality_names = modality_names
        self.changed: dict[str, torch.Tensor] = {}
        self.largest_batch = 0
        self._warn = WarnOnce()

    @classmethod
    def from_options(cls, options: MeasurementOptions, modality_names: tuple[str, ...]) -> UnchangedOcclusions:
        """Always built: it reads nothing the engine does not give anyway."""
        return cls(modality_names)

    def prepare(self, outputs: OccludedOutputs) -> None:
        """Nothing to build: the flags live on the CPU."""

    def update(self, passes: Passes) -> None:
        """Keeps, per attribute, the most it did: changed an input (1), covered input only (0), covered nothing (-1)."""
        outputs = passes.outputs
        self.largest_batch = max(self.largest_batch, outputs.batch_size)
        for name, changed in outputs.changed.items():
            kept = self.changed.get(name)
            if kept is None or kept is changed:  # a layout's plan gives every batch where all ran the same flags
                self.changed[name] = changed
            else:
                self.changed[name] = torch.maximum(kept, changed)

    def reset(self) -> None:
        """Forgets the flags (the warnings already given stay given)."""
        self.changed, self.largest_batch = {}, 0

    def write(self, result: ContributionResult) -> ContributionResult:
        """Warns (once per modality) about occlusions that changed no input; the result is unchanged."""
        for name in self.modality_names:
            if name not in self.changed:
                continue
            flags = self.changed[name]
            unchanged = [a for a, flag in zip(result.attribute_raw[name], flags.tolist()) if flag == 0]
            if not unchanged:
                continue
            self._warn(name, self._message(name, unchanged, len(flags), bool((flags == 1).any())))
        return result

    def _message(self, name: str, unchanged: list[str], num_attributes: int, some_changed: bool) -> str:
        what = f"modality {name!r}" if num_attributes == 1 else _attributes(name, unchanged)
        if self.largest_batch == 1:
            cause = (
                "every batch had one sample, and 'permute' on one sample is the identity (so is any fill equal to "
                "the data)"
            )
            fix = "Use validation batches of at least 2 samples with 'permute', or another fill ('mean', 'zeros')"
        else:
            cause = "the fill equals the data there (e.g. 'zeros' on an input that is already all zeros)"
            fix = "Check the modality's data, or give it another fill (Modality(..., occlusion=...))"
        share = "its raw value is exactly 0" if num_attributes == 1 or not some_changed else "they contribute exactly 0"
        return f"Occluding {what} changed no input in this measurement: {cause}; {share}, not a measured 0. {fix}."


def _attributes(name: str, unchanged: list[str]) -> str:
    listed = ", ".join(map(repr, unchanged[:_NAMED])) + (
        f" and {len(unchanged) - _NAMED} more" if len(unchanged) > _NAMED else ""
    )
    return f"attribute(s) {listed} of modality {name!r}"


__all__ = ["UnchangedOcclusions"]
