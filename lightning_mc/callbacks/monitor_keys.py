"""The monitor's logged keys: ``prefix`` (unique per trainer) and ``per_output`` (which outputs' shares are logged)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from lightning_mc.core.result import ContributionResult
from lightning_mc.views.scalars import MAX_LOGGED_ATTRIBUTES

_PREFIX = re.compile(r"[A-Za-z0-9_.-]+")
#: The docs of the monitor's own options (its signature's ``Args``), next to their checks below.
MONITOR_DOCS = {
    "dashboard": "With a ``TensorBoardLogger``, also write the dashboard (:mod:`lightning_mc.views.tensorboard`).",
    "per_output": "Log each output's shares, ``<prefix>/output_share/<output>/<m>``: ``True`` names outputs by index, "
    "a sequence of names names them so (at most 16 outputs are logged).",
    "prefix": "First part of every logged key and TensorBoard tag (letters, digits, ``_``, ``-``, ``.``). Several "
    "monitors (e.g. an internal and an external validation set) live in one Trainer when their prefixes differ: "
    "``ModalityContributionMonitor(..., dataloader_idx=1, prefix='mc_external')``.",
    "reuse_outputs": "Take the clean outputs from what ``validation_step`` returned (only the occluded copies run): "
    "``True`` (it returns the output tensor), the key or attribute holding it, or a callable ``outputs -> Tensor``. It "
    "must be what ``forward_fn``/``output_key`` give, before ``output_transform``: the first measured batch of each "
    "fit runs once more to compare, and a prediction on another scale (probabilities) is refused.",
}


def check_prefix(prefix: Any) -> str:
    """Return ``prefix`` if it is a non-empty string of letters, digits, ``_``, ``-`` or ``.``; else raise.

    Raises:
        ValueError: If ``prefix`` is not such a string.

    Example:
        >>> check_prefix("mc_external")
        'mc_external'
    """
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ValueError(f"prefix={prefix!r} must be a non-empty string of letters, digits, '_', '-' or '.'.")
    return prefix


def check_unique_prefix(monitor: Any, monitors: Sequence[Any]) -> None:
    """Raise a ``ValueError`` if another of the trainer's ``monitors`` logs under ``monitor``'s prefix."""
    twins = [other for other in monitors if other.prefix == monitor.prefix and other is not monitor]
    if twins:
        raise ValueError(
            f"Two monitors log under prefix={monitor.prefix!r}: {monitor!r} and {twins[0]!r}. Give each monitor its "
            "own prefix, e.g. prefix='mc_external' for a second validation set."
        )


def check_per_output(per_output: bool | Sequence[str]) -> bool | tuple[str, ...]:
    """Return ``per_output`` (a bool or a tuple of output names) if valid, else raise a ``ValueError``.

    Example:
        >>> check_per_output(["benign", "malignant"])
        ('benign', 'malignant')
    """
    if isinstance(per_output, bool):
        return per_output
    if (
        isinstance(per_output, str)
        or not isinstance(per_output, Sequence)
        or not per_output
        or not all(isinstance(name, str) and name for name in per_output)
        or len(set(per_output)) != len(per_output)
    ):
        raise ValueError(
            f"per_output={per_output!r} must be a bool or a non-empty sequence of unique, non-empty output names."
        )
    return tuple(per_output)


def per_output_names(per_output: bool | tuple[str, ...], result: ContributionResult) -> Sequence[str] | None:
    """The names of the model's outputs whose shares are logged (``None``: ``per_output=False``).

    Raises:
        ValueError: If ``per_output`` names another number of outputs than the model has.
    """
    if per_output is False:
        return None
    num_outputs = len(next(iter(result.per_output_shares.values())))
    if per_output is True:
        return [str(index) for index in range(num_outputs)]
    if len(per_output) != num_outputs:
        raise ValueError(
            f"per_output names {len(per_output)} outputs ({list(per_output)}) but the model has {num_outputs}; give "
            "one name per output, or per_output=True to name them by index."
        )
    return per_output


def logged_output_names(
    per_output: bool | tuple[str, ...], result: ContributionResult, warn_once: Callable[[str, str], None]
) -> Sequence[str] | None:
    """:func:`per_output_names`, or ``None`` with a warning (once) when the model has more outputs than are logged."""
    names = per_output_names(per_output, result)
    if names is not None and len(names) > MAX_LOGGED_ATTRIBUTES:
        warn_once(
            "many_outputs",
            f"per_output: the model has {len(names)} outputs; per-output shares are logged for at most "
            f"{MAX_LOGGED_ATTRIBUTES}. They are in monitor.latest.per_output_shares.",
        )
        return None
    return names


__all__ = [
    "MONITOR_DOCS",
    "check_per_output",
    "check_prefix",
    "check_unique_prefix",
    "logged_output_names",
    "per_output_names",
]
