"""Properties that hold for any model and data (hypothesis): ranges, invariances and additivity of the metric."""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_mc.functional import modality_contribution

#: Few examples each: the suite must stay fast; every example is a full measurement on fresh random data.
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WIDTHS = {"a": 3, "b": 4, "c": 2}

pytestmark = pytest.mark.filterwarnings("ignore:Occluding any single modality left every model output unchanged")


class ScaledBranches(nn.Module):
    """``Σ_m scale_m · tanh(W_m x_m)``: modality ``m`` matters in proportion to ``scale_m`` (0: not at all)."""

    def __init__(self, scales: dict[str, float], outputs: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.scales = scales
        self.weights = nn.ParameterDict(
            {name: nn.Parameter(torch.randn(WIDTHS[name], outputs, generator=generator)) for name in scales}
        )

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return sum(self.scales[name] * torch.tanh(batch[name] @ self.weights[name]) for name in self.scales)


@st.composite
def problems(draw):
    """A model, its data (one dict of tensors) and the measurement options."""
    names = ["a", "b", "c"][: draw(st.integers(2, 3))]
    scales = {name: draw(st.sampled_from([0.0, 0.01, 0.5, 1.0, 4.0])) for name in names}
    outputs = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**16))
    size = draw(st.integers(1, 12))
    generator = torch.Generator().manual_seed(seed + 1)
    data = {name: torch.randn(size, WIDTHS[name], generator=generator) for name in names}
    options = {
        "output_transform": draw(st.sampled_from([None, "softmax", "sigmoid"])),
        "occlusion": draw(st.sampled_from(["zeros", "mean", -2.0])),  # per-sample fills: independent of batching
    }
    return ScaledBranches(scales, outputs, seed), data, options


def _measure(model, data: dict[str, Tensor], options, batch_size: int | None = None, order=None, **kwargs):
    size = len(next(iter(data.values())))
    batch_size = batch_size or size
    names = order or list(data)
    batches = [{name: value[i : i + batch_size] for name, value in data.items()} for i in range(0, size, batch_size)]
    return modality_contribution(
        model, batches, {name: name for name in names}, forward_fn=lambda m, batch: m(batch), **options, **kwargs
    )


def _close(got: dict[str, float], want: dict[str, float]) -> bool:
    return got.keys() == want.keys() and all(
        (math.isnan(got[k]) and math.isnan(want[k])) or got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6)
        for k in want
    )


@SETTINGS
@given(problems())
def test_shares_lie_in_0_1_and_sum_to_1_or_are_all_nan(problem) -> None:
    model, data, options = problem
    result = _measure(model, data, options)
    shares = list(result.shares.values())
    if any(math.isnan(share) for share in shares):
        assert all(math.isnan(share) for share in shares)
        assert all(raw == 0.0 for raw in result.raw.values())
        assert math.isnan(result.balance)
    else:
        assert all(0.0 <= share <= 1.0 for share in shares)
        assert sum(shares) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 <= result.balance <= 1.0 + 1e-6
    if all(scale == 0.0 for scale in model.scales.values()):
        assert all(math.isnan(share) for share in shares)
    for name, scale in model.scales.items():
        if scale == 0.0:
            # a modality the model does not read contributes nothing, up to float rounding: the same row can give a
            # result 1 ulp apart when BLAS sees it in a batch of another size (clean and occluded copies share calls)
            assert result.raw[name] <= 1e-6


@SETTINGS
@given(problems(), st.integers(1, 12), st.integers(1, 40))
def test_batch_size_and_max_batch_size_change_nothing(problem, batch_size: int, max_batch_size: int) -> None:
    model, data, options = problem
    whole = _measure(model, data, options)
    split = _measure(model, data, options, batch_size=batch_size, max_batch_size=max_batch_size)
    assert split.num_samples == whole.num_samples
    assert _close(split.raw, whole.raw)
    assert _close(split.shares, whole.shares)


@SETTINGS
@given(problems(), st.randoms(use_true_random=False))
def test_sample_order_and_modality_order_change_nothing(problem, rng) -> None:
    model, data, options = problem
    whole = _measure(model, data, options)
    size = len(next(iter(data.values())))
    permutation = torch.tensor(rng.sample(range(size), size))
    names = list(data)
    rng.shuffle(names)
    shuffled = _measure(model, {name: value[permutation] for name, value in data.items()}, options, order=names)
    assert list(shuffled.shares) == names
    assert _close(shuffled.raw, whole.raw)
    assert _close(shuffled.shares, whole.shares)


@SETTINGS
@given(problems(), st.data())
def test_raw_values_are_additive_over_disjoint_splits(problem, draw) -> None:
    model, data, options = problem
    size = len(next(iter(data.values())))
    assume(size >= 2)
    cut = draw.draw(st.integers(1, size - 1))
    whole = _measure(model, data, options)
    first = _measure(model, {name: value[:cut] for name, value in data.items()}, options)
    second = _measure(model, {name: value[cut:] for name, value in data.items()}, options)
    combined = {name: (first.raw[name] * cut + second.raw[name] * (size - cut)) / size for name in data}
    assert _close(combined, whole.raw)
