"""Exact modality Shapley values, the public import path kept from 0.1: ``from lightning_mc.shapley import ...``.

The game and its metric live in :mod:`lightning_mc.analyses.shapley`; the measurement function in
:mod:`lightning_mc.functional`.
"""

from lightning_mc.analyses.shapley import ModalityShapley, ShapleyResult
from lightning_mc.functional import modality_shapley

__all__ = ["ModalityShapley", "ShapleyResult", "modality_shapley"]
