"""``reuse_outputs``: the monitor takes the clean prediction (and the encoders' outputs) from the validation step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

from torch import Tensor

from lightning_mc.core.engine import GivenCleanError, OcclusionEngine
from lightning_mc.core.outputs import available_keys, select_prediction
from lightning_mc.core.replay import Recording
from lightning_mc.measurement import ContributionMeasurement

#: What ``validation_step`` returned → the model's prediction: ``True`` (the output itself), a key, or a callable.
ReuseOutputs = Union[bool, str, Callable[[Any], Tensor]]


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


__all__ = ["ReuseOutputs", "ValidationStepReuse", "check_reuse_outputs", "reused_prediction"]
