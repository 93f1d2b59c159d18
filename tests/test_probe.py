"""The linear probe: three verdicts, each only when the evidence decides, for every label kind, scored as scikit-learn
and scikit-survival score it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sksurv.metrics import concordance_index_censored

from lightning_mc.analyses.label_kinds import read_labels
from lightning_mc.analyses.probe import linear_probe, modality_features, probe_folds
from lightning_mc.analyses.probe_models import C_GRID, INNER_FOLDS, fit
from lightning_mc.analyses.probe_scores import CV_VARIANCE, Z, auroc_error, concordance_index

from helpers import assert_same_numbers


def _planted(num_samples: int, num_classes: int, strength: float, width: int = 16, seed: int = 0):
    """Labels and features whose first ``num_classes`` columns carry ``strength`` × one-hot(label), plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    features = torch.randn(num_samples, width, generator=generator)
    features[torch.arange(num_samples), labels] += strength
    return features, labels


@pytest.mark.parametrize(("num_samples", "num_classes", "width"), [(1200, 2, 8), (1200, 4, 64), (2000, 10, 32)])
def test_a_pure_noise_modality_with_enough_samples_is_uninformative(num_samples, num_classes, width) -> None:
    features, labels = _planted(num_samples, num_classes, strength=0.0, width=width)
    result = linear_probe(features[:200], labels[:200], train_features=features[200:], train_labels=labels[200:])
    assert result.verdict == "uninformative" and result.high < result.threshold
    assert result.chance == (0.5 if num_classes == 2 else 1 / num_classes)
    assert result.metric == ("AUROC" if num_classes == 2 else "balanced accuracy")
    assert (result.num_train, result.num_val) == (num_samples - 200, 200)
    assert abs(result.score - result.chance) < 0.03


@pytest.mark.parametrize(("num_classes", "strength", "least"), [(2, 1.5, 0.8), (4, 1.5, 0.6), (10, 2.0, 0.5)])
def test_an_informative_modality_is_informative_well_above_chance(num_classes, strength, least) -> None:
    features, labels = _planted(400, num_classes, strength=strength)
    result = linear_probe(features, labels)
    assert result.verdict == "informative" and result.score > least and result.low > result.threshold
    assert (result.num_samples, result.num_features, result.folds) == (400, 16, 5)


@pytest.mark.parametrize("num_samples", [40, 100, 400])
def test_pure_noise_is_called_informative_at_most_5_percent_of_100_seeded_draws(num_samples) -> None:
    informative = 0
    for seed in range(100):
        features, labels = _planted(num_samples, 2, strength=0.0, width=8, seed=seed)
        informative += linear_probe(features, labels).informative
    assert informative <= 5


@pytest.mark.filterwarnings("ignore::FutureWarning")  # scikit-learn 1.9 announces its 1.10 attributes
def test_the_probe_agrees_with_scikit_learns_logistic_regression_cv_fitted_the_same_way() -> None:
    # the digits-like case of the issue: 10 classes, a weak signal, 40 validation and 400 training rows
    features, labels = _planted(440, 10, strength=1.0, width=24, seed=3)
    ours = linear_probe(features[:40], labels[:40], train_features=features[40:], train_labels=labels[40:])
    # the same samples (the probe sorts its rows: any order gives the same score), folds and C grid in scikit-learn
    x, y = features.double().numpy(), labels.numpy()
    order = np.lexsort(np.column_stack([x, y]).T[::-1])
    x, y = x[order], y[order]
    outer = probe_folds(torch.from_numpy(y), "classes", 5, seed=0).numpy()
    inner = probe_folds(torch.from_numpy(y), "classes", INNER_FOLDS, seed=1).numpy()
    search = LogisticRegressionCV(
        Cs=list(C_GRID), cv=[(np.flatnonzero(inner != k), np.flatnonzero(inner == k)) for k in range(INNER_FOLDS)],
        scoring="neg_log_loss", max_iter=1000,
    )  # fmt: skip
    mean, std = x.mean(0), x.std(0)
    search.fit((x - mean) / std, y)
    predicted = np.zeros(len(y), dtype=int)
    for k in range(5):
        train, test = outer != k, outer == k
        mean, std = x[train].mean(0), x[train].std(0)
        model = LogisticRegression(C=float(search.C_[0]), max_iter=1000).fit((x[train] - mean) / std, y[train])
        predicted[test] = model.predict((x[test] - mean) / std)
    theirs = balanced_accuracy_score(y, predicted)
    assert ours.verdict == "informative" and abs(ours.score - theirs) < 0.05


