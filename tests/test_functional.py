"""Planted truths and invariances of the functional API (and so of the engine and metric beneath it)."""

import pytest
import torch
from torch import Tensor, nn

from lightning_mc import Modality
from lightning_mc.functional import modality_contribution

from helpers import LinearSum


class OnlyReadsA(LinearSum):
    """Three outputs: ``a`` read linearly, ``b``'s branch multiplied by 0."""

    def __init__(self) -> None:
        super().__init__(4, 6, 3, weight_b=0.0)


class WeightedSum(LinearSum):
    """Output = signal(a) + weight * noise_branch(b)."""

    def __init__(self, weight_b: float) -> None:
        super().__init__(4, 6, 2, weight_b=weight_b)


def _batches(sizes=(8, 8, 4), seed: int = 0) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(n, 4, generator=generator), "b": torch.randn(n, 6, generator=generator)} for n in sizes]


def test_a_model_that_ignores_b_gives_shares_one_and_zero_exactly() -> None:
    result = modality_contribution(OnlyReadsA(), _batches(), {"a": "a", "b": "b"}, output_transform="softmax")
    assert result.shares == {"a": 1.0, "b": 0.0}
    assert result.raw["b"] == 0.0
    assert result.raw["a"] > 0.01
    assert result.balance == 0.0


def test_a_pure_noise_modality_with_a_tiny_weight_gets_under_two_percent() -> None:
    torch.manual_seed(3)
    result = modality_contribution(WeightedSum(weight_b=0.005), _batches(), {"a": "a", "b": "b"}, occlusion="zeros")
    assert result.shares["b"] < 0.02
    assert result.shares["a"] > 0.98
    assert result.shares["a"] + result.shares["b"] == pytest.approx(1.0)


def test_dict_and_tuple_batches_give_the_same_numbers() -> None:
    torch.manual_seed(4)
    model = WeightedSum(weight_b=1.0)
    dict_batches = _batches()
    tuple_batches = [(batch["a"], torch.zeros(len(batch["a"])), batch["b"]) for batch in dict_batches]
    from_dicts = modality_contribution(model, dict_batches, {"a": "a", "b": "b"}, output_transform="sigmoid")
    from_tuples = modality_contribution(model, tuple_batches, {"a": 0, "b": 2}, output_transform="sigmoid")
    assert from_tuples.shares == pytest.approx(from_dicts.shares, abs=1e-6)
    assert from_tuples.raw == pytest.approx(from_dicts.raw, abs=1e-6)


@pytest.mark.parametrize("max_batch_size", [1, 3, 7, 20, 1000])
def test_any_max_batch_size_gives_the_same_numbers(max_batch_size: int) -> None:
    torch.manual_seed(5)
    model = WeightedSum(weight_b=0.7)
    batches = _batches()
    unchunked = modality_contribution(model, batches, {"a": "a", "b": "b"}, max_batch_size=10_000)
    chunked = modality_contribution(model, batches, {"a": "a", "b": "b"}, max_batch_size=max_batch_size)
    assert chunked.raw == pytest.approx(unchunked.raw, abs=1e-6)
    assert chunked.shares == pytest.approx(unchunked.shares, abs=1e-6)


def test_batch_size_and_sample_order_do_not_change_the_numbers() -> None:
    torch.manual_seed(6)
    model = WeightedSum(weight_b=0.7)
    (whole,) = _batches(sizes=(20,))
    order = torch.randperm(20)
    shuffled_small = [{key: value[order][i : i + 3] for key, value in whole.items()} for i in range(0, 20, 3)]
    reference = modality_contribution(model, [whole], {"a": "a", "b": "b"}, output_transform="softmax")
    other = modality_contribution(model, shuffled_small, {"a": "a", "b": "b"}, output_transform="softmax")
    assert other.num_samples == reference.num_samples == 20
    assert other.raw == pytest.approx(reference.raw, abs=1e-6)
    assert other.shares == pytest.approx(reference.shares, abs=1e-6)


def test_nested_batches_are_reached_with_getter_and_setter() -> None:
    torch.manual_seed(7)
    model = WeightedSum(weight_b=0.7)
    flat = _batches()
    nested = [{"inputs": {"a": batch["a"]}, "b": batch["b"]} for batch in flat]
    a = Modality("a", getter=lambda batch: batch["inputs"]["a"], setter=lambda batch, t: {**batch, "inputs": {"a": t}})
    from_nested = modality_contribution(model, nested, [a, Modality("b", key="b")])
    from_flat = modality_contribution(model, flat, {"a": "a", "b": "b"})
    assert from_nested.shares == pytest.approx(from_flat.shares, abs=1e-6)


def test_custom_forward_fn_selects_the_prediction_tensor() -> None:
    class DictOutput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = WeightedSum(weight_b=0.5)

        def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
            return {"logits": self.inner(batch["a"], batch["b"]), "aux": torch.zeros(1)}

    model = DictOutput()
    result = modality_contribution(
        model, _batches(), {"a": "a", "b": "b"}, forward_fn=lambda m, batch: m(batch)["logits"]
    )
    direct = modality_contribution(model.inner, _batches(), {"a": "a", "b": "b"})
    assert result.shares == pytest.approx(direct.shares, abs=1e-6)


def test_per_modality_fill_overrides_the_default() -> None:
    model = OnlyReadsA()
    batches = [{"a": torch.ones(4, 4), "b": torch.randn(4, 6)}]
    # a constant-per-sample input has mean == itself: the "mean" fill changes nothing, a zero fill does
    with pytest.warns(UserWarning, match="shares are undefined"):
        mean_fill = modality_contribution(model, batches, [Modality("a", key="a"), Modality("b", key="b")])
    zero_fill = modality_contribution(
        model, batches, [Modality("a", key="a", occlusion="zeros"), Modality("b", key="b")]
    )
    assert mean_fill.raw["a"] == 0.0
    assert zero_fill.raw["a"] > 0.0


def test_model_mode_is_restored_and_batch_untouched() -> None:
    model = WeightedSum(weight_b=1.0).train()
    batches = _batches()
    before = [{key: value.clone() for key, value in batch.items()} for batch in batches]
    modality_contribution(model, batches, {"a": "a", "b": "b"}, occlusion="noise")
    assert model.training
    for batch, original in zip(batches, before):
        for key in batch:
            assert torch.equal(batch[key], original[key])


def test_an_empty_data_iterable_is_an_error() -> None:
    with pytest.raises(ValueError, match="data held no batch"):
        modality_contribution(OnlyReadsA(), [], {"a": "a", "b": "b"})
