"""The worked example of Algorithm 1 (tests/data/algorithm1_example.json), every number through the Metric."""

import json
from pathlib import Path

import pytest
import torch

from lightning_mc import ModalityContribution

#: The worked example of Gapp et al.'s Algorithm 1 with every expected number, kept inside the repository.
GOLDEN_PATH = Path(__file__).resolve().parent / "data" / "algorithm1_example.json"

GOLDEN = json.loads(GOLDEN_PATH.read_text())
EXPECTED = GOLDEN["expected"]
MODALITIES = ("image", "tabular")


def _computed(normalization: str, split: bool = False) -> dict[str, torch.Tensor]:
    metric = ModalityContribution({name: ("mask0", "mask1") for name in MODALITIES}, normalization=normalization)
    clean = torch.tensor(GOLDEN["outputs_clean"], dtype=torch.float64)
    occluded = {name: torch.tensor(GOLDEN["outputs_occluded"][name], dtype=torch.float64) for name in MODALITIES}
    metric.set_dtype(torch.float64)
    if split:  # sample by sample: sums are additive over batches
        for k in range(clean.shape[0]):
            metric.update(clean[k : k + 1], {name: value[k : k + 1] for name, value in occluded.items()})
    else:
        metric.update(clean, occluded)
    return metric.compute()


@pytest.mark.parametrize("split", [False, True])
def test_raw_values_and_ratio_of_sums_shares_match_the_worked_example(split: bool) -> None:
    values = _computed("ratio_of_sums", split)
    expected_raw = EXPECTED["raw_per_modality_mean_abs_diff_summed_over_outputs"]
    expected_shares = EXPECTED["share_ratio_of_sums"]
    assert values["raw"].tolist() == pytest.approx([expected_raw[m] for m in MODALITIES], abs=1e-12)
    assert values["shares"].tolist() == pytest.approx([expected_shares[m] for m in MODALITIES], abs=1e-12)
    assert int(values["num_samples"]) == 3


def test_attribute_raw_values_and_shares_match_the_worked_example() -> None:
    values = _computed("ratio_of_sums")
    expected_raw = [v for m in MODALITIES for v in EXPECTED["attribute_raw"][m]]
    expected_shares = [v for m in MODALITIES for v in EXPECTED["attribute_share_of_total"][m]]
    assert values["attribute_raw"].tolist() == pytest.approx(expected_raw, abs=1e-12)
    assert values["attribute_shares"].tolist() == pytest.approx(expected_shares, abs=1e-12)
    per_modality = values["attribute_shares"].view(2, 2).sum(dim=1)
    assert per_modality.tolist() == pytest.approx(values["shares"].tolist(), abs=1e-12)


@pytest.mark.parametrize(
    ("normalization", "expected_key"),
    [
        ("per_sample", "share_per_sample_normalized"),
        ("per_sample_output", "share_mean_of_ratios_per_sample_and_output_skipping_zero_denominators"),
    ],
)
@pytest.mark.parametrize("split", [False, True])
def test_per_sample_normalisations_match_the_worked_example(normalization: str, expected_key: str, split: bool) -> None:
    values = _computed(normalization, split)
    assert values["shares"].tolist() == pytest.approx([EXPECTED[expected_key][m] for m in MODALITIES], abs=1e-12)


def test_balance_is_the_normalised_entropy_of_the_shares() -> None:
    shares = _computed("ratio_of_sums")["shares"]
    expected = -(2 / 3 * torch.log(torch.tensor(2 / 3)) + 1 / 3 * torch.log(torch.tensor(1 / 3))) / torch.log(
        torch.tensor(2.0)
    )
    assert float(_computed("ratio_of_sums")["balance"]) == pytest.approx(float(expected), abs=1e-6)
    assert shares.sum().item() == pytest.approx(1.0)


def test_all_zero_differences_give_nan_shares_a_warning_and_zero_raw_values() -> None:
    metric = ModalityContribution(["a", "b"])
    clean = torch.tensor([[0.3, 0.7], [0.6, 0.4]])
    metric.update(clean, {"a": clean.unsqueeze(1), "b": clean.unsqueeze(1)})
    with pytest.warns(UserWarning, match="shares are undefined"):
        values = metric.compute()
    assert values["raw"].tolist() == [0.0, 0.0]
    assert torch.isnan(values["shares"]).all()
    assert torch.isnan(values["balance"])


def test_per_sample_variants_skip_samples_that_nothing_moved() -> None:
    metric = ModalityContribution(["a", "b"], normalization="per_sample")
    clean = torch.tensor([[1.0], [1.0]])
    # sample 0: only a moves it (share a = 1); sample 1: nothing moves it (skipped, not 0/0)
    metric.update(clean, {"a": torch.tensor([[[0.0]], [[1.0]]]), "b": torch.tensor([[[1.0]], [[1.0]]])})
    assert metric.compute()["shares"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("bad_clean", "bad_occluded"),
    [(float("nan"), 0.0), (float("inf"), 0.0), (float("inf"), float("inf")), (0.0, float("-inf"))],
    ids=["clean-nan", "clean-inf", "both-inf", "occluded-inf"],
)
@pytest.mark.parametrize("normalization", ["ratio_of_sums", "per_sample", "per_sample_output"])
def test_non_finite_samples_are_skipped_counted_and_warned_about(bad_clean, bad_occluded, normalization) -> None:
    metric = ModalityContribution(["a", "b"], normalization=normalization)
    clean = torch.tensor([[1.0], [bad_clean]])
    # sample 1 is the bad one: its non-finite output is in the clean pass, the occluded pass of "b", or both
    metric.update(clean, {"a": torch.tensor([[[0.0]], [[0.0]]]), "b": torch.tensor([[[0.5]], [[bad_occluded]]])})
    with pytest.warns(UserWarning, match="skipped 1 sample"):
        values = metric.compute()
    assert int(values["num_skipped"]) == 1
    assert int(values["num_samples"]) == 1
    assert values["raw"].tolist() == pytest.approx([1.0, 0.5])


@pytest.mark.parametrize("normalization", ["ratio_of_sums", "per_sample", "per_sample_output"])
def test_a_reset_metric_zeroes_its_sums_in_place_and_gives_what_a_fresh_one_gives(normalization: str) -> None:
    clean = torch.tensor(GOLDEN["outputs_clean"], dtype=torch.float32)
    occluded = {name: torch.tensor(GOLDEN["outputs_occluded"][name], dtype=torch.float32) for name in MODALITIES}

    def metric() -> ModalityContribution:
        attributes = {name: ("mask0", "mask1") for name in MODALITIES}
        return ModalityContribution(attributes, num_outputs=clean.shape[1], normalization=normalization)

    reused, fresh = metric(), metric()
    reused.update(clean * 0.5, {name: value.flip(0) for name, value in occluded.items()})  # another batch first
    sums = reused.attribute_diff
    reused.reset()
    reused.update(clean, occluded)
    fresh.update(clean, occluded)

    assert reused.attribute_diff is sums  # zeroed in place, not rebuilt
    for key, value in fresh.compute().items():  # the same computation on the same batch: the same floats
        torch.testing.assert_close(reused.compute()[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    assert int(reused.compute()["num_samples"]) == 3
