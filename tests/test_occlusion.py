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


def _measure_in_a_spawned_process(measurement: object, batch: tuple, shares: object) -> None:
    measurement.reset(check=5)
    measurement.update(_SpawnModel(), batch)
    shares.put(measurement.compute().shares)


class _SpawnModel(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.stack([a.sum(1), 2 * b.sum(1)], dim=1)


def test_a_measurement_that_drew_random_fills_crosses_to_a_spawned_process_and_draws_the_same() -> None:
    from lightning_mc import ContributionMeasurement

    batch = (torch.randn(6, 3, generator=torch.Generator().manual_seed(1)), torch.randn(6, 2))
    measurement = ContributionMeasurement({"a": 0, "b": 1}, occlusion="noise")
    measurement.reset(check=5)
    measurement.update(_SpawnModel(), batch)  # the fills' generators now exist: they must not travel
    here = measurement.compute().shares
    context = torch.multiprocessing.get_context("spawn")
    shares = context.Queue()
    process = context.Process(target=_measure_in_a_spawned_process, args=(measurement, batch, shares))
    process.start()
    process.join(100)  # a hang fails instead of stalling the suite
    if process.is_alive():
        process.kill()

    assert process.exitcode == 0
    there = shares.get(timeout=5)
    assert there.keys() == here.keys()
    assert all(abs(there[name] - here[name]) < 1e-6 for name in here)  # the same draws: seed, check and batch
