r"""A linear probe: does one modality alone predict the labels? Three verdicts, each only when the evidence decides.

The contribution shares are label-free: a share near 0 says the network ignores a modality, not why. Gapp et al. tie
the metric to single-modality performance, and that link separates the two reasons: a modality that predicts the
labels on its own but is ignored has been *abandoned* (a collapse); one that does not is *uninformative* on that data
(a pure-noise table, a field that is constant at this site). :func:`linear_probe` asks the question cheaply:

- samples: the validation samples the monitor measured and, where the stopper has them, the training samples of the
  current epoch (a seeded reservoir, :mod:`lightning_mc.callbacks.probe_reservoir`); exact duplicates are dropped, so
  a sample seen twice cannot be fitted in one fold and scored in another. A probe cross-validated inside 40 validation
  samples has almost no power; the training samples the network learns from pass by anyway;
- features: :func:`modality_features` of each sample (the modality's encoder output or its input, flattened; integer
  token ids become a bag of ids; more than :data:`MAX_FEATURES` columns are reduced by a seeded signed feature hash);
- a linear model per label kind (:mod:`lightning_mc.analyses.probe_models`: logistic, one logistic per finding, Cox,
  ridge) with its L2 strength chosen by an inner cross-validation, in :data:`FOLDS`-fold cross-validation (folds
  stratified by class, or by event for survival, drawn from a seeded generator): every sample is predicted once by a
  model fitted without its fold;
- the out-of-fold predictions scored by the kind's score, at chance for any predictor that ignores the features
  (:mod:`lightning_mc.analyses.probe_scores`), with a confidence interval whose each bound is wrong at most 5 % of the
  time;
- the verdict: **informative** when the interval's lower bound clears ``chance + margin``, **uninformative** when its
  upper bound stays under ``chance + margin``, **undecided** otherwise (with the samples that would decide, from the
  interval's width shrinking as ``1 / sqrt(samples)``). Showing absence takes more samples than showing presence: a
  probe short of power says *undecided*, never *uninformative*.

Example:
    >>> generator = torch.Generator().manual_seed(0)
    >>> labels = torch.arange(400) % 2
    >>> informative = labels[:, None] + torch.randn(400, 3, generator=generator)
    >>> result = linear_probe(informative, labels)
    >>> result.metric, result.verdict, result.score > 0.7
    ('AUROC', 'informative', True)
    >>> noise = torch.randn(2000, 3, generator=generator)
    >>> linear_probe(noise, torch.arange(2000) % 2).verdict
    'uninformative'
    >>> linear_probe(noise[:40], labels[:40]).verdict  # too few samples to show absence
    'undecided'
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_mc.analyses.label_kinds import LabelKind, Labels, read_labels
from lightning_mc.analyses.probe_models import INNER_FOLDS, choose_c, fit
from lightning_mc.analyses.probe_scores import Score, score

#: Most feature columns the probe fits; wider features are reduced by a seeded signed feature hash.
MAX_FEATURES = 256
#: Cross-validation folds.
FOLDS = 5
#: Fewest samples the probe decides on (fewer: undecided, saying why).
MIN_SAMPLES = 20
#: Default margin over chance that an informative modality's lower bound must clear.
DEFAULT_MARGIN = 0.05
#: Seed of the feature hash and of the folds.
SEED = 0

Verdict = Literal["informative", "uninformative", "undecided"]


@dataclass(frozen=True)
class ProbeResult:
    """What a linear probe found on one modality.

    Attributes:
        verdict: ``"informative"`` (the lower bound clears ``chance + margin``), ``"uninformative"`` (the upper bound
            stays under it) or ``"undecided"`` (neither, or the probe could not run: ``reason``).
        metric: The score's name (``"AUROC"``, ``"balanced accuracy"``, ``"mean AUROC"``, ``"concordance index"``,
            ``"Spearman correlation"``); ``""`` when the probe could not run.
        score: The cross-validated score (NaN when the probe could not run).
        low: Lower confidence bound of the score (one-sided 95 %).
        high: Upper confidence bound of the score (one-sided 95 %).
        chance: The score of any predictor that ignores the features.
        margin: How far above chance the bounds are compared.
        label_kind: The kind the labels were probed as.
        num_samples: Samples probed (training and validation, duplicates dropped).
        num_train: Of those, training samples.
        num_val: Of those, validation samples.
        num_features: Feature columns fitted (after the hash).
        folds: Cross-validation folds.
        features: What the features are, e.g. ``"input"`` or ``"encoder output ('image_encoder')"``.
        seconds: Time the fits and the scoring took.
        samples_to_decide: Roughly how many samples an undecided probe would need to decide (``None``: decided, or
            the score sits on ``chance + margin``).
        epoch: The epoch of the check that ran the probe (set by the stopper).
        reason: Why the probe could not run (too few samples, one class), or ``None``.
    """

    verdict: Verdict
    metric: str
    score: float
    low: float
    high: float
    chance: float
    margin: float
    label_kind: str
    num_samples: int
    num_train: int
    num_val: int
    num_features: int
    folds: int
    features: str
    seconds: float
    samples_to_decide: int | None = None
    epoch: int | None = None
    reason: str | None = None

    @property
    def informative(self) -> bool:
        """Whether the verdict is informative."""
        return self.verdict == "informative"

    @property
    def decided(self) -> bool:
        """Whether the verdict is informative or uninformative."""
        return self.verdict != "undecided"

    @property
    def threshold(self) -> float:
        """``chance + margin``: the line the bounds are compared with."""
        return self.chance + self.margin

    def describe(self) -> str:
        """The score in words, e.g. ``"balanced accuracy 0.40, 90 % interval [0.33, 0.47] (chance 0.10 ...)"``."""
        if self.reason is not None:
            return f"the probe could not run: {self.reason}"
        samples = (
            f"{self.folds}-fold over {self.num_samples} samples: {self.num_train} training, {self.num_val} validation"
        )
        text = (
            f"{self.metric} {self.score:.2f}, 90 % interval [{self.low:.2f}, {self.high:.2f}] "
            f"(chance {self.chance:.2f} + margin {self.margin:.2f} = {self.threshold:.2f}; {samples})"
        )
        if self.verdict == "undecided":
            more = (
                f"about {self.samples_to_decide} samples would decide"
                if self.samples_to_decide is not None
                else "the score sits on chance + margin: many more samples would be needed"
            )
            text += f"; {more}"
        return text

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


def linear_probe(
    features: Tensor,
    labels: Tensor | Labels,
    *,
    train_features: Tensor | None = None,
    train_labels: Tensor | Labels | None = None,
    label_kind: LabelKind = "auto",
    margin: float = DEFAULT_MARGIN,
    folds: int = FOLDS,
    seed: int = SEED,
    what: str = "input",
) -> ProbeResult:
    """Cross-validated linear probe of ``labels`` on ``features`` (and the training samples), with its verdict.

    Args:
        features: ``(N, D)`` features of the validation samples (:func:`modality_features`).
        labels: Their labels: a tensor (read as ``label_kind``) or :class:`~lightning_mc.analyses.label_kinds.Labels`.
        train_features: ``(M, D)`` features of training samples, probed with the validation ones (``None``: none).
        train_labels: Their labels, of the same kind.
        label_kind: The labels' kind (:func:`~lightning_mc.analyses.label_kinds.read_labels`).
        margin: How far above chance the bounds are compared.
        folds: Cross-validation folds.
        seed: Seed of the folds.
        what: What the features are, for the report.

    Returns:
        The :class:`ProbeResult`; ``"undecided"`` with ``reason`` set when fewer than :data:`MIN_SAMPLES` samples or a
        single class (one value of every finding, no event, a constant target) leave nothing to fit.
    """
    start = time.perf_counter()
    val = labels if isinstance(labels, Labels) else read_labels(labels, label_kind)
    x, y, num_train = _samples(features, val, train_features, train_labels)
    kind, num_samples = val.kind, x.shape[0]
    y, reason = _fit_targets(kind, y)
    num_val = num_samples - int(num_train)
    folds = max(2, min(folds, num_samples // 2))

    def result(verdict: Verdict, found: Score | None, needed: int | None = None, why: str | None = None) -> ProbeResult:
        values = (found.metric, found.value, found.low, found.high, found.chance) if found else ("",) + (math.nan,) * 4
        counts = (num_samples, int(num_train), num_val, x.shape[1], folds, what, time.perf_counter() - start)
        return ProbeResult(verdict, *values, margin, kind, *counts, samples_to_decide=needed, reason=why)

    if reason is None and num_samples < MIN_SAMPLES:
        reason = f"{num_samples} samples, fewer than {MIN_SAMPLES}"
    if reason is not None:
        return result("undecided", None, why=reason)
    outputs = int(y.max()) + 1 if kind == "classes" else None
    predicted = _out_of_fold(x, y, kind, probe_folds(y, kind, folds, seed), outputs, seed)
    found = score(kind, predicted, y)
    if math.isnan(found.value):
        return result("undecided", None, why="the probe's predictions are constant: the features do not vary")
    line = found.chance + margin
    if found.low > line:
        return result("informative", found)
    if found.high < line:
        return result("uninformative", found)
    gap = abs(found.value - line)
    half_width = (found.high - found.low) / 2
    needed = math.ceil(num_samples * (half_width / gap) ** 2) if gap > 1e-9 else None
    return result("undecided", found, needed)


def _samples(
    features: Tensor, labels: Labels, train_features: Tensor | None, train_labels: Tensor | Labels | None
) -> tuple[Tensor, Tensor, int]:
    """The training and validation rows as one float64 set, exact duplicates dropped; and how many are training.

    A duplicate of a training row among the validation rows counts as training (it was fitted on anyway).
    """
    x = features.detach().to("cpu", torch.float64).flatten(1)
    y = labels.values
    num_train = 0
    if train_features is not None and train_features.shape[0] > 0:
        assert train_labels is not None
        train = train_labels if isinstance(train_labels, Labels) else read_labels(train_labels, labels.kind)
        x = torch.cat([train_features.detach().to("cpu", torch.float64).flatten(1), x])
        y = torch.cat([train.values.to(y.dtype), y])
        num_train = train_features.shape[0]
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    rows = torch.cat([x, y.reshape(len(y), -1).double()], dim=1)
    # one row per distinct sample, in the sorted order of the rows: the probe does not depend on the order of its
    # inputs (under DDP the gathered order is the ranks' order, not the dataset's)
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(rows), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(rows)), reduce="amin")
    return x[first], y[first], int((first < num_train).sum())


def _fit_targets(kind: str, y: Tensor) -> tuple[Tensor, str | None]:
    """The targets the models fit (classes re-indexed, findings with one value dropped), or why there is nothing."""
    if kind == "classes":
        classes, y = torch.unique(y, return_inverse=True)
        return y, None if len(classes) > 1 else "a single class among the samples"
    if kind == "multilabel":
        positives = y.sum(0)
        both = (positives > 0) & (positives < y.shape[0])
        return y[:, both], None if bool(both.any()) else "every finding has a single value among the samples"
    if kind == "survival":
        return y, None if float(y[:, 1].sum()) >= 2 else "fewer than two events among the samples"
    return y, None if float(y.std()) > 0 else "the target is constant among the samples"


def probe_folds(y: Tensor, kind: str, folds: int, seed: int) -> Tensor:
    """Each sample's fold: stratified by class (``"classes"``) or by event (``"survival"``), dealt from a seeded order.

    Example:
        >>> probe_folds(torch.tensor([0, 0, 1, 1]), "classes", 2, seed=0).bincount().tolist()
        [2, 2]
    """
    generator = torch.Generator().manual_seed(seed)
    if kind == "classes":
        strata = y
    elif kind == "survival":
        strata = y[:, 1].long()
    else:
        strata = torch.zeros(len(y), dtype=torch.long)
    fold = torch.empty(len(y), dtype=torch.long)
    offset = 0
    for label in range(int(strata.max()) + 1):
        members = torch.nonzero(strata == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        fold[members] = (torch.arange(len(members)) + offset) % folds
        offset += len(members)  # the next stratum starts where this one stopped: folds of equal size
    return fold


def _out_of_fold(x: Tensor, y: Tensor, kind: str, fold: Tensor, outputs: int | None, seed: int) -> Tensor:
    """Each sample predicted by the model fitted without its fold, at the ``C`` an inner cross-validation chose."""
    c = choose_c(x, y, kind, probe_folds(y, kind, INNER_FOLDS, seed + 1), outputs)
    predicted: Tensor | None = None
    model = None
    for k in range(int(fold.max()) + 1):
        test = fold == k
        if not test.any() or test.all():
            continue
        model = fit(x[~test], y[~test], kind, c, outputs, start=model)  # from the previous fold's weights: fewer steps
        values = model.predict(x[test])
        if predicted is None:
            predicted = torch.zeros((len(y), *values.shape[1:]), dtype=values.dtype)
        predicted[test] = values
    assert predicted is not None
    return predicted


__all__ = ["ProbeResult", "Verdict", "linear_probe", "modality_features", "probe_folds"]
