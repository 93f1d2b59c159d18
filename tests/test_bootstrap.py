"""Bootstrap confidence intervals of the ratio-of-sums shares."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_mc.bootstrap import bootstrap_share_interval, modality_share_intervals
from lightning_mc.functional import modality_contribution


class Linear2(nn.Module):
    """``2a + b`` on scalar inputs; with a zero fill, ``d_a = 2|a|`` and ``d_b = |b|``."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return 2 * a + b


def _data(seed: int, n: int = 200) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    a = torch.empty(n, 1).exponential_(generator=generator)
    b = torch.empty(n, 1).exponential_(generator=generator)
    return [(a[: n // 2], b[: n // 2]), (a[n // 2 :], b[n // 2 :])]


def test_interval_covers_the_known_share_in_at_least_90_percent_of_seeded_repetitions() -> None:
    # a, b ~ Exp(1): E d_a = 2, E d_b = 1, so the true ratio-of-sums share of a is 2/3
    covered = 0
    repetitions = 100
    for seed in range(repetitions):
        result = modality_share_intervals(
            Linear2(), _data(seed), {"a": 0, "b": 1}, occlusion="zeros", n_boot=400, seed=seed
        )
        covered += result.low["a"] <= 2 / 3 <= result.high["a"]
    assert covered / repetitions >= 0.9, covered


def test_shares_match_modality_contribution_and_bounds_are_ordered() -> None:
    data = _data(7)
    result = modality_share_intervals(Linear2(), data, {"a": 0, "b": 1}, occlusion="zeros", n_boot=300)
    reference = modality_contribution(Linear2(), data, {"a": 0, "b": 1}, occlusion="zeros")
    assert result.shares == pytest.approx(reference.shares, rel=1e-6)
    for name in ("a", "b"):
        assert result.low[name] < result.shares[name] < result.high[name]
    assert result.low["a"] == pytest.approx(1 - result.high["b"], abs=1e-9)  # two shares: mirror images
    assert result.num_samples == 200


def test_seeded_and_capped() -> None:
    data = _data(3)
    first = modality_share_intervals(Linear2(), data, {"a": 0, "b": 1}, occlusion="zeros", n_boot=100, seed=5)
    again = modality_share_intervals(Linear2(), data, {"a": 0, "b": 1}, occlusion="zeros", n_boot=100, seed=5)
    assert first == again
    capped = modality_share_intervals(Linear2(), data, {"a": 0, "b": 1}, occlusion="zeros", max_samples=150)
    assert capped.num_samples == 150


def test_wider_with_fewer_samples_and_higher_coverage() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(2000, 3, generator=generator)
    _, low_small, high_small = bootstrap_share_interval(values[:50], ci=0.9, n_boot=500)
    _, low_big, high_big = bootstrap_share_interval(values, ci=0.9, n_boot=500)
    _, low_99, high_99 = bootstrap_share_interval(values, ci=0.99, n_boot=500)
    assert ((high_small - low_small) > (high_big - low_big)).all()
    assert ((high_99 - low_99) > (high_big - low_big)).all()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="ci="):
        bootstrap_share_interval(torch.ones(3, 2), ci=1.0)
    with pytest.raises(ValueError, match="n_boot="):
        bootstrap_share_interval(torch.ones(3, 2), n_boot=0)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_share_interval(torch.ones(0, 2))
    with pytest.raises(ValueError, match="no batch"):
        modality_share_intervals(Linear2(), [], {"a": 0, "b": 1})
