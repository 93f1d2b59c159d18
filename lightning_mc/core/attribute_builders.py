"""Attribute mask builders: which parts of a modality are occluded together (tabular columns, patches, tokens).

Each builder implements the :class:`lightning_mc.core.occlusion.Attributes` protocol: called with a modality tensor
``(N, ...)`` it returns :class:`lightning_mc.masks.AttributeMasks`, one boolean mask per attribute. Pass a builder
as ``Modality(name, key=..., attributes=builder)``; every mask of every modality then runs through the engine.
Builders whose ``reads_batch`` is true (:class:`Tokens`/:class:`Words` reading an ``attention_mask`` or ``word_ids``
entry of the batch) are called as ``builder(value, batch=batch)``.

The metric needs the same attributes in every batch, so every builder returns a fixed number of masks: token and word
builders take a ``max_length``/``max_words`` and give all-false masks to positions a batch does not have.

Example:
    >>> import torch
    >>> from lightning_mc import Modality
    >>> image = Modality("image", key="image", attributes=Patches2d(size=(4, 4)))
    >>> Patches2d(size=(4, 4))(torch.zeros(2, 1, 8, 8)).names
    ('r0c0', 'r0c1', 'r1c0', 'r1c1')
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor

from lightning_mc.core.occlusion import AttributeMasks

__all__ = ["ColumnGroups", "Columns", "CustomMasks", "Patches2d", "Patches3d", "Tokens", "Words"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_key(value: object) -> bool:
    """A dict key (str) or tuple index (int) of a batch."""
    return isinstance(value, str) or _is_int(value)


def _check_ndim(builder: str, value: Tensor, minimum: int, what: str) -> None:
    if value.ndim < minimum:
        raise ValueError(
            f"{builder} needs a modality tensor with at least {minimum} dimensions ({what}), got shape "
            f"{tuple(value.shape)}."
        )


class Columns:
    """One attribute per column of a table ``(N, F)`` (the last dimension), masks of shape ``(F, 1, F)``.

    Args:
        names: One name per column; default ``"0"``, ``"1"``, ... . The count is checked against ``F`` when called.

    Raises:
        TypeError: If ``names`` is not a sequence of strings.
        ValueError: If ``names`` is empty or has duplicates.

    Example:
        >>> import torch
        >>> Columns(names=["age", "sex", "bmi"])(torch.zeros(4, 3)).masks.shape
        torch.Size([3, 1, 3])
    """

    #: The masks depend on the tensor's shape only: the engine builds them once per batch layout.
    shape_only = True

    def __init__(self, names: Sequence[str] | None = None) -> None:
        if names is not None:
            if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
                raise TypeError(f"Columns: names={names!r} must be a sequence of strings (one per column) or None.")
            if not names:
                raise ValueError("Columns: names=[] is empty; give one name per column or None.")
            if len(set(names)) != len(names):
                raise ValueError(f"Columns: names={list(names)!r} has duplicates; column names must be unique.")
            names = tuple(names)
        self.names = names

    def __call__(self, value: Tensor) -> AttributeMasks:
        """Return one mask per column of ``value``."""
        _check_ndim("Columns", value, 2, "samples, columns")
        count = value.shape[-1]
        if self.names is not None and len(self.names) != count:
            raise ValueError(
                f"Columns: got {len(self.names)} names but the modality has {count} columns (shape "
                f"{tuple(value.shape)}); give one name per column."
            )
        names = self.names if self.names is not None else tuple(str(j) for j in range(count))
        eye = torch.eye(count, dtype=torch.bool, device=value.device)
        return AttributeMasks(eye.view(count, *([1] * (value.ndim - 1)), count), names)

    def __repr__(self) -> str:
        return f"Columns(names={self.names!r})"


class ColumnGroups:
    """One attribute per named group of columns: each group is occluded as one unit.

    Args:
        groups: ``name -> column indices`` (of the last dimension), e.g. ``{"labs": [0, 1], "age+sex": [2, 3]}``.
            Groups may overlap; columns in no group are never occluded.

    Raises:
        TypeError: If ``groups`` is not a mapping of string names to sequences of ints.
        ValueError: If ``groups`` or a group is empty, or an index is negative or repeats within a group.

    Example:
        >>> import torch
        >>> groups = ColumnGroups({"labs": [0, 1], "age+sex": [2, 3]})
        >>> groups(torch.zeros(5, 4)).masks[1]
        tensor([[False, False,  True,  True]])
    """

    #: The masks depend on the tensor's shape only: the engine builds them once per batch layout.
    shape_only = True

    def __init__(self, groups: Mapping[str, Sequence[int]]) -> None:
        if not isinstance(groups, Mapping):
            raise TypeError(
                f"ColumnGroups: groups={groups!r} ({type(groups).__name__}) must be a mapping name -> column "
                "indices, e.g. {'labs': [0, 1], 'age+sex': [2, 3]}."
            )
        if not groups:
            raise ValueError("ColumnGroups: groups={} is empty; give at least one group name -> column indices.")
        resolved: dict[str, tuple[int, ...]] = {}
        for name, columns in groups.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"ColumnGroups: group name {name!r} must be a non-empty string.")
            if isinstance(columns, (str, bytes)) or not isinstance(columns, Sequence):
                raise TypeError(f"ColumnGroups: groups[{name!r}]={columns!r} must be a sequence of column indices.")
            if not columns:
                raise ValueError(f"ColumnGroups: groups[{name!r}] is empty; give at least one column index.")
            if not all(_is_int(c) and c >= 0 for c in columns):
                raise ValueError(
                    f"ColumnGroups: groups[{name!r}]={list(columns)!r} must hold non-negative int column indices."
                )
            if len(set(columns)) != len(columns):
                raise ValueError(f"ColumnGroups: groups[{name!r}]={list(columns)!r} repeats a column.")
            resolved[name] = tuple(columns)
        self.groups = resolved

    def __call__(self, value: Tensor) -> AttributeMasks:
        """Return one mask per group of ``value``'s columns."""
        _check_ndim("ColumnGroups", value, 2, "samples, columns")
        count = value.shape[-1]
        masks = torch.zeros(len(self.groups), count, dtype=torch.bool, device=value.device)
        for index, (name, columns) in enumerate(self.groups.items()):
            if max(columns) >= count:
                raise ValueError(
                    f"ColumnGroups: groups[{name!r}] has column {max(columns)} but the modality has {count} columns "
                    f"(valid: 0..{count - 1})."
                )
            masks[index, list(columns)] = True
        return AttributeMasks(masks.view(len(self.groups), *([1] * (value.ndim - 1)), count), tuple(self.groups))

    def __repr__(self) -> str:
        return f"ColumnGroups({self.groups!r})"


