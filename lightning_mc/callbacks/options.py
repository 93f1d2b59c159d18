"""The monitor's own options (about Lightning, not the measurement): ``prefix``, ``reuse_outputs``, ``per_output``."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Union

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_mc.core.encoders import Recording
from lightning_mc.core.engine import GivenCleanError, OcclusionEngine
from lightning_mc.core.outputs import available_keys, select_prediction
from lightning_mc.core.result import ContributionResult
from lightning_mc.measurement import ContributionMeasurement
from lightning_mc.views.scalars import MAX_LOGGED_ATTRIBUTES

#: What ``validation_step`` returned → the model's prediction: ``True`` (the output itself), a key, or a callable.
ReuseOutputs = Union[bool, str, Callable[[Any], Tensor]]
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
    "must be what ``forward_fn``/``output_key`` give, before ``output_transform``.",
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


class ValidationStepReuse:
    """What the monitor takes from the validation step (``reuse_outputs``): its prediction and its encoders' outputs.

    With ``reuse_outputs`` and ``encoders`` the monitor calls :meth:`start` before a measured validation step;
    :meth:`measure` stops it and hands the measurement the step's prediction with what the encoders computed in the
    step's forward call, so the measurement never runs the clean batch again.

    Args:
        reuse_outputs: The monitor's ``reuse_outputs`` (checked by :func:`check_reuse_outputs`).
    """

    def __init__(self, reuse_outputs: Any) -> None:
        self.reuse_outputs = check_reuse_outputs(reuse_outputs)
        self._active: tuple[Any, Recording | None] | None = None

    def start(self, engine: OcclusionEngine, model: Any) -> None:
        """Record the encoders in the forward calls from now on (nothing without ``reuse_outputs``)."""
        self.stop()
        if self.reuse_outputs is not False:
            context = engine.recording_encoders(model)
            self._active = (context, context.__enter__())

    def measure(
        self, measurement: ContributionMeasurement, model: Any, batch: Any, num_samples: int, outputs: Any
    ) -> None:
        """Stop recording and update ``measurement`` with what the validation step gave (``outputs``), if reused.

        Raises:
            ValueError: If the reused prediction does not fit the batch or the model's outputs.
        """
        recording = self.stop()
        if self.reuse_outputs is False:
            measurement.update(model, batch, num_samples)
            return
        try:
            measurement.update(model, batch, num_samples, reused_prediction(self.reuse_outputs, outputs), recording)
        except GivenCleanError as err:
            raise ValueError(f"reuse_outputs={self.reuse_outputs!r}: {err}") from None

    def stop(self) -> Recording | None:
        """Stop recording; what was recorded since :meth:`start` (``None`` if not started or without encoders)."""
        if self._active is None:
            return None
        context, recording = self._active
        self._active = None
        context.__exit__(None, None, None)
        return recording

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles the monitor; a running recording stays behind
        return {"reuse_outputs": self.reuse_outputs, "_active": None}


class WarnOnce:
    """Warns (rank 0) at most once per kind of message.

    Example:
        >>> warn = WarnOnce()
        >>> warn("empty", "nothing measured")  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def __call__(self, kind: str, message: str) -> None:
        """Warn ``message`` unless a message of ``kind`` was already given."""
        if kind not in self.warned:
            self.warned.add(kind)
            rank_zero_warn(message, category=UserWarning)


def check_reuse_outputs(reuse_outputs: Any) -> ReuseOutputs:
    """Return ``reuse_outputs`` if valid, else raise a ``TypeError`` saying what is.

    Example:
        >>> check_reuse_outputs("logits")
        'logits'
    """
    if isinstance(reuse_outputs, bool) or (isinstance(reuse_outputs, str) and reuse_outputs):
        return reuse_outputs
    if callable(reuse_outputs) and not isinstance(reuse_outputs, str):
        return reuse_outputs
    raise TypeError(
        f"reuse_outputs={reuse_outputs!r} must be False, True (validation_step returns the output tensor), the key "
        "or attribute holding it in what validation_step returns (e.g. 'logits'), or a callable outputs -> Tensor."
    )


def reused_prediction(reuse_outputs: ReuseOutputs, outputs: Any) -> Tensor:
    """The model's prediction in ``outputs``, what ``validation_step`` returned.

    Raises:
        ValueError: If ``reuse_outputs`` names a key that ``outputs`` does not have (the message lists those it has).
        TypeError: If no tensor comes out.

    Example:
        >>> import torch
        >>> reused_prediction("logits", {"logits": torch.zeros(2, 3), "loss": torch.tensor(0.5)}).shape
        torch.Size([2, 3])
    """
    if reuse_outputs is True:
        prediction = outputs
    elif isinstance(reuse_outputs, str):
        try:
            prediction = select_prediction(outputs, reuse_outputs)
        except KeyError:
            raise ValueError(
                f"reuse_outputs={reuse_outputs!r}: validation_step returned a {type(outputs).__name__} without "
                f"{reuse_outputs!r}; it has {available_keys(outputs) or 'no keys or attributes'}. Return the "
                "prediction under that key, or set reuse_outputs to the key that holds it."
            ) from None
    else:
        prediction = reuse_outputs(outputs)  # type: ignore[operator]
    if not isinstance(prediction, Tensor):
        raise TypeError(
            f"reuse_outputs={reuse_outputs!r} needs the model's output tensor from validation_step, but got "
            f"{type(prediction).__name__} (validation_step returned {type(outputs).__name__}). Return the "
            "prediction from validation_step (e.g. `return logits`, or a dict with it and reuse_outputs='<key>'), "
            "or set reuse_outputs=False."
        )
    return prediction


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
