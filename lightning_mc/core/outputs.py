"""From what the model returns to the ``(N, C)`` outputs the metric compares: pick the prediction, apply the activation.

A model may return a tensor, a dict (``{"logits": ...}``), a Hugging Face ``ModelOutput`` (a dict that also has
attributes) or any object with the prediction as an attribute; ``output_key`` names where the prediction is.

Example:
    >>> import torch
    >>> select_prediction({"logits": torch.zeros(2, 3), "loss": torch.tensor(1.0)}, "logits").shape
    torch.Size([2, 3])
    >>> resolve_output_transform("sigmoid")(torch.zeros(1, 2))
    tensor([[0.5000, 0.5000]])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, Union

from torch import Tensor

OutputTransform = Union[Literal["softmax", "sigmoid"], Callable[[Tensor], Tensor], None]
OUTPUT_TRANSFORMS: tuple[str, ...] = ("softmax", "sigmoid")


def check_output_key(output_key: str | None) -> None:
    """Raise a ``TypeError`` unless ``output_key`` is ``None`` or a non-empty string."""
    if output_key is not None and (not isinstance(output_key, str) or not output_key):
        raise TypeError(
            f"output_key={output_key!r} must be None or the non-empty name of the prediction, e.g. 'logits'."
        )


def available_keys(output: Any) -> list[str]:
    """The keys (mapping), fields (namedtuple) or public attributes of ``output``, for error messages.

    Example:
        >>> available_keys({"logits": 1, "loss": 2})
        ['logits', 'loss']
    """
    if isinstance(output, Mapping):  # a dict, or a Hugging Face ModelOutput (an OrderedDict)
        return [str(key) for key in output]
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple
        return list(output._fields)
    if isinstance(output, (tuple, list)) or not hasattr(output, "__dict__"):
        return []
    return [name for name in vars(output) if not name.startswith("_")]


def select_prediction(output: Any, output_key: str | None) -> Any:
    """The prediction in ``output``: ``output[output_key]`` for a mapping, else ``getattr(output, output_key)``.

    ``output_key=None`` returns ``output`` unchanged (the model returns the prediction itself).

    Raises:
        KeyError: If ``output`` has no ``output_key``; the message lists the keys (or attributes) it has.
    """
    if output_key is None:
        return output
    if isinstance(output, Mapping):
        if output_key in output:
            return output[output_key]
    elif isinstance(output, (tuple, list)) and not hasattr(output, "_fields"):
        raise KeyError(
            f"output_key={output_key!r} names a key, but the model's output is a {type(output).__name__} of "
            f"{len(output)} items. Pass a forward_fn that returns the prediction tensor, e.g. "
            "forward_fn=lambda model, batch: model(...)[0], and no output_key."
        )
    elif hasattr(output, output_key):
        return getattr(output, output_key)
    raise KeyError(
        f"output_key={output_key!r} is not in the model's output ({type(output).__name__}); it has "
        f"{available_keys(output) or 'no keys or attributes'}. Pass one of those as output_key, or a forward_fn that "
        "returns the prediction tensor."
    )


def _identity(outputs: Tensor) -> Tensor:
    return outputs


def _softmax(outputs: Tensor) -> Tensor:
    return outputs.float().softmax(dim=-1)


def _sigmoid(outputs: Tensor) -> Tensor:
    return outputs.float().sigmoid()


def resolve_output_transform(output_transform: OutputTransform) -> Callable[[Tensor], Tensor]:
    """Turn ``output_transform`` (None, "softmax", "sigmoid" or a callable) into a function on ``(N, C)`` outputs."""
    if output_transform is None:
        return _identity
    if output_transform == "softmax":
        return _softmax
    if output_transform == "sigmoid":
        return _sigmoid
    if callable(output_transform) and not isinstance(output_transform, str):
        return output_transform
    raise ValueError(f"output_transform={output_transform!r} must be None, one of {OUTPUT_TRANSFORMS} or a callable.")
