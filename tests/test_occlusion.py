"""Fills: what replaces an occluded modality."""

import pytest
import torch

from lightning_mc.core.occlusion import resolve_fill

GENERATOR_SEED = 123


def _fill(spec, value: torch.Tensor) -> torch.Tensor:
    return resolve_fill(spec)(value, torch.Generator().manual_seed(GENERATOR_SEED))


def test_mean_fill_is_the_per_sample_mean() -> None:
    value = torch.tensor([[[1.0, 2.0], [3.0, 6.0]], [[0.0, 0.0], [0.0, 4.0]]])
    assert _fill("mean", value).tolist() == [[[3.0, 3.0], [3.0, 3.0]], [[1.0, 1.0], [1.0, 1.0]]]


def test_zeros_and_a_constant_fill_every_value_in_the_modalitys_dtype() -> None:
    value = torch.randn(3, 4)
    assert torch.equal(_fill("zeros", value), torch.zeros(3, 4))
    assert torch.equal(_fill(-999.0, value), torch.full((3, 4), -999.0))
    assert torch.equal(_fill(7, torch.ones(2, 5, dtype=torch.long)), torch.full((2, 5), 7))


def test_noise_fill_is_seeded_and_leaves_the_global_rng_alone() -> None:
    value = torch.zeros(4, 1000)
    state = torch.get_rng_state()
    first, second = _fill("noise", value), _fill("noise", value)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second)
    assert abs(first.mean().item()) < 0.05
    assert first.std().item() == pytest.approx(1.0, abs=0.05)


def test_permute_fill_shuffles_whole_samples() -> None:
    value = torch.arange(8).view(8, 1).expand(8, 3).contiguous()
    permuted = _fill("permute", value)
    assert sorted(permuted[:, 0].tolist()) == list(range(8))
    assert (permuted == permuted[:, :1]).all()  # rows moved as a whole
    assert not torch.equal(permuted, value)


def test_a_callable_fill_is_applied_as_given_and_fills_keep_bfloat16() -> None:
    value = torch.randn(2, 3, dtype=torch.bfloat16)
    assert torch.equal(_fill(lambda t: t * 0 + 1, value), torch.ones(2, 3, dtype=torch.bfloat16))
    assert _fill("mean", value).dtype == torch.bfloat16
    assert _fill("noise", value).dtype == torch.bfloat16


@pytest.mark.parametrize("spec", ["mean", "noise", 0.5])
def test_float_fills_on_integer_token_ids_are_errors(spec) -> None:
    with pytest.raises(TypeError, match="int64"):
        _fill(spec, torch.ones(2, 5, dtype=torch.long))


def test_a_callable_returning_the_wrong_shape_or_dtype_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"returned shape \(3,\) for a modality of shape \(2, 5\)"):
        _fill(lambda t: torch.zeros(3), torch.ones(2, 5))
    with pytest.raises(TypeError, match=r"returned dtype torch\.float64"):
        _fill(lambda t: t.double(), torch.ones(2, 5))


def test_unknown_fill_names_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="occlusion='blur' is not a known fill; expected one of"):
        resolve_fill("blur")
    with pytest.raises(TypeError, match="is not a fill"):
        resolve_fill([0.0])
