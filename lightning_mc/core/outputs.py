"""From what the model returns to the ``(N, C)`` outputs the metric compares: pick the prediction, apply the activation.

A model may return a tensor, a dict (``{"logits": ...}``), a Hugging Face ``ModelOutput`` (a dict that also has
attributes), a tuple (``(logits, features)``, a Hugging Face model with ``return_dict=False``) or any object with the
prediction as an attribute; ``output_key`` names where the prediction is: a key or attribute name, or an index into a
tuple or list.

The output transform receives the prediction in the model's own shape; only its result is flattened per sample. A
softmax needs to know which dimension holds the classes: on ``(N,)`` and ``(N, C)`` outputs it is the last; on denser
outputs it must be named, ``"softmax:1"`` for channel-first logits ``(N, C, *spatial)`` (MONAI and torchvision
segmentation nets) or ``"softmax:-1"`` for class-last logits ``(N, T, C)`` (Hugging Face token classification and
language-model heads); a bare ``"softmax"`` there is refused at the first batch, never guessed. ``"log_softmax"``
compares log-probabilities, which stay apart where float32 probabilities saturate to exactly 0 and 1. ``"sigmoid"`` is
element-wise and fits any shape.

Every named transform and every difference works in the outputs' full precision (:func:`full_precision`): a float64
model keeps float64, half-precision outputs (bf16, fp16) are computed in float32.

Example:
    >>> import torch
    >>> select_prediction({"logits": torch.zeros(2, 3), "loss": torch.tensor(1.0)}, "logits").shape
    torch.Size([2, 3])
    >>> resolve_output_transform("sigmoid")(torch.zeros(1, 2))
    tensor([[0.5000, 0.5000]])
    >>> resolve_output_transform("softmax:1")(torch.zeros(1, 2, 3, 3))[0, :, 0, 0]
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union, get_args

import torch
from torch import Tensor

from lightning_mc.core.occlusion import plain_tensor

OutputTransform = Union[
    Literal["softmax", "log_softmax", "sigmoid", "softmax:1", "softmax:-1", "log_softmax:1", "log_softmax:-1"],
    Callable[[Tensor], Tensor],
    None,
]
#: The named output transforms; ``:1`` and ``:-1`` name the class dimension of outputs with more than 2 dimensions.
OUTPUT_TRANSFORMS: tuple[str, ...] = get_args(get_args(OutputTransform)[0])
#: The named transforms that give probabilities (the ones that can saturate to exactly 0 and 1).
PROBABILITY_TRANSFORMS: tuple[str, ...] = ("softmax", "softmax:1", "softmax:-1", "sigmoid")


def full_precision_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype outputs of ``dtypes`` are compared in: float64 if any is float64, else float32.

    Example:
        >>> full_precision_dtype(torch.bfloat16), full_precision_dtype(torch.float32, torch.float64)
        (torch.float32, torch.float64)
    """
    dtype = torch.float32
    for other in dtypes:
        dtype = torch.promote_types(dtype, other)
    return dtype


def full_precision(tensor: Tensor) -> Tensor:
    """``tensor`` in the precision outputs are compared in: float64 stays float64, anything less becomes float32.

    The one rule for every named output transform and every difference of outputs: half precision (bf16, fp16) and
    integer outputs are promoted to float32, float32 and float64 are kept (no copy).

    Example:
        >>> full_precision(torch.zeros(1, dtype=torch.bfloat16)).dtype, full_precision(torch.zeros(1).double()).dtype
        (torch.float32, torch.float64)
    """
    return tensor.to(full_precision_dtype(tensor.dtype))


#: Where the prediction is in the model's output: a key or attribute name, an index into a tuple, or ``None``.
OutputKey = Union[str, int, None]


