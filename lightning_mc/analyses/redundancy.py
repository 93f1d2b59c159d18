"""The ``check_redundancy`` option: every modality occluded at once; a warning when the modalities look redundant."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_mc.analyses.part import MetricAnalysis, Passes
from lightning_mc.analyses.shapley import AllOccludedMovement, redundancy_message
from lightning_mc.core.result import ContributionResult

if TYPE_CHECKING:
    from lightning_mc.analyses.options import MeasurementOptions


class RedundancyCheck(MetricAnalysis):
    """Sums ``v(all)`` and warns (once per measurement object) when the one-at-a-time raw values fall short of it.

    With ``shapley`` too, ``v(all)`` is the one ``ShapleyAnalysis`` (:mod:`lightning_mc.analyses.shapley`) wrote (it
    runs first), so both report the same number.
    """

    needs = frozenset({"all_occluded"})

    def __init__(self) -> None:
        self.metric = AllOccludedMovement()
        self.warned = False

    @classmethod
    def from_options(cls, options: MeasurementOptions, modality_names: tuple[str, ...]) -> RedundancyCheck | None:
        """Built when ``check_redundancy`` is set."""
        return cls() if options.check_redundancy else None

    def update(self, passes: Passes) -> None:
        """Adds the movement with every modality occluded."""
        self.metric.update(passes.outputs.clean, passes.all_occluded)

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
