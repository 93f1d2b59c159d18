r"""The linear models a collapse probe fits, one per label kind, each with an L2 penalty in scikit-learn's terms.

Every model minimises ``C · Σᵢ lossᵢ + ½ ‖W‖²`` (scikit-learn's ``LogisticRegression(C=...)``; the bias is not
penalised), computed as the mean loss plus ``‖W‖² / (2 C n)``, on features standardised with the fitting rows' mean and
standard deviation:

- ``"classes"``: multinomial logistic regression (cross-entropy), predicting class probabilities;
- ``"multilabel"``: one logistic regression per finding (binary cross-entropy), predicting each finding's probability;
- ``"survival"``: a Cox model (Breslow's partial likelihood), predicting a linear risk score;
- ``"continuous"``: ridge regression (squared error, solved in closed form), predicting the target.

The iterative ones use LBFGS in float64 from a zero start (or a given model's weights): deterministic. :func:`choose_c`
picks ``C`` from :data:`C_GRID` by a cross-validation of the held-out loss.

Example:
    >>> x = torch.randn(60, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> y = (x[:, 0] > 0).long()
    >>> model = fit(x, y, "classes", c=1.0)
    >>> float(((model.predict(x)[:, 1] > 0.5).long() == y).double().mean()) > 0.9
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional

#: The inverse L2 strengths an inner cross-validation chooses from (scikit-learn's ``C``).
C_GRID = (1e-3, 1e-2, 1e-1, 1.0)
#: Folds of the inner cross-validation that chooses ``C``.
INNER_FOLDS = 3
#: Most LBFGS iterations per fit.
LBFGS_ITERATIONS = 50


@dataclass(frozen=True)
class LinearModel:
    """A fitted linear probe: standardisation, weights and bias, and the label kind it predicts."""

    kind: str
    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor

    def predict(self, x: Tensor) -> Tensor:
        """Class probabilities ``(N, K)``, finding probabilities ``(N, K)``, risk scores or targets ``(N,)``."""
        z = ((x - self.mean) / self.std) @ self.weight + self.bias
        if self.kind == "classes":
            return torch.softmax(z, dim=1)
        if self.kind == "multilabel":
            return torch.sigmoid(z)
        return z[:, 0]


def fit(
    x: Tensor, y: Tensor, kind: str, c: float, outputs: int | None = None, start: LinearModel | None = None
) -> LinearModel:
    """The linear model of ``kind`` fitted to ``(x, y)`` with inverse L2 strength ``c``.

    Args:
        x: ``(n, D)`` float64 features.
        y: The labels' values (:class:`~lightning_mc.analyses.label_kinds.Labels`), ``n`` rows.
        kind: The label kind.
        c: Inverse L2 strength (scikit-learn's ``C``).
        outputs: Classes (``"classes"``: a fold may miss one); ``None`` reads them from ``y``.
        start: A model of the same rows whose weights the fit starts from (``None``: zeros).
    """
    mean, std = x.mean(0), x.std(0, correction=0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    z = (x - mean) / std
    penalty = 1.0 / (2.0 * c * x.shape[0])
    if kind == "continuous":
        weight, bias = _ridge(z, y, penalty)
    else:
        outputs = outputs or (int(y.max()) + 1 if kind == "classes" else (y.shape[1] if kind == "multilabel" else 1))
        weight, bias = _lbfgs(z, y, kind, outputs, penalty, start)
    return LinearModel(kind, mean, std, weight, bias)


def held_out_loss(model: LinearModel, x: Tensor, y: Tensor) -> float:
    """The model's unpenalised mean loss on held-out rows (what the inner cross-validation minimises)."""
    z = ((x - model.mean) / model.std) @ model.weight + model.bias
    return float(_loss(z, y, model.kind))


def choose_c(
    x: Tensor, y: Tensor, kind: str, folds: Tensor, outputs: int | None = None, c_grid: tuple[float, ...] = C_GRID
) -> float:
    """The ``C`` of ``c_grid`` whose cross-validated held-out loss over ``folds`` is lowest (the strongest of ties).

    Each fold's fits run from the strongest penalty to the weakest, each starting where the previous one ended.

    Args:
        x: ``(n, D)`` float64 features.
        y: The labels' values, ``n`` rows.
        kind: The label kind.
        folds: ``(n,)`` fold of each row, ``0 .. k-1``.
        outputs: Classes (``"classes"``), as for :func:`fit`.
        c_grid: The candidates, strongest penalty (smallest ``C``) first.
    """
    losses = [0.0] * len(c_grid)
    for k in range(int(folds.max()) + 1):
        test = folds == k
        model = None
        for index, c in enumerate(c_grid):
            model = fit(x[~test], y[~test], kind, c, outputs, start=model)
            losses[index] += held_out_loss(model, x[test], y[test]) * int(test.sum())
    return c_grid[min(range(len(c_grid)), key=losses.__getitem__)]


def _loss(z: Tensor, y: Tensor, kind: str) -> Tensor:
    if kind == "classes":
        return functional.cross_entropy(z, y)
    if kind == "multilabel":
        return functional.binary_cross_entropy_with_logits(z, y, reduction="sum") / z.shape[0]
    if kind == "survival":
        return _cox_loss(z[:, 0], y)
    return 0.5 * (z[:, 0] - y).pow(2).mean()


def _cox_loss(risk: Tensor, y: Tensor) -> Tensor:
    """Breslow's negative log partial likelihood per event (0 where there is no event)."""
    time, event = y[:, 0], y[:, 1]
    order = torch.argsort(time, descending=True, stable=True)
    risk, time, event = risk[order], time[order], event[order]
    log_risk_set = torch.logcumsumexp(risk, dim=0)
    # tied times share one risk set: every member of a tie group uses the value at the group's last row
    _, counts = torch.unique_consecutive(time, return_counts=True)
    last = torch.repeat_interleave(counts.cumsum(0) - 1, counts)
    events = event.sum()
    if float(events) == 0:
        return risk.sum() * 0.0
    return -((risk - log_risk_set[last]) * event).sum() / events


def _lbfgs(
    z: Tensor, y: Tensor, kind: str, outputs: int, penalty: float, start: LinearModel | None
) -> tuple[Tensor, Tensor]:
    weight = torch.zeros(z.shape[1], outputs, dtype=z.dtype) if start is None else start.weight.clone()
    bias = torch.zeros(outputs, dtype=z.dtype) if start is None else start.bias.clone()
    weight.requires_grad_(True)
    bias.requires_grad_(kind != "survival")  # a Cox model has no intercept
    parameters = [weight, bias] if kind != "survival" else [weight]
    optimizer = torch.optim.LBFGS(
        parameters, lr=1.0, max_iter=LBFGS_ITERATIONS, line_search_fn="strong_wolfe", tolerance_grad=1e-7
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = _loss(z @ weight + bias, y, kind) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _ridge(z: Tensor, y: Tensor, penalty: float) -> tuple[Tensor, Tensor]:
    """Minimises ``½ mean((zW + b − y)²) + penalty ‖W‖²`` in closed form (``z`` is centred: ``b`` is y's mean)."""
    n, width = z.shape
    gram = z.T @ z / n + 2.0 * penalty * torch.eye(width, dtype=z.dtype)
    weight = torch.linalg.solve(gram, z.T @ (y - y.mean()) / n)
    return weight[:, None], y.mean().reshape(1)


__all__ = ["C_GRID", "INNER_FOLDS", "LinearModel", "choose_c", "fit", "held_out_loss"]
