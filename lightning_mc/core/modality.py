"""Where a modality lives in a batch, how it is occluded, and which attributes it has.

Example:
    >>> import torch
    >>> batch = {"image": torch.zeros(2, 1, 8, 8), "table": torch.ones(2, 5), "label": torch.tensor([0, 1])}
    >>> image, table = resolve_modalities({"image": "image", "table": "table"})
    >>> image.select(batch).shape
    torch.Size([2, 1, 8, 8])
    >>> sorted(table.replace(batch, torch.zeros(2, 5)))  # a new dict; ``batch`` is untouched
    ['image', 'label', 'table']
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Union

from torch import Tensor

from lightning_mc.core.occlusion import Attributes, Fill, FillSpec, WholeModality, resolve_fill

Batch = Any
ModalityLocation = Union[str, int]
ModalitiesSpec = Union[Mapping[str, Union[ModalityLocation, "Modality"]], Sequence["Modality"]]
#: Where the targets (labels) are in a batch: a dict key, a tuple/list index, or ``batch -> Tensor``.
TargetSpec = Union[str, int, Callable[[Batch], Tensor]]


@dataclass(frozen=True)
class Modality:
    """One input modality of a multimodal batch.

    Give either ``key`` (a dict key or a tuple/list index) or the pair ``getter``/``setter`` for nested or custom
    batches.

    Args:
        name: Name used in logged keys (``mc/share/<name>``) and results.
        key: Dict key (``batch[key]``) or sequence index (``batch[index]``) of the modality tensor.
        getter: ``batch -> tensor`` for batches that ``key`` cannot address.
        setter: ``(batch, tensor) -> new batch`` with the modality replaced. It must return a new batch and leave the
            given one unchanged.
        occlusion: This modality's fill (see :func:`lightning_mc.core.occlusion.resolve_fill`); ``None`` takes the
            default of the monitor or function it is passed to.
        attributes: Builds the attribute masks (``None``: the whole modality is one attribute).

    Example:
        >>> nested = Modality(
        ...     "ct",
        ...     getter=lambda batch: batch["scans"]["ct"],
        ...     setter=lambda batch, ct: {**batch, "scans": {**batch["scans"], "ct": ct}},
        ...     occlusion="mean",
        ... )
    """

    name: str
    key: ModalityLocation | None = None
    getter: Callable[[Batch], Tensor] | None = None
    setter: Callable[[Batch, Tensor], Batch] | None = None
    occlusion: FillSpec | None = None
    attributes: Attributes | None = field(default=None)
    _fill: Fill | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Modality name must be a non-empty string, got {self.name!r}.")
        if "/" in self.name:
            raise ValueError(f"Modality name {self.name!r} must not contain '/': it becomes part of logged keys.")
        has_key = self.key is not None
        has_accessors = self.getter is not None or self.setter is not None
        if has_key == has_accessors:
            raise ValueError(
                f"Modality {self.name!r}: give either `key` (dict key or tuple index) or both `getter` and `setter`, "
                f"got key={self.key!r}, getter={self.getter!r}, setter={self.setter!r}."
            )
        if has_accessors and (self.getter is None or self.setter is None):
            raise ValueError(f"Modality {self.name!r}: `getter` and `setter` must be given together.")
        if has_key and (isinstance(self.key, bool) or not isinstance(self.key, (str, int))):
            raise TypeError(
                f"Modality {self.name!r}: key={self.key!r} ({type(self.key).__name__}) must be a str (dict key) or "
                "an int (tuple/list index)."
            )
        if self.occlusion is not None:  # resolved once (frozen: set through object.__setattr__)
            object.__setattr__(
                self, "_fill", resolve_fill(self.occlusion, argument=f"Modality({self.name!r}).occlusion")
            )
        if self.attributes is not None and not callable(self.attributes):
            raise TypeError(
                f"Modality {self.name!r}: attributes={self.attributes!r} must be a callable `tensor -> AttributeMasks`."
            )

    @property
    def fill(self) -> Fill | None:
        """The resolved fill, or ``None`` when the modality uses the default."""
        return self._fill

    def whole(self) -> Modality:
        """This modality without attribute masks: occluded as a whole, with its fill."""
        return self if self.attributes is None else replace(self, attributes=None)

    @property
    def attribute_masks(self) -> Attributes:
        """The attribute mask builder (the whole modality when none was given)."""
        return self.attributes if self.attributes is not None else WholeModality()

    def select(self, batch: Batch) -> Tensor:
        """Return the modality tensor of ``batch``.

        Raises:
            KeyError: If ``key`` is not in a dict batch.
            IndexError: If ``key`` is out of range for a tuple/list batch.
            TypeError: If the batch cannot be addressed by ``key`` or the modality is not a tensor.
        """
        if self.getter is not None:
            value = self.getter(batch)
        elif isinstance(self.key, str):
            if not isinstance(batch, Mapping):
                raise TypeError(
                    f"Modality {self.name!r} has dict key {self.key!r} but the batch is a {type(batch).__name__}; "
                    "use an int index for tuple/list batches or getter/setter for other batches."
                )
            if self.key not in batch:
                raise KeyError(
                    f"Modality {self.name!r}: key {self.key!r} is not in the batch; the batch has keys {list(batch)}."
                )
            value = batch[self.key]
        else:
            if not isinstance(batch, Sequence) or isinstance(batch, str):
                raise TypeError(
                    f"Modality {self.name!r} has index {self.key!r} but the batch is a {type(batch).__name__}; "
                    "use a str key for dict batches or getter/setter for other batches."
                )
            if not -len(batch) <= self.key < len(batch):
                raise IndexError(
                    f"Modality {self.name!r}: index {self.key} is out of range for a batch of {len(batch)} items "
                    f"(valid: 0..{len(batch) - 1})."
                )
            value = batch[self.key]
        if not isinstance(value, Tensor):
            raise TypeError(
                f"Modality {self.name!r} is a {type(value).__name__} in the batch, expected a torch.Tensor with the "
                "samples along dimension 0."
            )
        if value.ndim == 0:
            raise ValueError(f"Modality {self.name!r} is a 0-d tensor; expected the samples along dimension 0.")
        return value

    def replace(self, batch: Batch, value: Tensor) -> Batch:
        """Return a shallow copy of ``batch`` with this modality set to ``value``; ``batch`` is left unchanged."""
        if self.setter is not None:
            return self.setter(batch, value)
        if isinstance(batch, Mapping):
            new_batch = copy.copy(batch)
            new_batch[self.key] = value
            return new_batch
        items = list(batch)
        items[self.key] = value
        if isinstance(batch, list):
            return items
        if hasattr(batch, "_fields"):  # namedtuple
            return type(batch)(*items)
        return type(batch)(items)


def resolve_modalities(modalities: ModalitiesSpec, argument: str = "modalities") -> tuple[Modality, ...]:
    """Turn the user's ``modalities`` argument into :class:`Modality` objects.

    Args:
        modalities: A mapping ``name -> dict key``, ``name -> tuple index`` or ``name -> Modality``, or a sequence of
            :class:`Modality`.
        argument: The argument's name, for error messages.

    Raises:
        TypeError: If an entry is neither a key, an index nor a :class:`Modality`.
        ValueError: If fewer than two modalities are given, names repeat or two modalities share a key or index.
    """
    if isinstance(modalities, Mapping):
        resolved = []
        for name, location in modalities.items():
            if isinstance(location, Modality):
                if location.name != name:
                    raise ValueError(
                        f"{argument}[{name!r}] is a Modality named {location.name!r}; the names must match."
                    )
                resolved.append(location)
            elif isinstance(location, (str, int)) and not isinstance(location, bool):
                resolved.append(Modality(name, key=location))
            else:
                raise TypeError(
                    f"{argument}[{name!r}]={location!r} ({type(location).__name__}) must be a dict key (str), a "
                    "tuple index (int) or a lightning_mc.Modality."
                )
    elif isinstance(modalities, Sequence) and not isinstance(modalities, str):
        resolved = list(modalities)
        for item in resolved:
            if not isinstance(item, Modality):
                raise TypeError(
                    f"{argument} must be a mapping name -> key/index or a sequence of lightning_mc.Modality, got an "
                    f"item {item!r} ({type(item).__name__})."
                )
    else:
        raise TypeError(
            f"{argument}={modalities!r} ({type(modalities).__name__}) must be a mapping name -> key/index "
            "(e.g. {'image': 'image', 'table': 'table'}) or a sequence of lightning_mc.Modality."
        )
    names = [m.name for m in resolved]
    if len(resolved) < 2:
        raise ValueError(f"{argument} needs at least 2 modalities to compare, got {len(resolved)}: {names}.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{argument} has duplicate names {duplicates}; every modality needs a unique name.")
    _refuse_shared_locations(resolved, argument)
    return tuple(resolved)


def _refuse_shared_locations(modalities: Sequence[Modality], argument: str) -> None:
    """Refuse two modalities at the same batch key or index: each would occlude the other's input too.

    Occluding one of them replaces the item both read, so the measurement would see one modality under two names
    (shares exactly 0 and 1, or NaN). Getter/setter modalities cannot be compared and are not checked.
    """
    seen: dict[tuple[type, ModalityLocation], str] = {}
    for modality in modalities:
        if modality.key is None:
            continue
        location = (type(modality.key), modality.key)
        if location in seen:
            raise ValueError(
                f"{argument} names one batch item twice: {seen[location]!r} and {modality.name!r} both have "
                f"key={modality.key!r}, so occluding either occludes both and the shares say nothing. Give each "
                "modality its own batch item; for parts of one tensor, use one modality with attributes "
                "(lightning_mc.masks.Columns, ColumnGroups) or a getter/setter pair per part."
            )
        seen[location] = modality.name


def select_target(batch: Batch, target: TargetSpec, argument: str = "target") -> Tensor:
    """The targets of ``batch`` (``argument``: the name of the spec, for error messages).

    Raises:
        ValueError: If ``target`` finds nothing in the batch.
        TypeError: If it finds something that is not a tensor.

    Example:
        >>> import torch
        >>> select_target((torch.zeros(2, 3), torch.tensor([0, 1])), 1)
        tensor([0, 1])
    """
    try:
        value = target(batch) if callable(target) else batch[target]  # type: ignore[index]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(
            f"{argument}={target!r} found no targets in the batch ({type(err).__name__}: {err})."
        ) from None
    if not isinstance(value, Tensor):
        raise TypeError(f"{argument}={target!r} selected a {type(value).__name__}, expected a tensor of targets.")
    return value
