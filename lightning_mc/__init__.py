"""lightning-mc: measure each input modality's contribution while a multimodal model trains."""

from lightning_mc.callbacks.monitor import ModalityContributionMonitor
from lightning_mc.callbacks.early_stopping import CollapseEarlyStopping
from lightning_mc.core.metric import ModalityContribution
from lightning_mc.core.modality import Modality
from lightning_mc.core.result import ContributionResult
from lightning_mc.analyses.shapley import ModalityShapley, ShapleyResult

__all__ = [
    "CollapseEarlyStopping",
    "ContributionResult",
    "Modality",
    "ModalityContribution",
    "ModalityContributionMonitor",
    "ModalityShapley",
    "ShapleyResult",
]
__version__ = "0.1.0"