def test_the_logistic_fit_is_scikit_learns_l2_logistic_regression() -> None:
    features, labels = _planted(300, 3, strength=1.0, width=6)
    x = features.double()
    model = fit(x, labels, "classes", c=0.1)
    z = ((x - x.mean(0)) / x.std(0, correction=0)).numpy()
    reference = LogisticRegression(C=0.1, tol=1e-10, max_iter=1000).fit(z, labels.numpy())
    torch.testing.assert_close(model.predict(x), torch.from_numpy(reference.predict_proba(z)), rtol=0, atol=1e-4)


def test_too_few_samples_show_nothing_absent_the_probe_says_undecided_and_how_many_would_decide() -> None:
    features, labels = _planted(40, 2, strength=0.0, seed=2)
    result = linear_probe(features, labels)
    positives = int(labels.sum())
    error = auroc_error(result.score, positives, 40 - positives) * math.sqrt(CV_VARIANCE)
    assert_same_numbers(result.high, min(result.score + Z * error, 1.0))
    assert result.verdict == "undecided" and result.low < result.threshold < result.high
    assert result.samples_to_decide > 40 and f"about {result.samples_to_decide} samples would decide" in (
        result.describe()
    )


def test_a_probe_that_cannot_run_says_why() -> None:
    few = linear_probe(torch.randn(12, 3), torch.arange(12) % 2)
    assert few.verdict == "undecided" and few.reason == "12 samples, fewer than 20"
    one = linear_probe(torch.randn(40, 3), torch.zeros(40, dtype=torch.long))
    assert one.reason == "a single class among the samples" and math.isnan(one.score)
    assert one.describe() == "the probe could not run: a single class among the samples"


def test_a_sample_seen_twice_is_probed_once_and_the_order_of_the_rows_does_not_matter() -> None:
    features, labels = _planted(200, 2, strength=0.0, seed=2)
    once = linear_probe(features[:100], labels[:100], train_features=features[100:], train_labels=labels[100:])
    twice = linear_probe(features, labels, train_features=features, train_labels=labels)  # each row in both sets
    assert twice.num_samples == 200 and (twice.num_train, twice.num_val) == (200, 0)
    assert_same_numbers(once.score, twice.score)  # one row per sample, in one order, however they came
    shuffled = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    assert_same_numbers(linear_probe(features[shuffled], labels[shuffled]).score, once.score)


def _multilabel(num_samples: int, seed: int = 0):
    """Four findings, each the sign of its own feature: every finding's AUROC is near 1; an argmax is meaningless."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_samples, 6, generator=generator)
    return features, (features[:, :4] > 0).long()


def test_multi_hot_labels_are_probed_per_finding_not_argmaxed() -> None:
    features, findings = _multilabel(300)
    assert read_labels(findings).kind == "multilabel"
    result = linear_probe(features, findings)
    assert (result.label_kind, result.metric, result.chance) == ("multilabel", "mean AUROC", 0.5)
    assert result.verdict == "informative" and result.score > 0.95
    noise = linear_probe(torch.randn(1500, 6, generator=torch.Generator().manual_seed(1)), findings.repeat(5, 1))
    assert noise.verdict == "uninformative"


def test_multilabel_mean_auroc_is_scikit_learns_macro_auroc() -> None:
    generator = torch.Generator().manual_seed(0)
    scores, truth = torch.rand(120, 3, generator=generator), (torch.rand(120, 3, generator=generator) > 0.5).double()
    from lightning_mc.analyses.probe_scores import score

    found = score("multilabel", scores.double(), truth)
    assert_same_numbers(found.value, float(roc_auc_score(truth.numpy(), scores.numpy(), average="macro")))


def _survival(num_samples: int, seed: int = 0, signal: float = 1.0):
    """Exponential event times whose hazard is ``exp(signal · x₀)``, censored at random: a linear risk decides."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_samples, 4, generator=generator, dtype=torch.float64)
    event_time = -torch.log(torch.rand(num_samples, generator=generator, dtype=torch.float64)) / torch.exp(
        signal * features[:, 0]
    )
    censor_time = -torch.log(torch.rand(num_samples, generator=generator, dtype=torch.float64)) * 2
    time = torch.minimum(event_time, censor_time)
    return features, torch.stack([time, (event_time <= censor_time).double()], dim=1)


