"""``reuse_outputs``: the monitor takes the clean prediction (and the encoders' outputs) from the validation step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
from torch import Tensor

from lightning_mc.core.encoders import noise_gap, relative_gap
from lightning_mc.core.engine import GivenCleanError, OcclusionEngine
from lightning_mc.core.occlusion import plain_tensor
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

    The first measured batch of each fit (:meth:`check_again`) is also run once through the model as the occluded
    copies are (``forward_fn``, ``output_key``), and the step's prediction must equal that output up to float noise
    (:func:`check_reused_prediction`): a step that returns probabilities, or other logits, is refused, never measured
    with its clean outputs on another scale than the copies'. One clean forward call per fit.

    Args:
        reuse_outputs: The monitor's ``reuse_outputs`` (checked by :func:`check_reuse_outputs`).
    """

    def __init__(self, reuse_outputs: Any) -> None:
        self.reuse_outputs = check_reuse_outputs(reuse_outputs)
        self._active: tuple[Any, Recording | None] | None = None
        self._check_pending = True

    def check_again(self) -> None:
        """Compare the next reused prediction with the model's own output (a new fit: maybe another model)."""
        self._check_pending = True

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
        prediction = reused_prediction(self.reuse_outputs, outputs)
        if self._check_pending:
            check_reused_prediction(self.reuse_outputs, measurement.engine, model, batch, prediction)
            self._check_pending = False
        try:
            measurement.update(model, batch, num_samples, prediction, recording)
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
        return {"reuse_outputs": self.reuse_outputs, "_active": None, "_check_pending": True}


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


def check_reused_prediction(
    reuse_outputs: ReuseOutputs, engine: OcclusionEngine, model: Any, batch: Any, prediction: Tensor
) -> None:
    """Raise unless ``prediction`` (the validation step's) is the model's own output on ``batch``, up to float noise.

    The occluded copies are the model's output (``forward_fn``, ``output_key``) passed through ``output_transform``;
    the reused clean prediction is passed through it too, so it must be on the same scale: the logits, not what the
    step made of them. A prediction whose shape differs is left to the engine's own check (a clearer message).

    Raises:
        ValueError: Naming ``reuse_outputs`` and ``output_transform``, the gap, and the fix; when ``prediction`` is
            the model's output after ``output_transform`` (probabilities), saying so.
    """
    reader = engine.outputs
    with torch.no_grad():
        own = select_prediction(engine.forward_fn(model, batch), reader.output_key)
    if not isinstance(own, Tensor) or own.shape != prediction.shape:
        return
    own, prediction = plain_tensor(own), plain_tensor(prediction)
    gap = relative_gap(prediction, own)
    if gap <= noise_gap(own):
        return
    transform = reader.output_transform
    rows = own.shape[0] if own.ndim else 0
    transformed = None
    if transform is not None and rows:
        try:
            transformed = reader.transform(own, rows)
        except (TypeError, ValueError):  # the engine says why, with the copies' outputs
            transformed = None
    reuse = f"reuse_outputs={reuse_outputs!r}"
    if transformed is not None and relative_gap(prediction.reshape(rows, -1), transformed) <= noise_gap(transformed):
        raise ValueError(
            f"{reuse}: validation_step returns the model's outputs after output_transform={transform!r} (they equal "
            "the transformed output of the model's own forward call on this batch), and the measurement applies the "
            "transform to the clean outputs again while the occluded copies get it once. Return the model's "
            "prediction before the transform from validation_step (e.g. the logits, with the probabilities computed "
            "from them elsewhere), or set reuse_outputs=False."
        )
    raise ValueError(
        f"{reuse}: the prediction validation_step returns differs from the model's own output on this batch "
        f"(forward_fn and output_key, before output_transform={transform!r}) by {gap:.3g} (relative), beyond float "
        "noise: the clean outputs would come from another computation than the occluded copies. Return exactly what "
        "the model's forward call gives on the batch, or set reuse_outputs=False."
    )


__all__ = ["ReuseOutputs", "ValidationStepReuse", "check_reuse_outputs", "check_reused_prediction", "reused_prediction"]
