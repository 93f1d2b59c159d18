"""Our numbers equal two independent computations: a plain per-sample loop and Captum's FeatureAblation."""

import pytest
import torch
from captum.attr import FeatureAblation
from torch import Tensor, nn

from lightning_mc.functional import modality_contribution

from helpers import assert_same_numbers

NAMES = ("image", "table", "text")
NUM_OUTPUTS = 4


class ThreeModalityNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 8))
        self.table = nn.Linear(6, 8)
        self.text = nn.Sequential(nn.Linear(10, 8), nn.Tanh())
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(8, NUM_OUTPUTS))

    def forward(self, image: Tensor, table: Tensor, text: Tensor) -> Tensor:
        return self.head(self.image(image) * self.table(table) + self.text(text))


@pytest.fixture(scope="module")
def model_and_batches() -> tuple[nn.Module, list[dict[str, Tensor]]]:
    torch.manual_seed(1)
    model = ThreeModalityNet().eval()
    batches = [
        {"image": torch.randn(n, 1, 6, 6), "table": torch.randn(n, 6), "text": torch.randn(n, 10), "y": torch.zeros(n)}
        for n in (7, 5)
    ]
    return model, batches


def _probabilities(model: nn.Module, *inputs: Tensor) -> Tensor:
    return model(*inputs).softmax(dim=-1)


def _plain_loop(model: nn.Module, batches: list[dict[str, Tensor]]) -> dict[str, float]:
    """Algorithm 1 written directly: one sample, one occlusion at a time, zero fill."""
    totals = dict.fromkeys(NAMES, 0.0)
    count = 0
    with torch.no_grad():
        for batch in batches:
            for k in range(batch["image"].shape[0]):
                inputs = {name: batch[name][k : k + 1] for name in NAMES}
                clean = _probabilities(model, *inputs.values())
                for name in NAMES:
                    occluded = dict(inputs, **{name: torch.zeros_like(inputs[name])})
                    totals[name] += (clean - _probabilities(model, *occluded.values())).abs().sum().item()
                count += 1
    return {name: total / count for name, total in totals.items()}


def _captum(model: nn.Module, batches: list[dict[str, Tensor]]) -> dict[str, float]:
    """Captum FeatureAblation, one feature group per modality, one target (output) at a time."""
    ablation = FeatureAblation(lambda *inputs: _probabilities(model, *inputs))
    totals = dict.fromkeys(NAMES, 0.0)
    count = 0
    for batch in batches:
        inputs = tuple(batch[name] for name in NAMES)
        masks = tuple(torch.full_like(value[:1], group, dtype=torch.long) for group, value in enumerate(inputs))
        for target in range(NUM_OUTPUTS):
            attributions = ablation.attribute(inputs, baselines=(0.0,) * len(inputs), target=target, feature_mask=masks)
            for name, attribution in zip(NAMES, attributions):
                # every element of a group carries the group's output change; take one element per sample
                totals[name] += attribution.flatten(1)[:, 0].abs().sum().item()
        count += inputs[0].shape[0]
    return {name: total / count for name, total in totals.items()}


def _shares(raw: dict[str, float]) -> dict[str, float]:
    total = sum(raw.values())
    return {name: value / total for name, value in raw.items()}


@pytest.fixture(scope="module")
def ours(model_and_batches):
    model, batches = model_and_batches
    return modality_contribution(
        model, batches, {name: name for name in NAMES}, occlusion="zeros", output_transform="softmax"
    )


def test_raw_and_shares_equal_a_plain_per_sample_loop(model_and_batches, ours) -> None:
    reference = _plain_loop(*model_and_batches)
    assert ours.num_samples == 12
    for name in NAMES:
        assert_same_numbers(ours.raw[name], reference[name], f"raw[{name}]")
        assert_same_numbers(ours.shares[name], _shares(reference)[name], f"shares[{name}]")


def test_raw_and_shares_equal_captum_feature_ablation(model_and_batches, ours) -> None:
    reference = _captum(*model_and_batches)
    for name in NAMES:
        assert_same_numbers(ours.raw[name], reference[name], f"raw[{name}]")
        assert_same_numbers(ours.shares[name], _shares(reference)[name], f"shares[{name}]")
    assert min(ours.shares.values()) > 0.05  # a non-degenerate case: every modality matters
