"""lightning-mc: measure each input modality's contribution while a multimodal model trains.

The package is layered; imports flow one way, from the top of this list to the bottom:

- ``callbacks`` (Lightning glue: :class:`ModalityContributionMonitor`, :class:`CollapseEarlyStopping`) and
  ``functional`` (offline: ``modality_contribution``, ``modality_shapley``): the entry points;
- ``views``: logged keys, the TensorBoard dashboard and figures, drawn from results;
- ``measurement``: :class:`ContributionMeasurement`, the one object every entry point drives;
- ``analyses``: the measurement options, declared once, and the analyses they enable (Shapley values, bootstrap
  intervals, precision, the performance drop);
- ``core``: modalities, fills, attribute masks, the occlusion engine, the metric and its result.

``lightning_mc.masks`` (attribute mask builders) is a public import path too.
"""

from lightning_mc.analyses.shapley import ModalityShapley, ShapleyResult
from lightning_mc.callbacks.balancer import ModalityBalancer
from lightning_mc.callbacks.early_stopping import CollapseEarlyStopping
from lightning_mc.callbacks.monitor import ModalityContributionMonitor
from lightning_mc.core.metric import ModalityContribution
from lightning_mc.core.modality import Modality
from lightning_mc.core.result import ContributionResult, HistoryEntry
from lightning_mc.measurement import ContributionMeasurement

__all__ = [
    "CollapseEarlyStopping",
    "ContributionMeasurement",
    "ContributionResult",
    "HistoryEntry",
    "Modality",
    "ModalityBalancer",
    "ModalityContribution",
    "ModalityContributionMonitor",
    "ModalityShapley",
    "ShapleyResult",
]
__version__ = "0.1.0"