def _check_size(builder: str, size: object, dims: int) -> tuple[int, ...]:
    if (
        not isinstance(size, (tuple, list)) or len(size) != dims or not all(_is_int(s) and s > 0 for s in size)  # type: ignore[union-attr]
    ):
        raise ValueError(f"{builder}: size={size!r} must be a tuple of {dims} positive ints (patch extent per dim).")
    return tuple(size)  # type: ignore[arg-type]


class _Patches:
    """A grid of patches over the last ``len(size)`` dimensions; patch ``k`` starts at ``k·size``."""

    #: The masks depend on the tensor's shape only: the engine builds them once per batch layout.
    shape_only = True

    _letters: tuple[str, ...] = ()

    def __init__(self, size: Sequence[int]) -> None:
        self.size = _check_size(type(self).__name__, size, len(self._letters))

    def grid(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Number of patches along each patched dimension for spatial ``shape`` (edge patches may be partial)."""
        return tuple(math.ceil(extent / step) for extent, step in zip(shape, self.size))

    def __call__(self, value: Tensor) -> AttributeMasks:
        """Return one mask per patch of the last dimensions of ``value``; masks are shared by all samples."""
        dims = len(self.size)
        _check_ndim(type(self).__name__, value, dims + 1, f"samples, then {dims} spatial dims")
        spatial = tuple(value.shape[-dims:])
        grid = self.grid(spatial)
        count = math.prod(grid)
        masks = torch.zeros(count, *spatial, dtype=torch.bool, device=value.device)
        names = []
        for index, position in enumerate(itertools.product(*(range(g) for g in grid))):
            region = tuple(slice(k * step, (k + 1) * step) for k, step in zip(position, self.size))
            masks[(index, *region)] = True
            names.append("".join(f"{letter}{k}" for letter, k in zip(self._letters, position)))
        return AttributeMasks(masks.view(count, *([1] * (value.ndim - dims)), *spatial), tuple(names))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class Patches2d(_Patches):
    """A grid of 2-D patches over the last two dimensions (``(N, H, W)`` or ``(N, C, H, W)``), named ``"r0c1"``.

    Patch ``(i, j)`` covers rows ``i·ph .. (i+1)·ph - 1`` and columns ``j·pw .. (j+1)·pw - 1``; when the size does
    not divide the image the last row/column of patches is partial and kept. Channels are occluded together.

    Args:
        size: ``(ph, pw)``, the patch height and width.

    Raises:
        ValueError: If ``size`` is not two positive ints.

    Example:
        >>> import torch
        >>> patches = Patches2d(size=(3, 3))(torch.zeros(2, 1, 8, 8))  # 3 x 3 patches, the last ones 3 x 2 / 2 x 3
        >>> len(patches.names), patches.names[-1], int(patches.masks[-1].sum())
        (9, 'r2c2', 4)
    """

    _letters = ("r", "c")


class Patches3d(_Patches):
    """A grid of 3-D patches over the last three dimensions (``(N, D, H, W)`` or ``(N, C, D, H, W)``).

    Patches are named ``"d0r1c2"`` (depth, row, column index); partial patches at the edges are kept.

    Args:
        size: ``(pd, ph, pw)``, the patch depth, height and width.

    Raises:
        ValueError: If ``size`` is not three positive ints.

    Example:
        >>> import torch
        >>> Patches3d(size=(2, 4, 4))(torch.zeros(1, 1, 4, 8, 8)).names[:3]
        ('d0r0c0', 'd0r0c1', 'd0r1c0')
    """

    _letters = ("d", "r", "c")


#: Where a padding mask comes from: a batch key (dict key or tuple index) or ``modality tensor -> (N, L)`` mask.
PaddingSource = Union[str, int, Callable[[Tensor], Tensor]]


def _batch_item(builder: str, argument: str, batch: Any, location: str | int) -> Tensor:
    """``batch[location]`` for a dict key or tuple index, with a message naming the argument when it is missing."""
    if batch is None:
        raise ValueError(
            f"{builder}: {argument}={location!r} is a batch key but no batch was given; the engine passes it "
            f"(call the builder as builder(value, batch=batch) yourself)."
        )
    try:
        item = batch[location]
    except (KeyError, IndexError, TypeError):
        keys = list(batch) if isinstance(batch, Mapping) else f"{len(batch)} items" if hasattr(batch, "__len__") else ""
        raise ValueError(
            f"{builder}: {argument}={location!r} is not in the batch ({type(batch).__name__} with {keys})."
        ) from None
    if not isinstance(item, Tensor):
        raise TypeError(f"{builder}: batch[{location!r}] ({argument}) is a {type(item).__name__}, expected a tensor.")
    return item


class _Padded:
    """Finds the real (non-pad) positions of a sequence modality ``(N, L, ...)``: from a pad id or a padding mask."""

    def __init__(self, builder: str, pad_id: int | None, attention_mask: PaddingSource | None) -> None:
        if pad_id is not None and attention_mask is not None:
            raise ValueError(
                f"{builder}: give pad_id or attention_mask, not both (got pad_id={pad_id!r}, "
                f"attention_mask={attention_mask!r})."
            )
        if pad_id is not None and not _is_int(pad_id):
            raise TypeError(f"{builder}: pad_id={pad_id!r} ({type(pad_id).__name__}) must be an int token id.")
        if attention_mask is not None and not (callable(attention_mask) or _is_key(attention_mask)):
            raise TypeError(
                f"{builder}: attention_mask={attention_mask!r} must be a batch key (str dict key or int tuple index "
                "of an (N, L) tensor, e.g. 'attention_mask') or a callable `tensor -> (N, L) bool tensor`."
            )
        self._builder = builder
        self.pad_id = pad_id
        self.attention_mask = attention_mask

    @property
    def reads_batch(self) -> bool:
        """Whether the builder needs the whole batch (the padding mask is a batch entry); the engine then passes it."""
        return isinstance(self.attention_mask, (str, int))

    def real_tokens(self, value: Tensor, batch: Any = None) -> Tensor:
        """Return the ``(N, L)`` boolean tensor of real (non-pad) positions of ``value``."""
        shape = tuple(value.shape[:2])
        if self.pad_id is not None:
            if value.dtype.is_floating_point or value.dtype.is_complex:
                raise TypeError(
                    f"{self._builder}: pad_id needs integer token ids, got a modality of dtype {value.dtype}."
                )
            real = value.reshape(*shape, -1).ne(self.pad_id).all(dim=-1) if value.ndim > 2 else value != self.pad_id
        elif self.attention_mask is not None:
            if self.reads_batch:
                real = _batch_item(self._builder, "attention_mask", batch, self.attention_mask)  # type: ignore[arg-type]
            else:
                real = self.attention_mask(value)  # type: ignore[operator]
            if not isinstance(real, Tensor) or tuple(real.shape) != shape:
                raise ValueError(
                    f"{self._builder}: attention_mask gave {getattr(real, 'shape', type(real).__name__)}, expected a "
                    f"tensor of shape (N, L) = {shape}."
                )
            real = real.to(device=value.device, dtype=torch.bool)
        else:
            real = torch.ones(shape, dtype=torch.bool, device=value.device)
        return real


class Tokens(_Padded):
    """One attribute per token position ``0 .. max_length - 1`` of a sequence ``(N, L)`` (or ``(N, L, ...)``).

    The count is always ``max_length`` so the attributes are the same in every batch. Masks are per sample,
    ``(max_length, N, L)``, and ``False`` on padding: pad positions are never occluded, so they get exactly 0. A
    position beyond a batch's length ``L`` has an all-false mask. The last real token is occluded like any other.

    Give at most one way to find the padding (neither: every position is real):

    Args:
        max_length: The longest sequence length the modality can have.
        pad_id: Token id of padding: a position is real where ``ids != pad_id`` (needs integer ids ``(N, L)``).
        attention_mask: Where the ``(N, L)`` mask of real tokens (``True``/1 = real) is: a batch key
            (``"attention_mask"`` in a dict batch, or a tuple index), or a callable ``modality tensor -> mask``
            (e.g. ``lambda x: x.abs().sum(-1) > 0`` for zero-padded embeddings).

    Raises:
        ValueError: If ``max_length`` is not a positive int, or both ``pad_id`` and ``attention_mask`` are given.
        TypeError: If ``pad_id`` is not an int or ``attention_mask`` is neither a batch key nor callable.

    Example:
        >>> import torch
        >>> ids = torch.tensor([[5, 6, 7], [8, 9, 0]])  # the second sequence is padded with id 0
        >>> masks = Tokens(max_length=4, pad_id=0)(ids).masks
        >>> masks.shape, masks[2].tolist()
        (torch.Size([4, 2, 3]), [[False, False, True], [False, False, False]])
        >>> batch = {"ids": ids, "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
        >>> Tokens(4, attention_mask="attention_mask")(ids, batch=batch).masks.sum().item()
        5
    """

    def __init__(
        self,
        max_length: int,
        *,
        pad_id: int | None = None,
        attention_mask: PaddingSource | None = None,
    ) -> None:
        if not _is_int(max_length) or max_length < 1:
            raise ValueError(f"Tokens: max_length={max_length!r} must be a positive int (the longest sequence).")
        super().__init__("Tokens", pad_id, attention_mask)
        self.max_length = max_length

    def __call__(self, value: Tensor, batch: Any = None) -> AttributeMasks:
        """Return one per-sample mask per position, ``False`` on padding and beyond the sequence length.

        Args:
            value: The token modality ``(N, L, ...)``.
            batch: The whole batch; needed only when ``attention_mask`` is a batch key.
        """
        _check_ndim("Tokens", value, 2, "samples, positions")
        length = value.shape[1]
        if length > self.max_length:
            raise ValueError(
                f"Tokens: the modality has {length} positions (shape {tuple(value.shape)}) but max_length="
                f"{self.max_length}; raise max_length to at least {length}."
            )
        real = self.real_tokens(value, batch)  # (N, L)
        eye = torch.eye(self.max_length, length, dtype=torch.bool, device=value.device)  # (max_length, L)
        masks = eye[:, None, :] & real[None]  # (max_length, N, L)
        masks = masks.view(*masks.shape, *([1] * (value.ndim - 2)))
        return AttributeMasks(masks, tuple(f"t{p}" for p in range(self.max_length)))

    def __repr__(self) -> str:
        return f"Tokens(max_length={self.max_length}, pad_id={self.pad_id!r}, attention_mask={self.attention_mask!r})"


class Words(_Padded):
    """One attribute per word ``0 .. max_words - 1``: every token of word ``w`` is occluded together.

    Word ``w`` of a sample is the set of its positions whose word id is ``w`` (as a tokenizer's ``word_ids()``
    gives them, with ``None`` written as ``-1``). Positions with a negative word id (padding, special tokens) and pad
    positions (``pad_id`` / ``attention_mask``) belong to no word and are never occluded. The count is always
    ``max_words``; a word a sample does not have has an all-false mask. Masks are per sample, ``(max_words, N, L)``.

    Args:
        max_words: The most words a sequence can have.
        word_ids: Where the ``(N, L)`` integer word ids are: a batch key (dict key or tuple index) or a callable
            ``modality tensor -> word ids``.
        pad_id: Token id of padding (optional; negative word ids already exclude positions).
        attention_mask: Batch key or callable giving the ``(N, L)`` mask of real tokens (optional).

    Raises:
        ValueError: If ``max_words`` is not a positive int or both ``pad_id`` and ``attention_mask`` are given.
        TypeError: If ``word_ids`` is neither a batch key nor callable.

    Example:
        >>> import torch
        >>> ids = torch.tensor([[101, 7, 8, 9, 102, 0]])  # [CLS] "play" "##ing" "chess" [SEP] [PAD]
        >>> batch = {"ids": ids, "word_ids": torch.tensor([[-1, 0, 0, 1, -1, -1]])}
        >>> masks = Words(max_words=3, word_ids="word_ids")(ids, batch=batch)
        >>> masks.names, masks.masks[0, 0].tolist()
        (('w0', 'w1', 'w2'), [False, True, True, False, False, False])
    """

    def __init__(
        self,
        max_words: int,
        word_ids: str | int | Callable[[Tensor], Tensor],
        *,
        pad_id: int | None = None,
        attention_mask: PaddingSource | None = None,
    ) -> None:
        if not _is_int(max_words) or max_words < 1:
            raise ValueError(f"Words: max_words={max_words!r} must be a positive int (the most words a sequence has).")
        if not (callable(word_ids) or _is_key(word_ids)):
            raise TypeError(
                f"Words: word_ids={word_ids!r} must be a batch key (str dict key or int tuple index of an (N, L) "
                "integer tensor) or a callable `tensor -> (N, L) word ids`."
            )
        super().__init__("Words", pad_id, attention_mask)
        self.max_words = max_words
        self.word_ids = word_ids

    @property
    def reads_batch(self) -> bool:  # noqa: D102
        return isinstance(self.word_ids, (str, int)) or super().reads_batch

    def __call__(self, value: Tensor, batch: Any = None) -> AttributeMasks:
        """Return one per-sample mask per word, ``False`` on padding and on positions of no word.

        Args:
            value: The token modality ``(N, L, ...)``.
            batch: The whole batch; needed when ``word_ids`` or ``attention_mask`` is a batch key.
        """
        _check_ndim("Words", value, 2, "samples, positions")
        shape = tuple(value.shape[:2])
        if callable(self.word_ids):
            word_ids = self.word_ids(value)
        else:
            word_ids = _batch_item("Words", "word_ids", batch, self.word_ids)
        if not isinstance(word_ids, Tensor) or tuple(word_ids.shape) != shape or word_ids.dtype.is_floating_point:
            raise ValueError(
                f"Words: word_ids gave {getattr(word_ids, 'shape', type(word_ids).__name__)} "
                f"({getattr(word_ids, 'dtype', '')}), expected an integer tensor of shape (N, L) = {shape}."
            )
        word_ids = word_ids.to(value.device)
        if word_ids.numel() and int(word_ids.max()) >= self.max_words:
            raise ValueError(
                f"Words: a sequence has word id {int(word_ids.max())} but max_words={self.max_words}; raise "
                f"max_words to at least {int(word_ids.max()) + 1}."
            )
        real = self.real_tokens(value, batch)
        words = torch.arange(self.max_words, device=value.device).view(-1, 1, 1)
        masks = (word_ids[None] == words) & real[None]  # (max_words, N, L)
        masks = masks.view(*masks.shape, *([1] * (value.ndim - 2)))
        return AttributeMasks(masks, tuple(f"w{w}" for w in range(self.max_words)))

    def __repr__(self) -> str:
        return (
            f"Words(max_words={self.max_words}, word_ids={self.word_ids!r}, pad_id={self.pad_id!r}, "
            f"attention_mask={self.attention_mask!r})"
        )


class CustomMasks:
    """A user-given list of boolean masks, one attribute each.

    Each mask broadcasts against the modality tensor ``(N, ...)`` aligned on the right: ``(F,)`` for a table's
    columns, ``(H, W)`` for an image, or the full ``(N, ...)`` for per-sample masks.

    Args:
        masks: A sequence of boolean tensors of one shape, or a boolean tensor ``(h, ...)``.
        names: One unique name per mask.

    Raises:
        TypeError: If a mask is not a boolean tensor, or a name not a string.
        ValueError: If the masks are empty, differ in shape, or the names do not match them one to one.

    Example:
        >>> import torch
        >>> centre = torch.zeros(8, 8, dtype=torch.bool)
        >>> centre[2:6, 2:6] = True
        >>> CustomMasks([centre, ~centre], ["centre", "border"])(torch.zeros(3, 1, 8, 8)).masks.shape
        torch.Size([2, 1, 1, 8, 8])
    """

    def __init__(self, masks: Sequence[Tensor] | Tensor, names: Sequence[str]) -> None:
        if isinstance(masks, Tensor):
            masks = list(masks)
        if not isinstance(masks, Sequence) or not masks:
            raise ValueError(f"CustomMasks: masks={masks!r} must be a non-empty sequence of boolean tensors.")
        for index, mask in enumerate(masks):
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError(
                    f"CustomMasks: masks[{index}] is {getattr(mask, 'dtype', type(mask).__name__)}, expected a "
                    "boolean tensor."
                )
            if mask.shape != masks[0].shape:
                raise ValueError(
                    f"CustomMasks: masks[{index}] has shape {tuple(mask.shape)} but masks[0] has "
                    f"{tuple(masks[0].shape)}; all masks need one shape."
                )
        if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"CustomMasks: names={names!r} must be a sequence of strings, one per mask.")
        if len(names) != len(masks):
            raise ValueError(f"CustomMasks: got {len(masks)} masks but {len(names)} names; give one name per mask.")
        if len(set(names)) != len(names):
            raise ValueError(f"CustomMasks: names={list(names)!r} has duplicates; names must be unique.")
        self.masks = torch.stack(list(masks))
        self.names = tuple(names)

    def __call__(self, value: Tensor) -> AttributeMasks:
        """Return the masks, shaped to broadcast against ``value``."""
        shape = tuple(self.masks.shape[1:])
        try:
            if len(shape) > value.ndim:
                raise RuntimeError
            torch.broadcast_shapes(shape, tuple(value.shape))
        except RuntimeError:
            raise ValueError(
                f"CustomMasks: masks of shape {shape} do not broadcast against the modality of shape "
                f"{tuple(value.shape)}; use the modality's trailing dims (e.g. {tuple(value.shape[1:])})."
            ) from None
        masks = self.masks.to(value.device).view(len(self.names), *([1] * (value.ndim - len(shape))), *shape)
        return AttributeMasks(masks, self.names)

    def __repr__(self) -> str:
        return f"CustomMasks(<{len(self.names)} masks of shape {tuple(self.masks.shape[1:])}>, names={self.names})"
