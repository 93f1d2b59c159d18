"""No confident wrong number at the edges: each edge case gives the right number, is refused, or warns once naming
the argument and the fix (issue 37).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_mc import Modality, ModalityContributionMonitor
from lightning_mc.functional import modality_contribution

from helpers import LinearSum


def _caught(function) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        function()
    return [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------- two names for one batch item


@pytest.mark.parametrize("forward_fn", [None, lambda model, batch: model(batch["image"], batch["image"][:, :3])])
def test_two_names_for_one_batch_item_are_refused_before_any_batch(forward_fn) -> None:
    batch = {"image": torch.randn(4, 5), "table": torch.randn(4, 3)}
    with pytest.raises(ValueError, match=r"modalities names one batch item twice: 'image' and 'table' both have key="):
        modality_contribution(LinearSum(5, 3, 2), [batch], {"image": "image", "table": "image"}, forward_fn=forward_fn)
    with pytest.raises(ValueError, match=r"'a' and 'b' both have key=0"):
        ModalityContributionMonitor([Modality("a", key=0), Modality("b", key=0, occlusion="mean")])
    # an int index and a str key are different items; getter/setter pairs are not compared
    ModalityContributionMonitor({"a": 0, "b": "0"})
    ModalityContributionMonitor(
        [
            Modality("a", getter=lambda b: b[0][:, :2], setter=lambda b, v: b),
            Modality("b", getter=lambda b: b[0][:, 2:], setter=lambda b, v: b),
        ]
    )
