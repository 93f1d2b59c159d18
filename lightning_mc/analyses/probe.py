r"""A linear probe: does one modality, on its own, predict the labels?

The contribution shares are label-free: a share near 0 says the network ignores a modality, not why. Gapp et al. tie
the metric to single-modality performance, and that link separates the two reasons: a modality that predicts the
labels on its own but is ignored has been *abandoned* (a collapse); one that does not is *uninformative* on that data
(a pure-noise table, a field that is constant at this site). :func:`linear_probe` asks the question cheaply:

- features: :func:`modality_features` of each sample (the modality's encoder output or its input, flattened; integer
  token ids become a bag of ids; more than :data:`MAX_FEATURES` columns are reduced by a seeded signed feature hash,
  a random projection that costs one pass over the values and no ``D × k`` matrix);
- a multinomial logistic regression with an L2 penalty (:data:`L2`) on features standardised with each training
  fold's mean and standard deviation, fitted by LBFGS (at most :data:`LBFGS_ITERATIONS` iterations, float64,
  zero start: deterministic);
- :data:`FOLDS`-fold cross-validation, folds stratified by class and drawn from a seeded generator; every sample is
  predicted once by the model fitted without its fold;
- the out-of-fold predictions are scored by AUROC (two classes) or balanced accuracy (more): both are at chance for
  any predictor that ignores the features, whatever the class balance (0.5, and ``1/K`` for ``K`` classes, which is
  also what always predicting the majority class scores);
- the modality is *informative* when the score beats chance by ``margin`` **and** by :data:`Z` standard errors of a
  chance-level score on this many samples (``sqrt((n₀ + n₁ + 1) / (12 n₀ n₁))`` for AUROC,
  ``sqrt(Σₖ (1/K)(1 − 1/K) / nₖ) / K`` for balanced accuracy), so a small validation set cannot confirm a weak
  signal by luck.

Example:
    >>> generator = torch.Generator().manual_seed(0)
    >>> labels = torch.arange(200) % 2
    >>> informative = labels[:, None] + torch.randn(200, 3, generator=generator)
    >>> result = linear_probe(informative, labels)
    >>> result.metric, result.informative, result.score > 0.7
    ('AUROC', True, True)
    >>> linear_probe(torch.randn(200, 3, generator=generator), labels).informative
    False
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: Most feature columns the probe fits; wider features are reduced by a seeded signed feature hash.
MAX_FEATURES = 256
#: Cross-validation folds.
FOLDS = 5
#: L2 penalty on the weights, on the mean cross-entropy of standardised features (``λ/2 · ‖W‖²``).
L2 = 1e-2
#: Most LBFGS iterations per fold.
LBFGS_ITERATIONS = 50
#: Fewest samples the probe decides on (fewer: it reports why it could not).
MIN_SAMPLES = 20
#: Default margin over chance that an informative modality must beat.
DEFAULT_MARGIN = 0.05
#: Standard errors of a chance-level score that an informative modality must beat, too.
Z = 3.0
#: Seed of the feature hash and of the folds.
SEED = 0


@dataclass(frozen=True)
class ProbeResult:
    """What a linear probe found on one modality.

    Attributes:
        metric: ``"AUROC"`` (two classes) or ``"balanced accuracy"``; ``""`` when the probe could not run.
        score: The cross-validated score (NaN when the probe could not run).
        chance: The score of any predictor that ignores the features (0.5, or ``1/K``).
        threshold: The score an informative modality must reach: ``chance + max(margin, Z · standard error)``.
        informative: Whether ``score >= threshold``.
        num_samples: Samples probed.
        num_classes: Classes among them.
        num_features: Feature columns fitted (after the hash).
        folds: Cross-validation folds.
        features: What the features are, e.g. ``"input"`` or ``"encoder output ('image_encoder')"``.
        seconds: Time the fit and the scoring took.
        reason: Why the probe could not decide (too few samples, one class), or ``None``.
    """

    metric: str
    score: float
    chance: float
    threshold: float
    informative: bool
    num_samples: int
    num_classes: int
    num_features: int
    folds: int
    features: str
    seconds: float
    reason: str | None = None

    @property
    def decided(self) -> bool:
        """Whether the probe ran and gave a verdict."""
        return self.reason is None

    def describe(self) -> str:
        """The score in words, e.g. ``"balanced accuracy 0.62 (chance 0.10, needs 0.15; 5-fold, 447 samples)"``."""
        if self.reason is not None:
            return f"the probe could not decide ({self.reason})"
        return (
            f"{self.metric} {self.score:.2f} (chance {self.chance:.2f}, needs {self.threshold:.2f}; {self.folds}-fold, "
            f"{self.num_samples} samples)"
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for a checkpoint."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ProbeResult:
        """The result :meth:`as_dict` gave."""
        return cls(**values)


def modality_features(values: Tensor, max_features: int = MAX_FEATURES, seed: int = SEED) -> Tensor:
    """``(N, D)`` float features of ``N`` samples of a modality (or of its encoder output), ``D <= max_features``.

    Floating values are flattened per sample; integer values (token ids) become a bag of ids, each id counted in
    column ``id % max_features``; more than ``max_features`` columns are hashed into ``max_features`` with a random
    sign each (column ``j`` adds ``±x_j`` to bucket ``h(j)``, ``h`` and the signs drawn from ``seed``): a random
    projection that keeps inner products in expectation, computed in one pass.

    Example:
        >>> modality_features(torch.ones(4, 3, 32, 32)).shape
        torch.Size([4, 256])
        >>> modality_features(torch.tensor([[1, 1, 5]]), max_features=4)
        tensor([[0., 3., 0., 0.]])
    """
    rows, width = values.shape[0], math.prod(values.shape[1:])
    if not values.is_floating_point() and not values.is_complex():
        ids = values.reshape(rows, width).long().remainder(max_features)
        bag = torch.zeros(rows, max_features, device=values.device)
        return bag.scatter_add_(1, ids, torch.ones(ids.shape, device=values.device))
    flat = values.reshape(rows, width).float()
    if width <= max_features:
        return flat
    generator = torch.Generator().manual_seed(seed + width)
    bucket = torch.randint(0, max_features, (width,), generator=generator).to(values.device)
    sign = (torch.randint(0, 2, (width,), generator=generator) * 2 - 1).to(values.device, flat.dtype)
    return torch.zeros(rows, max_features, device=values.device, dtype=flat.dtype).index_add_(1, bucket, flat * sign)


def class_labels(labels: Tensor) -> Tensor:
    """``(N,)`` integer class labels from what a batch holds: class ids, one-hot/probability rows or 0/1 floats.

    Raises:
        ValueError: If the labels are not classes (continuous values, more than two dimensions).

    Example:
        >>> class_labels(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        tensor([1, 0])
    """
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() == 2:
        return labels.argmax(dim=1)
    if labels.dim() != 1:
        raise ValueError(
            f"labels= selected a tensor of shape {tuple(labels.shape)}; the probe needs one class per sample: "
            "class ids (N,), or one-hot rows (N, C)."
        )
    if labels.is_floating_point():
        if not torch.equal(labels, labels.round()):
            raise ValueError(
                "labels= selected continuous values; the probe classifies: pass class ids (a regression target "
                "cannot be probed)."
            )
    return labels.long()


def linear_probe(
    features: Tensor,
    labels: Tensor,
    *,
    margin: float = DEFAULT_MARGIN,
    folds: int = FOLDS,
    seed: int = SEED,
    what: str = "input",
) -> ProbeResult:
    """Cross-validated L2 logistic regression of ``labels`` on ``features``, scored against chance.

    Args:
        features: ``(N, D)`` features (:func:`modality_features`).
        labels: ``(N,)`` class labels (:func:`class_labels`).
        margin: The score must beat chance by this much (and by :data:`Z` standard errors).
        folds: Cross-validation folds (fewer when a class has fewer samples).
        seed: Seed of the folds.
        what: What the features are, for the report.

    Returns:
        The :class:`ProbeResult` (``reason`` set, and not informative, when there are fewer than
        :data:`MIN_SAMPLES` samples or a single class).
    """
    start = time.perf_counter()
    x = features.detach().to("cpu", torch.float64).flatten(1).clone()
    classes, y = torch.unique(labels.detach().cpu(), return_inverse=True)
    counts = torch.bincount(y, minlength=len(classes))
    num_classes, num_samples = len(classes), x.shape[0]
    folds = max(2, min(folds, int(counts.max()) if num_classes else 2))
    metric = "AUROC" if num_classes == 2 else "balanced accuracy"

    def failed(reason: str) -> ProbeResult:
        seconds = time.perf_counter() - start
        return ProbeResult(
            "", math.nan, math.nan, math.nan, False, num_samples, num_classes, x.shape[1], folds, what, seconds, reason
        )

    if num_samples < MIN_SAMPLES:
        return failed(f"{num_samples} samples, fewer than {MIN_SAMPLES}")
    if num_classes < 2:
        return failed(f"a single class among the {num_samples} samples")
    fold = _stratified_folds(y, folds, seed)
    predicted = torch.zeros(num_samples, num_classes, dtype=torch.float64)
    for k in range(folds):
        test = fold == k
        if not test.any() or test.all():
            continue
        mean, std = x[~test].mean(0), x[~test].std(0, correction=0)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        weight, bias = _fit_logistic((x[~test] - mean) / std, y[~test], num_classes)
        predicted[test] = torch.softmax((x[test] - mean) / std @ weight + bias, dim=1)
    if num_classes == 2:
        score, error = _auroc(predicted[:, 1], y), math.sqrt((num_samples + 1) / (12.0 * counts[0] * counts[1]))
        chance = 0.5
    else:
        score, chance = _balanced_accuracy(predicted.argmax(1), y, num_classes), 1.0 / num_classes
        error = math.sqrt(sum(chance * (1 - chance) / int(n) for n in counts)) / num_classes
    threshold = chance + max(margin, Z * error)
    seconds = time.perf_counter() - start
    return ProbeResult(
        metric, score, chance, threshold, score >= threshold, num_samples, num_classes, x.shape[1], folds, what, seconds
    )


def _stratified_folds(y: Tensor, folds: int, seed: int) -> Tensor:
    """Each sample's fold: the samples of each class in a seeded random order, dealt to the folds in turn."""
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(y), dtype=torch.long)
    offset = 0
    for label in range(int(y.max()) + 1):
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        fold[members] = (torch.arange(len(members)) + offset) % folds
        offset += len(members)  # the next class starts where this one stopped: folds of equal size
    return fold


def _fit_logistic(x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Weights and bias of a multinomial logistic regression with penalty ``L2 / 2 · ‖W‖²``, fitted by LBFGS."""
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=LBFGS_ITERATIONS, line_search_fn="strong_wolfe", tolerance_grad=1e-7
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + 0.5 * L2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _auroc(score: Tensor, y: Tensor) -> float:
    """Area under the ROC curve of ``score`` for class 1 (ties count half): the Mann–Whitney statistic."""
    ranks = _average_ranks(score)
    positives = y == 1
    n1, n0 = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks, tied values sharing their mean rank."""
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    return ((ends - counts + 1 + ends) / 2)[inverse]


def _balanced_accuracy(predicted: Tensor, y: Tensor, num_classes: int) -> float:
    """Mean over the classes of the fraction of that class's samples predicted as it."""
    recalls = [float((predicted[y == label] == label).double().mean()) for label in range(num_classes)]
    return sum(recalls) / num_classes


__all__ = ["ProbeResult", "class_labels", "linear_probe", "modality_features"]
