"""lightning-mc: measure each input modality's contribution while a multimodal model trains."""

from lightning_mc.callback import ModalityContributionMonitor
from lightning_mc.early_stopping import CollapseEarlyStopping
from lightning_mc.metric import ModalityContribution
from lightning_mc.modality import Modality
from lightning_mc.result import ContributionResult
from lightning_mc.shapley import ModalityShapley, ShapleyResult

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
