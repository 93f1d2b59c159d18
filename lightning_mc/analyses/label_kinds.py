"""What the labels of a collapse probe are, said by ``label_kind`` or read from the values, or refused.

The kinds: class ids (or one-hot rows), multi-hot findings, ``[time, event]`` survival pairs, a continuous target.
``"auto"`` reads the kind from the values and refuses what they cannot tell.

An argmax is right only for classes: multi-hot findings, survival pairs and continuous targets argmax'd into classes
give a meaningless score, so each kind keeps its own shape here and :mod:`lightning_mc.analyses.probe` fits and scores
each as what it is.

Example:
    >>> read_labels(torch.tensor([[0.0, 1.0], [1.0, 0.0]])).kind
    'classes'
    >>> read_labels(torch.tensor([[1, 1, 0], [0, 0, 1]])).kind
    'multilabel'
    >>> read_labels(torch.tensor([[3.5, 1.0], [2.0, 0.0]]), "survival").values.dtype
    torch.float64
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LabelKind = Literal["auto", "classes", "multilabel", "survival", "continuous"]
#: The values ``label_kind`` takes.
LABEL_KINDS: tuple[str, ...] = ("auto", "classes", "multilabel", "survival", "continuous")
#: ``"auto"`` reads integral floats as class ids only from 0 to this minus one (beyond: an id or an age? it refuses).
MAX_AUTO_CLASSES = 20
_CHOICES = (
    "label_kind='classes' (class ids, one-hot), 'multilabel' (multi-hot), 'survival' ([time, event]) or 'continuous'"
)


@dataclass(frozen=True)
class Labels:
    """Labels of one kind, in the shape the probe fits.

    Attributes:
        kind: ``"classes"``, ``"multilabel"``, ``"survival"`` or ``"continuous"``.
        values: ``(N,)`` class ids (long), ``(N, K)`` 0/1 findings (float64), ``(N, 2)`` ``[time, event]`` (float64)
            or ``(N,)`` targets (float64).
    """

    kind: str
    values: Tensor

    def __len__(self) -> int:
        return self.values.shape[0]


def check_label_kind(label_kind: str) -> None:
    """Raise a ``ValueError`` unless ``label_kind`` is one of :data:`LABEL_KINDS`.

    Example:
        >>> check_label_kind("survival")
    """
    if label_kind not in LABEL_KINDS:
        raise ValueError(f"label_kind={label_kind!r} must be one of {', '.join(map(repr, LABEL_KINDS))}.")


def read_labels(labels: Tensor, label_kind: LabelKind = "auto") -> Labels:
    """``labels`` as :class:`Labels` of ``label_kind`` (``"auto"``: the kind the values show).

    Raises:
        ValueError: If the values are not of ``label_kind``, or ``"auto"`` cannot tell their kind (integral floats with
            many distinct values, a two-column float tensor, ...); the message names the choices.
    """
    check_label_kind(label_kind)
    values = labels.detach()
    if values.dim() == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.dim() not in (1, 2):
        raise ValueError(
            f"labels= selected a tensor of shape {tuple(labels.shape)}; the probe needs one label per sample: (N,) "
            "or (N, K)."
        )
    kind = _auto_kind(values) if label_kind == "auto" else label_kind
    return {"classes": _classes, "multilabel": _multilabel, "survival": _survival, "continuous": _continuous}[kind](
        values
    )


def _auto_kind(values: Tensor) -> str:
    """The kind the values show, or a refusal naming the choices."""
    shape = tuple(values.shape)
    if values.dim() == 1:
        if not values.is_floating_point():
            return "classes"
        if not torch.equal(values, values.round()):
            return "continuous"
        low, high = float(values.min()), float(values.max())
        if low >= 0 and high < MAX_AUTO_CLASSES:
            return "classes"
        raise ValueError(
            f"label_kind='auto' cannot tell what labels= holds: integral floats from {low:g} to {high:g} may be class "
            f"ids or a continuous target (an age, a score); 'auto' reads integral floats as class ids only from 0 to "
            f"{MAX_AUTO_CLASSES - 1}. Pass label_kind='classes' or label_kind='continuous'."
        )
    binary = bool(((values == 0) | (values == 1)).all())
    if binary:
        return "classes" if bool((values.sum(dim=1) == 1).all()) else "multilabel"
    if values.shape[1] > 2 and bool((values >= 0).all()) and torch.allclose(values.sum(1).double(), _ones(values)):
        return "classes"  # probability rows
    raise ValueError(
        f"label_kind='auto' cannot tell what labels= holds: a {shape[1]}-column tensor of non-binary values "
        f"(shape {shape}) may be [time, event] survival labels or several continuous targets. Pass {_CHOICES}."
    )


def _ones(values: Tensor) -> Tensor:
    return torch.ones(values.shape[0], dtype=torch.float64, device=values.device)


def _classes(values: Tensor) -> Labels:
    if values.dim() == 2:
        if not (bool((values >= 0).all()) and torch.allclose(values.sum(1).double(), _ones(values))):
            raise ValueError(
                f"label_kind='classes': labels= selected {values.shape[1]}-column rows that are not one-hot or "
                "probabilities (rows summing to 1); for multi-hot findings pass label_kind='multilabel'."
            )
        return Labels("classes", values.argmax(dim=1).cpu())
    if values.is_floating_point() and not torch.equal(values, values.round()):
        raise ValueError(
            "label_kind='classes': labels= selected continuous values, not class ids; for a regression target pass "
            "label_kind='continuous'."
        )
    return Labels("classes", values.long().cpu())


def _multilabel(values: Tensor) -> Labels:
    if values.dim() != 2 or values.shape[1] < 2 or not bool(((values == 0) | (values == 1)).all()):
        raise ValueError(
            f"label_kind='multilabel': labels= must select multi-hot rows (N, K) of 0/1 findings, got shape "
            f"{tuple(values.shape)}" + ("" if values.dim() != 2 else " with values other than 0 and 1") + "."
        )
    return Labels("multilabel", values.to("cpu", torch.float64))


def _survival(values: Tensor) -> Labels:
    if values.dim() != 2 or values.shape[1] != 2:
        raise ValueError(
            f"label_kind='survival': labels= must select [time, event] rows (N, 2), got shape {tuple(values.shape)}."
        )
    pairs = values.to("cpu", torch.float64)
    time, event = pairs[:, 0], pairs[:, 1]
    if not bool(((event == 0) | (event == 1)).all()) or not bool(torch.isfinite(time).all()):
        raise ValueError(
            "label_kind='survival': labels= must select [time, event] rows: a finite time in column 0 and the event "
            "indicator (1: the event, 0: censored) in column 1."
        )
    return Labels("survival", pairs)


def _continuous(values: Tensor) -> Labels:
    if values.dim() != 1:
        raise ValueError(
            f"label_kind='continuous': labels= must select one target per sample (N,), got shape "
            f"{tuple(values.shape)}; probe one target at a time (labels=lambda batch: batch['y'][:, 0])."
        )
    return Labels("continuous", values.to("cpu", torch.float64))


__all__ = ["LABEL_KINDS", "LabelKind", "Labels", "check_label_kind", "read_labels"]
