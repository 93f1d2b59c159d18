r"""How well a probe's out-of-fold predictions fit the labels, per label kind, with a confidence interval.

Each score is at chance for any predictor that ignores the features, whatever the balance of the labels:

- ``"classes"``, two: AUROC (torchmetrics ``binary_auroc``), chance 0.5, Hanley & McNeil's standard error;
- ``"classes"``, ``K > 2``: balanced accuracy (torchmetrics ``multiclass_accuracy``, macro), chance ``1/K``, the
  per-class binomial errors;
- ``"multilabel"``: mean AUROC over the findings with both values (``binary_auroc`` per finding), chance 0.5, the mean
  of the findings' errors (they are correlated through the samples: the mean bounds the error of the mean);
- ``"survival"``: Harrell's concordance index of the risk score (:func:`concordance_index`), chance 0.5, jackknife;
- ``"continuous"``: Spearman's rank correlation (torchmetrics ``spearman_corrcoef``), chance 0, Fisher's z with
  Fieller's variance ``1.06 / (n - 3)``.

The interval is ``score ± Z · standard error`` (Fisher's z back-transformed for the correlation), with :data:`Z` the
one-sided 95 % normal quantile: each bound alone is wrong at most 5 % of the time. The out-of-fold predictions come
from five models, not one, which spreads the score more than the independent-samples errors above say (on pure noise at
40–400 samples the AUROC's variance was 1.4–1.8× Hanley & McNeil's, measured): the AUROC, concordance and
correlation variances are multiplied by :data:`CV_VARIANCE`. The balanced accuracy's per-class binomial error is
already wider than its spread (0.068 against 0.037 at 40 samples of four classes, measured) and is used as it is.

Example:
    >>> y = torch.tensor([0, 0, 1, 1])
    >>> found = score("classes", torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]), y)
    >>> found.metric, found.value, found.chance
    ('AUROC', 1.0, 0.5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics.functional import spearman_corrcoef
from torchmetrics.functional.classification import binary_auroc, multiclass_accuracy

#: One-sided 95 % quantile of the standard normal: the z of each confidence bound.
Z = 1.6448536269514722
#: Variance of a cross-validated score over that of one model's score on independent samples (measured: 1.4–1.8).
CV_VARIANCE = 2.0


@dataclass(frozen=True)
class Score:
    """A probe's score, its confidence interval and the score at chance."""

    metric: str
    value: float
    low: float
    high: float
    chance: float


def score(kind: str, predicted: Tensor, y: Tensor) -> Score:
    """The score of out-of-fold ``predicted`` values against labels ``y`` of ``kind`` (see the module's table)."""
    if kind == "classes":
        return _classes(predicted, y)
    if kind == "multilabel":
        return _multilabel(predicted, y)
    if kind == "survival":
        value, error = concordance_index(predicted, y[:, 0], y[:, 1], with_error=True)
        return _bounded("concordance index", value, error * math.sqrt(CV_VARIANCE), 0.5)
    return _correlation(predicted, y)


def concordance_index(risk: Tensor, time: Tensor, event: Tensor, with_error: bool = False) -> tuple[float, float]:
    """Harrell's concordance index of ``risk`` (higher: earlier event) and, with ``with_error``, its jackknife error.

    A pair is comparable when the sample with the shorter time had the event; it is concordant when that sample has
    the higher risk (tied risks count half). Pairs with tied times are not comparable. torchmetrics has no
    concordance index; this one is tested against scikit-survival's ``concordance_index_censored``.

    Returns:
        ``(C, standard error)``; the error is NaN without ``with_error``.

    Example:
        >>> concordance_index(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 1, 0]))
        (1.0, nan)
    """
    risk, time, event = risk.double(), time.double(), event.bool()
    comparable = (time[:, None] < time[None, :]) & event[:, None]
    agreement = torch.where(risk[:, None] > risk[None, :], 1.0, torch.where(risk[:, None] == risk[None, :], 0.5, 0.0))
    concordant = (agreement * comparable).sum()
    pairs = comparable.sum().double()
    value = float(concordant / pairs) if pairs > 0 else math.nan
    if not with_error or pairs == 0:
        return value, math.nan
    # leave one sample out: drop its row and its column of pairs
    concordant_without = concordant - (agreement * comparable).sum(1) - (agreement * comparable).sum(0)
    pairs_without = pairs - comparable.sum(1) - comparable.sum(0)
    kept = pairs_without > 0
    values = concordant_without[kept] / pairs_without[kept]
    n = int(kept.sum())
    error = math.sqrt((n - 1) / n * float((values - values.mean()).pow(2).sum())) if n > 1 else math.nan
    return value, error


def auroc_error(auroc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil's standard error of an AUROC on ``positives`` and ``negatives`` samples.

    Example:
        >>> round(auroc_error(0.5, 20, 20), 4)  # at chance: sqrt((n0 + n1 + 1) / (12 n0 n1))
        0.0924
    """
    q1, q2 = auroc / (2 - auroc), 2 * auroc**2 / (1 + auroc)
    variance = (auroc * (1 - auroc) + (positives - 1) * (q1 - auroc**2) + (negatives - 1) * (q2 - auroc**2)) / (
        positives * negatives
    )
    return math.sqrt(max(variance, 0.0))


def _classes(predicted: Tensor, y: Tensor) -> Score:
    num_classes = predicted.shape[1]
    if num_classes == 2:
        value = float(binary_auroc(predicted[:, 1], y))
        positives = int(y.sum())
        error = auroc_error(value, positives, len(y) - positives) * math.sqrt(CV_VARIANCE)
        return _bounded("AUROC", value, error, 0.5)
    value = float(multiclass_accuracy(predicted.argmax(1), y, num_classes=num_classes, average="macro"))
    hits = torch.bincount(y[predicted.argmax(1) == y], minlength=num_classes).double()
    counts = torch.bincount(y, minlength=num_classes).double()
    recall = (hits + 1) / (counts + 2)  # smoothed: a class of 3 samples all right is not a recall of certainty
    error = math.sqrt(float((recall * (1 - recall) / counts).sum())) / num_classes
    return _bounded("balanced accuracy", value, error, 1.0 / num_classes)


def _multilabel(predicted: Tensor, y: Tensor) -> Score:
    positives = y.sum(0)
    both = (positives > 0) & (positives < y.shape[0])
    values, errors = [], []
    for finding in torch.nonzero(both).flatten().tolist():
        value = float(binary_auroc(predicted[:, finding], y[:, finding].long()))
        values.append(value)
        errors.append(auroc_error(value, int(positives[finding]), y.shape[0] - int(positives[finding])))
    # the findings' errors are correlated through the samples: their mean bounds the error of the mean from above
    error = sum(errors) / len(errors) * math.sqrt(CV_VARIANCE)
    return _bounded("mean AUROC", sum(values) / len(values), error, 0.5)


def _correlation(predicted: Tensor, y: Tensor) -> Score:
    value = float(spearman_corrcoef(predicted, y))
    n = len(y)
    width = Z * math.sqrt(CV_VARIANCE * 1.06 / max(n - 3, 1))
    centre = math.atanh(max(min(value, 1 - 1e-12), -1 + 1e-12))
    return Score("Spearman correlation", value, math.tanh(centre - width), math.tanh(centre + width), 0.0)


def _bounded(metric: str, value: float, error: float, chance: float) -> Score:
    """The score with its bounds, inside the score's range ``[0, 1]``."""
    return Score(metric, value, max(value - Z * error, 0.0), min(value + Z * error, 1.0), chance)


__all__ = ["CV_VARIANCE", "Score", "Z", "auroc_error", "concordance_index", "score"]