def test_survival_labels_are_probed_by_a_cox_model_and_scored_by_concordance() -> None:
    features, pairs = _survival(300)
    result = linear_probe(features, pairs, label_kind="survival")
    assert (result.label_kind, result.metric, result.chance) == ("survival", "concordance index", 0.5)
    assert result.verdict == "informative" and result.score > 0.65
    noise = linear_probe(torch.randn(1500, 4, generator=torch.Generator().manual_seed(2)), _survival(1500, 3)[1],
                         label_kind="survival")  # fmt: skip
    assert noise.verdict == "uninformative" and abs(noise.score - 0.5) < 0.03
    with pytest.raises(ValueError, match="label_kind='auto' cannot tell what labels= holds: a 2-column tensor"):
        linear_probe(features, pairs)  # [time, event] pairs are not guessed


def test_the_concordance_index_is_scikit_survivals() -> None:
    _, pairs = _survival(200, seed=4)
    risk = torch.randn(200, generator=torch.Generator().manual_seed(5), dtype=torch.float64).round(decimals=1)  # ties
    ours, error = concordance_index(risk, pairs[:, 0], pairs[:, 1], with_error=True)
    theirs = concordance_index_censored(pairs[:, 1].numpy().astype(bool), pairs[:, 0].numpy(), risk.numpy())[0]
    assert_same_numbers(ours, float(theirs))
    assert 0.01 < error < 0.1  # a jackknife error of the order of an AUROC's on 200 samples


def test_a_continuous_target_is_probed_by_ridge_regression_and_a_rank_correlation() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(300, 5, generator=generator)
    age = (50 + 10 * features[:, 0]).round()  # integral floats from about 20 to 80: ambiguous for "auto"
    with pytest.raises(ValueError, match=r"integral floats from .* may be class ids or a continuous target"):
        linear_probe(features, age)
    result = linear_probe(features, age, label_kind="continuous")
    assert (result.metric, result.chance) == ("Spearman correlation", 0.0)
    assert result.verdict == "informative" and result.score > 0.99
    generator.manual_seed(1)
    noise = linear_probe(torch.randn(3000, 5, generator=generator), torch.randn(3000, generator=generator))
    assert noise.label_kind == "continuous" and noise.verdict == "uninformative"


def test_auto_reads_ids_one_hot_multi_hot_and_continuous_values_and_refuses_what_it_cannot_tell() -> None:
    assert read_labels(torch.tensor([2, 0])).kind == "classes"
    assert read_labels(torch.tensor([[0.0, 1.0], [1.0, 0.0]])).values.tolist() == [1, 0]
    assert read_labels(torch.tensor([[1.0], [0.0]])).values.tolist() == [1, 0]
    assert read_labels(torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])).values.tolist() == [2, 0]  # probabilities
    assert read_labels(torch.tensor([[1, 1], [0, 1]])).kind == "multilabel"
    assert read_labels(torch.tensor([0.5, 1.2])).kind == "continuous"
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2\)"):
        read_labels(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="label_kind='classes': labels= selected continuous values"):
        read_labels(torch.tensor([0.5, 1.2]), "classes")
    with pytest.raises(ValueError, match="label_kind='multilabel': labels= must select multi-hot rows"):
        read_labels(torch.tensor([0, 1]), "multilabel")
    with pytest.raises(ValueError, match=r"label_kind='survival': labels= must select \[time, event\] rows"):
        read_labels(torch.tensor([[1.0, 0.5]]), "survival")


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


def test_balanced_accuracy_and_auroc_are_scikit_learns() -> None:
    from lightning_mc.analyses.probe_scores import score

    generator = torch.Generator().manual_seed(4)
    truth = torch.randint(0, 4, (200,), generator=generator)
    probabilities = torch.softmax(torch.randn(200, 4, generator=generator, dtype=torch.float64), dim=1)
    found = score("classes", probabilities, truth)
    assert_same_numbers(found.value, float(balanced_accuracy_score(truth, probabilities.argmax(1))))
    binary = torch.randint(0, 2, (200,), generator=generator)
    two = torch.softmax(torch.randn(200, 2, generator=generator, dtype=torch.float64).round(decimals=1), dim=1)
    assert_same_numbers(score("classes", two, binary).value, float(roc_auc_score(binary, two[:, 1])))
