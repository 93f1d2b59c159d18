"""How the model is called on a batch: the user's ``forward_fn``, or the default call built from the modalities."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from torch import nn

from lightning_mc.core.modality import Batch, Modality

ForwardFn = Callable[[nn.Module, Batch], Any]


def default_forward(modalities: Sequence[Modality]) -> ForwardFn:
    """The default ``forward_fn``: the modality tensors by keyword (dict batches) or by position (all others).

    A dict batch whose modality keys are all parameters of the model's ``forward`` is passed by keyword: the modality
    tensors and every other key that ``forward`` takes (e.g. an ``attention_mask``), except ``labels``/``label``
    (a Hugging Face model would compute its loss). Otherwise the modality tensors go in as positional arguments in the
    order of ``modalities``: ``modalities={"image": "x_img", "table": "x_tab"}`` calls
    ``model(batch["x_img"], batch["x_tab"])``. A positional call that would hand a modality whose key names one of
    ``forward``'s parameters to another parameter is refused, naming ``forward_fn``: never a call in key order.
    """
    return _DefaultForward(tuple(modalities))


class UnmappableBatch(TypeError):
    """The default forward call cannot tell which of ``forward``'s parameters a dict batch's modalities go to."""


#: Batch keys never passed by keyword: a model given its labels computes a loss the measurement does not need.
_LABEL_KEYS = frozenset({"labels", "label"})


class _Parameters(NamedTuple):
    """What ``model.forward`` takes: its keyword names, its positional names in order, and whether it takes ``**``."""

    keyword: frozenset[str]
    positional: tuple[str, ...]
    takes_any: bool


class _DefaultForward:
    """:func:`default_forward`; a class, not a closure, so monitors pickle (``ddp_spawn`` sends callbacks)."""

    def __init__(self, modalities: tuple[Modality, ...]) -> None:
        self.modalities = modalities
        self._keys = tuple(m.key for m in modalities) if all(isinstance(m.key, str) for m in modalities) else None
        self._parameters_of: dict[type, _Parameters] = {}

    def __call__(self, model: nn.Module, batch: Batch) -> Any:
        if self._keys is not None and isinstance(batch, Mapping):
            parameters = self._parameters(model)
            if all(key in parameters.keyword for key in self._keys):
                passed = {key: batch[key] for key in batch if key in parameters.keyword and key not in _LABEL_KEYS}
                return model(**passed)
            self._check_positions(model, parameters)
        return model(*(modality.select(batch) for modality in self.modalities))

    def _check_positions(self, model: nn.Module, parameters: _Parameters) -> None:
        """Refuse a positional call that gives a modality keyed like a parameter to another parameter."""
        assert self._keys is not None
        for position, key in enumerate(self._keys):
            bound = parameters.positional[position] if position < len(parameters.positional) else None
            if key in parameters.keyword and key != bound:
                keys = ", ".join(f"batch[{k!r}]" for k in self._keys)
                raise UnmappableBatch(
                    f"The default forward call cannot map this dict batch onto {type(model).__name__}.forward"
                    f"({', '.join(parameters.positional)}): the modality keys {list(self._keys)} are not all its "
                    f"parameters, and by position {key!r} would go to {bound!r}. Pass a forward_fn that calls the "
                    f"model as its forward expects, e.g. forward_fn=lambda model, batch: model({keys}) with the "
                    "arguments in forward's order."
                )

    def _parameters(self, model: nn.Module) -> _Parameters:
        """What ``model.forward`` takes (cached per model type)."""
        if type(model) not in self._parameters_of:
            try:
                signature = inspect.signature(model.forward)
            except (TypeError, ValueError):  # a builtin or C-implemented forward: call positionally
                self._parameters_of[type(model)] = _Parameters(frozenset(), (), False)
            else:
                kinds = {p.name: p.kind for p in signature.parameters.values()}
                keyword = {inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY}
                positional = {inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY}
                self._parameters_of[type(model)] = _Parameters(
                    frozenset(name for name, kind in kinds.items() if kind in keyword),
                    tuple(name for name, kind in kinds.items() if kind in positional),
                    inspect.Parameter.VAR_KEYWORD in kinds.values(),
                )
        return self._parameters_of[type(model)]

    def __getstate__(self) -> dict[str, Any]:  # the cache holds types; rebuilt after unpickling
        return {"modalities": self.modalities, "_keys": self._keys, "_parameters_of": {}}


__all__ = ["ForwardFn", "UnmappableBatch", "default_forward"]