def check_output_key(output_key: OutputKey) -> None:
    """Raise a ``TypeError`` unless ``output_key`` is ``None``, a non-empty string or an int (not a bool)."""
    if output_key is None or (isinstance(output_key, int) and not isinstance(output_key, bool)):
        return
    if not isinstance(output_key, str) or not output_key:
        raise TypeError(
            f"output_key={output_key!r} must be None, the non-empty name of the prediction (e.g. 'logits') or its "
            "index in a tuple output (e.g. 0)."
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


def select_prediction(output: Any, output_key: OutputKey) -> Any:
    """The prediction in ``output``: ``output[output_key]`` for a mapping or an index, else an attribute.

    ``output_key=None`` returns ``output`` unchanged (the model returns the prediction itself); an int indexes a tuple
    or list (``(logits, features)``: ``output_key=0``).

    Raises:
        KeyError: If ``output`` has no ``output_key``; the message lists the keys (or attributes) it has, or says
            how many items a tuple has.

    Example:
        >>> import torch
        >>> select_prediction((torch.zeros(2, 3), torch.ones(2, 8)), 0).shape
        torch.Size([2, 3])
    """
    if output_key is None:
        return output
    if isinstance(output, Mapping):
        if output_key in output:
            return output[output_key]
    elif isinstance(output, (tuple, list)) and (isinstance(output_key, int) or not hasattr(output, "_fields")):
        if isinstance(output_key, int) and -len(output) <= output_key < len(output):
            return output[output_key]
        if isinstance(output_key, int):
            raise KeyError(
                f"output_key={output_key} is out of range: the model's output is a {type(output).__name__} of "
                f"{len(output)} items. Pass the index of the prediction tensor, 0 to {len(output) - 1}."
            )
        raise KeyError(
            f"output_key={output_key!r} names a key, but the model's output is a {type(output).__name__} of "
            f"{len(output)} items, which has none. Pass the prediction's index instead, e.g. output_key=0 for the "
            "first item."
        )
    elif isinstance(output_key, str) and hasattr(output, output_key):
        return getattr(output, output_key)
    raise KeyError(
        f"output_key={output_key!r} is not in the model's output ({type(output).__name__}); it has "
        f"{available_keys(output) or 'no keys or attributes'}. Pass one of those as output_key, or a forward_fn that "
        "returns the prediction tensor."
    )


def _identity(outputs: Tensor) -> Tensor:
    return outputs


def _sigmoid(outputs: Tensor) -> Tensor:
    return full_precision(outputs).sigmoid()


class _OverClasses:
    """``softmax``/``log_softmax`` over the class dimension ``dim``; ``None``: the last, on outputs of ≤ 2 dims only."""

    def __init__(self, name: str, dim: int | None) -> None:
        self.name, self.dim = name, dim

    def __call__(self, outputs: Tensor) -> Tensor:
        dim = self.dim
        if dim is None:
            if outputs.ndim > 2:
                raise ValueError(
                    f"output_transform={self.name!r} on outputs of shape {tuple(outputs.shape)}: which dimension "
                    f"holds the classes? Use output_transform='{self.name}:1' for channel-first logits (N, C, "
                    f"*spatial), as MONAI and torchvision segmentation nets return, or '{self.name}:-1' for class-last "
                    "logits (N, T, C), as Hugging Face token-classification and language-model heads return."
                )
            dim = -1
        if outputs.ndim < 2 or not -outputs.ndim <= dim < outputs.ndim or (dim % outputs.ndim) == 0:
            raise ValueError(
                f"output_transform='{self.name}:{dim}' on outputs of shape {tuple(outputs.shape)}: dimension {dim} "
                "is not a class dimension (dimension 0 holds the samples)."
            )
        outputs = full_precision(outputs)
        return outputs.log_softmax(dim=dim) if self.name == "log_softmax" else outputs.softmax(dim=dim)

    def classes(self, shape: tuple[int, ...]) -> int | None:
        """The number of classes of outputs of ``shape`` (``None`` if no class dimension fits)."""
        dim = -1 if self.dim is None else self.dim
        return shape[dim] if len(shape) >= 2 and -len(shape) <= dim < len(shape) else None


def resolve_output_transform(output_transform: OutputTransform) -> Callable[[Tensor], Tensor]:
    """Turn ``output_transform`` (``None``, a name of :data:`OUTPUT_TRANSFORMS` or a callable) into a function.

    The function takes the prediction in the model's own shape (samples along dimension 0).
    """
    if output_transform is None:
        return _identity
    if output_transform == "sigmoid":
        return _sigmoid
    if isinstance(output_transform, str) and output_transform in OUTPUT_TRANSFORMS:
        name, _, dim = output_transform.partition(":")
        return _OverClasses(name, int(dim) if dim else None)
    if callable(output_transform) and not isinstance(output_transform, str):
        return output_transform
    raise ValueError(f"output_transform={output_transform!r} must be None, one of {OUTPUT_TRANSFORMS} or a callable.")


class GivenCleanError(ValueError):
    """A clean prediction computed elsewhere (``reuse_outputs``) does not fit the batch or the model's outputs."""


class OutputReader:
    """Turns what one forward call returns into checked ``(rows, C)`` outputs: select, flatten, transform.

    Args:
        output_key: Where the prediction is in the output, a name or a tuple index (see :func:`select_prediction`);
            ``None``: the output is the prediction tensor.
        output_transform: ``None``, ``"softmax"`` (over the last dimension), ``"sigmoid"`` or a callable.

    Raises:
        TypeError: If ``output_key`` is not ``None``, a non-empty string or an int.
        ValueError: If ``output_transform`` is not one of the above.

    Example:
        >>> import torch
        >>> reader = OutputReader(output_key="logits", output_transform="softmax")
        >>> reader.read({"logits": torch.zeros(2, 4)}, rows=2).tolist()[0]
        [0.25, 0.25, 0.25, 0.25]
    """

    def __init__(self, output_key: OutputKey, output_transform: OutputTransform) -> None:
        check_output_key(output_key)
        self.output_key = output_key
        self.output_transform = output_transform
        self._transform = resolve_output_transform(output_transform)

    def read(self, output: Any, rows: int) -> Tensor:
        """The prediction in ``output`` (what ``forward_fn`` returned for ``rows`` samples), transformed."""
        return self.transform(select_prediction(output, self.output_key), rows)

    def transform(self, output: object, rows: int) -> Tensor:
        """Check one prediction of ``rows`` samples, flatten it per sample and apply the output transform.

        Raises:
            TypeError: If ``output`` is not a tensor.
            ValueError: If ``output`` does not hold ``rows`` samples along dimension 0, or a softmax would run over a
                single class (always 1).
        """
        if not isinstance(output, Tensor):
            where = "The model returned" if self.output_key is None else f"output_key={self.output_key!r} selected"
            if self.output_key is None and isinstance(output, (tuple, list)) and not hasattr(output, "_fields"):
                raise TypeError(
                    f"{where} a {type(output).__name__} of {len(output)} items, not a tensor. Name the prediction "
                    "tensor by its index with output_key (e.g. output_key=0 for the first item) or pass a forward_fn "
                    "that returns it."
                )
            raise TypeError(
                f"{where} a {type(output).__name__}, not a tensor. Name the prediction tensor with output_key (e.g. "
                "output_key='logits' for a dict or a Hugging Face ModelOutput) or pass a forward_fn that returns it."
            )
        if output.ndim == 0 or output.shape[0] != rows:
            raise ValueError(
                f"The model output has shape {tuple(output.shape)} for an input of {rows} samples; expected the "
                "samples along dimension 0. Use `forward_fn` to return per-sample outputs."
            )
        output, shape = plain_tensor(output), output.shape  # a MetaTensor output would slice by sample metadata
        if output.ndim == 1:  # one output per sample
            output = output.unsqueeze(1)
        if isinstance(self._transform, _OverClasses) and self._transform.classes(tuple(output.shape)) == 1:
            name = self._transform.name
            raise ValueError(
                f"output_transform={self.output_transform!r} on outputs of shape {tuple(shape)}: one class, and the "
                f"{name} of one logit is always {1 if name == 'softmax' else 0}, so no occlusion could move it (every "
                "share would be NaN). Use output_transform='sigmoid' for a binary model with a single logit, or None "
                "for a regression output."
            )
        transformed = self._transform(output)
        if not isinstance(transformed, Tensor) or transformed.shape[0] != rows:
            raise ValueError(
                f"output_transform returned {getattr(transformed, 'shape', type(transformed).__name__)} for "
                f"{rows} samples; it must return a tensor with the samples along dimension 0."
            )
        return transformed.reshape(rows, -1)

    def given_clean(self, clean: Tensor, num_outputs: int | None, batch_size: int) -> Tensor:
        """A clean prediction computed elsewhere, transformed as the engine's own: ``(batch_size, num_outputs)``.

        ``num_outputs`` is what the occluded copies gave; ``None`` when no copy ran a row (nothing to compare with).

        Raises:
            GivenCleanError: If ``clean`` is not a tensor, has another batch size, or another number of outputs than
                the occluded passes.
        """
        try:
            rows = self.transform(clean, batch_size)
        except (TypeError, ValueError) as err:
            raise GivenCleanError(f"The clean outputs given for this batch are wrong: {err}") from None
        if num_outputs is not None and rows.shape[1] != num_outputs:
            raise GivenCleanError(
                f"The clean outputs given for this batch have shape {tuple(clean.shape)}: {rows.shape[1]} outputs per "
                f"sample, but the model gives {num_outputs} on the occluded copies; they must be the model's "
                "prediction on this batch (what forward_fn and output_key return), before the output transform."
            )
        return rows

    @staticmethod
    def check_same_width(outputs: Sequence[Tensor], labels: Sequence[str]) -> None:
        """Raise if the forward calls gave different numbers of outputs per sample, naming the first that differs.

        Args:
            outputs: The ``(rows, C)`` outputs of each forward call.
            labels: What each call held, for the message.
        """
        first_width = outputs[0].shape[1]
        for output, label in zip(outputs, labels):
            if output.shape[1] != first_width:
                raise ValueError(
                    f"The model returned {sorted({o.shape[1] for o in outputs})} outputs per sample in different "
                    f"passes: {first_width} in the call holding {labels[0]} but {output.shape[1]} in the call holding "
                    f"{label}. The occluded passes must give outputs of the same shape as the clean pass."
                )
