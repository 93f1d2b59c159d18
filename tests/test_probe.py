"""The linear probe: at chance on pure noise, well above it on a planted signal, scored as scikit-learn scores it."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from lightning_mc.analyses import probe
from lightning_mc.analyses.probe import L2, Z, class_labels, linear_probe, modality_features

from helpers import assert_same_numbers


def _planted(num_samples: int, num_classes: int, strength: float, width: int = 16, seed: int = 0):
    """Labels and features whose first ``num_classes`` columns carry ``strength`` × one-hot(label), plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    features = torch.randn(num_samples, width, generator=generator)
    features[torch.arange(num_samples), labels] += strength
    return features, labels


@pytest.mark.parametrize(("num_samples", "num_classes", "width"), [(120, 2, 8), (300, 4, 64), (400, 10, 256)])
def test_a_probe_on_a_pure_noise_modality_is_at_chance_on_every_seed(num_samples, num_classes, width) -> None:
    scores = []
    for seed in range(8):
        features, labels = _planted(num_samples, num_classes, strength=0.0, width=width, seed=seed)
        result = linear_probe(features, labels)
        assert not result.informative and result.decided
        assert result.chance == (0.5 if num_classes == 2 else 1 / num_classes)
        assert result.metric == ("AUROC" if num_classes == 2 else "balanced accuracy")
        assert result.threshold >= result.chance + probe.DEFAULT_MARGIN
        scores.append(result.score)
    # held-out folds: no bias above chance (scored on its own training rows the fit reaches 0.63, 0.59 and 1.0 here)
    assert abs(sum(scores) / len(scores) - result.chance) < 0.03


@pytest.mark.parametrize(("num_classes", "strength", "least"), [(2, 1.5, 0.8), (4, 1.5, 0.6), (10, 2.0, 0.5)])
def test_a_probe_on_an_informative_modality_is_well_above_chance(num_classes, strength, least) -> None:
    features, labels = _planted(400, num_classes, strength=strength)
    result = linear_probe(features, labels)
    assert result.informative and result.score > least > result.threshold
    assert (result.num_samples, result.num_classes, result.num_features, result.folds) == (400, num_classes, 16, 5)


def test_the_probe_is_seeded_and_its_scores_are_the_ones_scikit_learn_computes() -> None:
    features, labels = _planted(200, 2, strength=0.8)
    first, again = linear_probe(features, labels), linear_probe(features, labels)
    assert first.score == again.score  # the same rows, the same seed, the same float64 kernels: bit for bit
    scores = torch.randn(200, generator=torch.Generator().manual_seed(3)).round(decimals=1)  # with ties
    assert_same_numbers(probe._auroc(scores.double(), labels), float(roc_auc_score(labels, scores)))
    predicted = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(4))
    truth = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(5))
    assert_same_numbers(probe._balanced_accuracy(predicted, truth, 4), float(balanced_accuracy_score(truth, predicted)))


def test_the_logistic_fit_is_scikit_learns_l2_logistic_regression() -> None:
    features, labels = _planted(300, 3, strength=1.0, width=6)
    x = ((features - features.mean(0)) / features.std(0, correction=0)).double()
    weight, bias = probe._fit_logistic(x, labels, 3)
    # scikit-learn minimises C · Σ loss + ½‖W‖²: the probe's mean loss + L2/2 ‖W‖² is C = 1 / (L2 · N)
    reference = LogisticRegression(C=1.0 / (L2 * len(labels)), tol=1e-10, max_iter=1000).fit(x.numpy(), labels.numpy())
    ours = torch.softmax(x @ weight + bias, dim=1)
    theirs = torch.from_numpy(reference.predict_proba(x.numpy()))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_a_margin_of_three_standard_errors_guards_a_small_validation_set() -> None:
    features, labels = _planted(40, 2, strength=0.0)
    result = linear_probe(features, labels)
    n1 = int(labels.sum())
    error = math.sqrt(41 / (12 * n1 * (40 - n1)))  # a chance-level AUROC's standard error on these classes
    assert_same_numbers(result.threshold, 0.5 + Z * error)
    assert result.threshold > 0.5 + probe.DEFAULT_MARGIN  # on 40 samples, luck alone reaches past the margin


def test_a_probe_that_cannot_decide_says_why() -> None:
    few = linear_probe(torch.randn(12, 3), torch.arange(12) % 2)
    assert not few.decided and not few.informative and "12 samples, fewer than 20" in few.reason
    one = linear_probe(torch.randn(40, 3), torch.zeros(40, dtype=torch.long))
    assert not one.decided and one.reason == "a single class among the 40 samples"
    assert math.isnan(one.score) and "could not decide" in one.describe()


def test_modality_features_flatten_hash_wide_inputs_and_count_token_ids() -> None:
    assert modality_features(torch.ones(3, 2, 4)).shape == (3, 8)
    wide = torch.randn(50, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    hashed = modality_features(wide)
    assert hashed.shape == (50, 256)
    assert torch.equal(hashed, modality_features(wide))  # seeded: the same projection every time
    # signed hashing keeps inner products in expectation: the squared norms agree to a few percent
    ratio = hashed.pow(2).sum() / wide.pow(2).sum()
    assert abs(ratio.item() - 1.0) < 0.1
    ids = torch.tensor([[3, 3, 7, 0], [1, 2, 2, 2]])
    assert modality_features(ids, max_features=4).tolist() == [[1.0, 0.0, 0.0, 3.0], [0.0, 1.0, 3.0, 0.0]]


def test_class_labels_take_ids_one_hot_rows_and_integral_floats_and_refuse_the_rest() -> None:
    assert class_labels(torch.tensor([2, 0])).tolist() == [2, 0]
    assert class_labels(torch.tensor([[0.0, 1.0], [0.9, 0.1]])).tolist() == [1, 0]
    assert class_labels(torch.tensor([[1.0], [0.0]])).tolist() == [1, 0]
    with pytest.raises(ValueError, match="continuous values; the probe classifies"):
        class_labels(torch.tensor([0.5, 1.2]))
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2\)"):
        class_labels(torch.zeros(2, 2, 2))
