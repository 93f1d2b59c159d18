"""The ``check_redundancy`` option: every modality occluded at once; a warning when the modalities look redundant."""

from __future__ import annotations

import dataclasses

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_mc.analyses.options import MeasurementOptions
from lightning_mc.analyses.part import MetricAnalysis, Passes
from lightning_mc.analyses.shapley import AllOccludedMovement, redundancy_message
from lightning_mc.core.result import ContributionResult


class RedundancyCheck(MetricAnalysis):
    """Sums ``v(all)`` and warns (once per measurement object) when the one-at-a-time raw values fall short of it.

    With ``shapley`` too, ``v(all)`` is the one ``ShapleyAnalysis`` (:mod:`lightning_mc.analyses.shapley`) wrote (it
    runs first), so both report the same number.
    """

    def __init__(self, num_modalities: int) -> None:
        self.everything = frozenset(range(num_modalities))
        self.metric = AllOccludedMovement()
        self.warned = False

    @classmethod
    def from_options(cls, options: MeasurementOptions, modality_names: tuple[str, ...]) -> RedundancyCheck | None:
        """Built when ``check_redundancy`` is set."""
        return cls(len(modality_names)) if options.check_redundancy else None

    def coalitions(self) -> tuple[frozenset[int], ...]:
        """Every modality at once."""
        return (self.everything,)

    def update(self, passes: Passes) -> None:
        """Adds the movement with every modality occluded."""
        self.metric.update(passes.outputs.clean, passes.coalition(self.everything))

    def write(self, result: ContributionResult) -> ContributionResult:
        """Fills ``all_occluded_raw`` (unless Shapley values did) and warns when the modalities look redundant."""
        if result.all_occluded_raw is None:
            result = dataclasses.replace(result, all_occluded_raw=float(self.metric.compute()))
        assert result.all_occluded_raw is not None
        message = redundancy_message(result.raw, result.all_occluded_raw)
        if message is not None and not self.warned:
            self.warned = True
            rank_zero_warn(message, category=UserWarning)
        return result
