"""How a modality is occluded: the value put in its place (a fill) and which parts are replaced (masks).

A *fill* maps the modality tensor of a batch, shape ``(N, ...)``, to a tensor of the same shape and dtype that
stands in for it. A *mask* says which elements of one attribute the fill replaces; a modality occluded as a
whole has a single all-true mask.

Example:
    >>> import torch
    >>> fill = resolve_fill("mean")
    >>> fill(torch.tensor([[1.0, 3.0], [0.0, 4.0]]), torch.Generator())
    tensor([[2., 2.],
            [2., 2.]])
"""

from __future__ import annotations

import enum
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

FillName = Literal["zeros", "mean", "noise", "permute"]
FillSpec = Union[FillName, float, int, bool, Callable[[Tensor], Tensor], "Fill"]

FILL_NAMES: tuple[str, ...] = ("zeros", "mean", "noise", "permute")


class EncoderInput(enum.Enum):
    """What a fill gives a replayed encoder of its modality (``encoders=``), the same for every batch.

    The encoder cache reads it instead of testing fill types: a fill says once how encoders treat it.
    """

    ONE_ROW = "one row"  # the same for every sample (zeros, a constant): the encoder runs one row, expanded
    ROWS = "rows"  # differs per sample (mean, noise, a callable): the encoder runs every row
    PERMUTED = "permuted"  # other samples' clean inputs (permute): the encoder's clean outputs, permuted, replay


def _is_integer_like(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex)


class Fill:
    """Base class of fills: the value that replaces an occluded modality (or the occluded part of it).

    Subclasses implement ``_fill``; :meth:`__call__` checks that the result can replace the input.
    """

    #: Whether the fill is defined for integer tensors such as token ids.
    supports_integer: bool = False
    #: What a replayed encoder of the filled modality gets (:class:`EncoderInput`).
    encoder_input: EncoderInput = EncoderInput.ROWS
    #: Whether the fill draws from the generator it is given (the engine seeds one per batch only for these).
    draws_random: bool = True

    def __call__(self, value: Tensor, generator: torch.Generator) -> Tensor:
        """Return the fill for ``value`` (shape ``(N, ...)``), same shape and dtype.

        Raises:
            TypeError: If the fill is not defined for ``value``'s dtype, or returns another dtype.
            ValueError: If the fill returns a tensor whose shape does not match ``value``.
        """
        if _is_integer_like(value.dtype) and not self.supports_integer:
            raise TypeError(
                f"occlusion={self!r} cannot fill a {value.dtype} tensor (token ids, other integer data): a float fill "
                "would be silently cast. Use an integer constant (e.g. `occlusion=0` for the pad token id), "
                "'permute', 'zeros' or a callable."
            )
        filled = self._fill(value, generator)
        if not isinstance(filled, Tensor):
            raise TypeError(f"occlusion={self!r} returned {type(filled).__name__}, expected a torch.Tensor.")
        if filled.dtype != value.dtype:
            raise TypeError(
                f"occlusion={self!r} returned dtype {filled.dtype} for a modality of dtype {value.dtype}; "
                "a fill must keep the dtype."
            )
        if filled.shape != value.shape:
            try:
                filled = filled.expand(value.shape)
            except RuntimeError:
                raise ValueError(
                    f"occlusion={self!r} returned shape {tuple(filled.shape)} for a modality of shape "
                    f"{tuple(value.shape)}; a fill must return the input's shape (or one that broadcasts to it)."
                ) from None
        return filled

    def _fill(self, value: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__


class ZerosFill(Fill):
    """Replace by zeros (``False`` for boolean tensors)."""

    supports_integer = True
    encoder_input = EncoderInput.ONE_ROW
    draws_random = False

    def _fill(self, value: Tensor, generator: torch.Generator) -> Tensor:
        return value.new_zeros(()).expand(value.shape)  # one element, expanded: no batch-sized buffer per batch

    def __repr__(self) -> str:
        return "'zeros'"


class MeanFill(Fill):
    """Replace by the per-sample mean of the modality tensor: the paper's fill for images.

    The mean skips NaN entries (``torch.nanmean``): a model that imputes missing values (``nan_to_num``) gets the
    mean of the values that are there, not NaN. A sample whose entries are all NaN keeps a NaN fill. Half-precision
    inputs are averaged in float32.

    Example:
        >>> MeanFill()(torch.tensor([[1.0, float("nan"), 3.0]]), torch.Generator())
        tensor([[2., 2., 2.]])
    """

    draws_random = False

    def _fill(self, value: Tensor, generator: torch.Generator) -> Tensor:
        full = value if value.dtype in (torch.float32, torch.float64) else value.float()
        if value.ndim == 1:  # one entry per sample: its own mean
            return value.clone()
        # reductions over the sample's dimensions: no copy of a non-contiguous (channels_last) input
        dims = tuple(range(1, value.ndim))
        if value.device.type == "cpu":  # nanmean costs ~8x a mean on the CPU: only where a NaN made the mean NaN
            mean = full.mean(dim=dims, keepdim=True)
            if bool(mean.isnan().any()):  # no device sync on the CPU
                mean = full.nanmean(dim=dims, keepdim=True)
        else:  # reading the flag would sync; a GPU reduction is cheap
            mean = full.nanmean(dim=dims, keepdim=True)
        return mean.to(value.dtype).expand(value.shape)

    def __repr__(self) -> str:
        return "'mean'"


@dataclass(frozen=True, repr=False)
class ConstantFill(Fill):
    """Replace by a constant (0, or an out-of-range value such as -999 for tables; a pad id for tokens).

    Args:
        value: The constant. Integer and boolean modalities need an integer (or bool) constant.
    """

    value: float | int | bool

    supports_integer = True
    encoder_input = EncoderInput.ONE_ROW
    draws_random = False

    def __call__(self, value: Tensor, generator: torch.Generator) -> Tensor:  # noqa: D102
        if _is_integer_like(value.dtype) and isinstance(self.value, float):
            raise TypeError(
                f"occlusion={self.value!r} is a float but the modality has dtype {value.dtype} (token ids or other "
                f"integer data); a float would be silently cast. Pass an integer, e.g. occlusion={int(self.value)}."
            )
        return super().__call__(value, generator)

    def _fill(self, value: Tensor, generator: torch.Generator) -> Tensor:
        return value.new_full((), self.value).expand(value.shape)  # one element, expanded

    def __repr__(self) -> str:
        return repr(self.value)


@dataclass(frozen=True, repr=False)
class NoiseFill(Fill):
    """Replace by Gaussian noise ``mean + std * N(0, 1)``, drawn from the engine's seeded generator.

    Args:
        mean: Mean of the noise.
        std: Standard deviation of the noise.
    """

    mean: float = 0.0
    std: float = 1.0

    def _fill(self, value: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(value.shape, generator=generator, device=value.device, dtype=torch.float32)
        return (self.mean + self.std * noise).to(value.dtype)

    def __repr__(self) -> str:
        return "'noise'" if (self.mean, self.std) == (0.0, 1.0) else f"NoiseFill(mean={self.mean}, std={self.std})"


class PermuteFill(Fill):
    """Replace each sample's modality by another sample's (a seeded shuffle across the batch).

    This is the Perceptual Score's occlusion: the modality keeps its marginal distribution but loses its link to
    the rest of the sample. With a batch of one sample it changes nothing.
    """

    supports_integer = True
    encoder_input = EncoderInput.PERMUTED

    def order(self, value: Tensor, generator: torch.Generator) -> Tensor:
        """The shuffle: row ``k`` of the fill is sample ``order[k]`` of ``value``."""
        return torch.randperm(value.shape[0], generator=generator, device=value.device)

    def _fill(self, value: Tensor, generator: torch.Generator) -> Tensor:
        return value[self.order(value, generator)]

    def __repr__(self) -> str:
        return "'permute'"


@dataclass(frozen=True, repr=False)
class CallableFill(Fill):
    """Replace by what a user function returns for the modality tensor.

    Args:
        function: ``tensor -> tensor`` of the same shape and dtype (or a shape that broadcasts to it).
    """

    function: Callable[[Tensor], Tensor]

    supports_integer = True
    draws_random = False

    def _fill(self, value: Tensor, generator: torch.Generator) -> Tensor:
        return self.function(value)

    def __repr__(self) -> str:
        return getattr(self.function, "__name__", repr(self.function))


_NAMED_FILLS: dict[str, Callable[[], Fill]] = {
    "zeros": ZerosFill,
    "mean": MeanFill,
    "noise": NoiseFill,
    "permute": PermuteFill,
}


def resolve_fill(spec: FillSpec, argument: str = "occlusion") -> Fill:
    """Turn a user's fill specification into a :class:`Fill`.

    Args:
        spec: ``"zeros"``, ``"mean"``, ``"noise"``, ``"permute"``, a number, a callable ``tensor -> tensor``, or a
            :class:`Fill`.
        argument: The argument's name, for error messages.

    Raises:
        ValueError: For an unknown fill name.
        TypeError: For anything else that is not a fill.
    """
    if isinstance(spec, Fill):
        return spec
    if isinstance(spec, str):
        if spec not in _NAMED_FILLS:
            raise ValueError(
                f"{argument}={spec!r} is not a known fill; expected one of {FILL_NAMES}, a number or a callable."
            )
        return _NAMED_FILLS[spec]()
    if isinstance(spec, (bool, int, float)):
        return ConstantFill(spec)
    if callable(spec):
        return CallableFill(spec)
    raise TypeError(
        f"{argument}={spec!r} ({type(spec).__name__}) is not a fill; expected one of {FILL_NAMES}, a number, "
        "a callable `tensor -> tensor` or a lightning_mc.core.occlusion.Fill."
    )


@dataclass(frozen=True)
class AttributeMasks:
    """The attributes of one modality: a boolean mask per attribute, and the attributes' names.

    Attributes:
        masks: Boolean tensor of shape ``(h, *shape)`` where ``shape`` broadcasts against the modality tensor
            ``(N, ...)``: ``(h, 1, F)`` for masks shared by all samples of a table with ``F`` columns, ``(h, N, L)``
            for per-sample token masks. ``True`` marks the elements that the fill replaces.
        names: One name per mask.
        whole: ``True`` when the single mask covers the whole modality (the engine then takes the fill as is).
    """

    masks: Tensor
    names: tuple[str, ...]
    whole: bool = False

    def __post_init__(self) -> None:
        # a mask built from a MetaTensor (a padding mask from a MONAI batch) would carry per-sample metadata along a
        # first dimension that counts attributes: MONAI would split it wrongly when the engine takes its rows
        object.__setattr__(self, "masks", plain_tensor(self.masks))
        if self.masks.dtype != torch.bool:
            raise TypeError(f"masks must be a boolean tensor, got dtype {self.masks.dtype}.")
        if self.masks.shape[0] != len(self.names):
            raise ValueError(f"got {self.masks.shape[0]} masks but {len(self.names)} names; give one name per mask.")


@runtime_checkable
class Attributes(Protocol):
    """Builds the attribute masks of a modality from its tensor in a batch."""

    def __call__(self, value: Tensor) -> AttributeMasks:
        """Return the masks for ``value`` (shape ``(N, ...)``)."""


class WholeModality:
    """A single attribute covering the whole modality: the default, one occlusion per modality."""

    def __call__(self, value: Tensor) -> AttributeMasks:
        """Return one all-true mask."""
        shape = (1,) * value.ndim
        return AttributeMasks(torch.ones((1, *shape), dtype=torch.bool, device=value.device), ("all",), whole=True)

    def __repr__(self) -> str:
        return "WholeModality()"


def occlude(value: Tensor, fill: Tensor, mask: Tensor) -> Tensor:
    """Return a copy of ``value`` with the elements under ``mask`` taken from ``fill``; ``value`` is not modified.

    Args:
        value: The modality tensor ``(N, ...)``.
        fill: Its fill, same shape.
        mask: Boolean mask broadcasting against ``value``.
    """
    return torch.where(mask, fill, value)


# Tensor subclasses (MONAI's MetaTensor and others) ------------------------------------------------------------------
#
# The engine cuts, fills, masks and stacks rows on plain views of the modality tensors, and hands each forward call
# its rows back in the batch's own type. Why: a batched MetaTensor carries one metadata entry per sample and MONAI
# applies them to dimension 0 of every result, but the engine's results are laid out differently (``(copies · N,
# ...)`` rows, ``(h, N, L)`` masks, ``(copies, N, C)`` outputs). Slicing those raises MONAI's "Inconsistent batched
# metadata dicts when slicing a batch of MetaTensors" or, worse, pairs rows with another sample's metadata; a slice
# of a MetaTensor also decollates and re-stacks the whole batch (a copy of the data per slice). A plain view shares
# the storage (no copy) and gives bit-identical numbers; the model still receives a MetaTensor, with each row's own
# metadata, for the cost of collating a few small metadata dicts per forward call. Fills and attribute builders get
# the plain view too (a builder reading a batch entry, e.g. an ``attention_mask``, still gets the batch as it is, and
# :class:`AttributeMasks` keeps its masks plain); what the model returns is read as a plain tensor.


def plain_tensor(tensor: Tensor) -> Tensor:
    """``tensor`` as a plain :class:`torch.Tensor` view of the same storage (no copy); plain tensors pass unchanged.

    Example:
        >>> class Tagged(torch.Tensor):
        ...     pass
        >>> tagged = torch.zeros(2).as_subclass(Tagged)
        >>> type(plain_tensor(tagged)).__name__, plain_tensor(tagged).data_ptr() == tagged.data_ptr()
        ('Tensor', True)
    """
    if type(tensor) is Tensor or not isinstance(tensor, Tensor) or tensor.is_nested:
        return tensor
    return tensor.as_subclass(Tensor)


def rows_like(source: Tensor, rows: Tensor, row_ranges: Sequence[tuple[int, int]]) -> Tensor:
    """Rows built from ``source``'s samples, handed back in ``source``'s type.

    ``rows`` is a plain tensor whose rows came from samples ``start .. stop - 1`` of ``source`` for each
    ``(start, stop)`` in ``row_ranges`` in turn (an occluded copy of sample ``k`` counts as sample ``k``).

    - ``source`` a plain tensor: ``rows`` as it is.
    - ``source`` a MONAI ``MetaTensor``: a ``MetaTensor`` whose metadata (``meta``, ``applied_operations``) are the
      rows' samples' metadata, batched as MONAI's ``DataLoader`` batches them, so a model or ``forward_fn`` that reads
      them sees consistent metadata; a ``MetaTensor`` that is not a batch (one metadata for every row) gives each
      row a copy of it. When the batched metadata do not split into the samples, the rows stay a plain tensor
      (with a warning): a MONAI network takes plain tensors, and no metadata is better than another sample's.
    - another subclass: ``rows.as_subclass(type(source))``, what torch's own operations return, when the subclass
      keeps torch's ``__torch_function__``; a plain tensor when it overrides it (its state cannot be rebuilt here).

    Example:
        >>> source = torch.arange(6.0).view(3, 2)
        >>> rows_like(source, torch.cat([source[1:3], source[0:1]]), [(1, 3), (0, 1)]).tolist()
        [[2.0, 3.0], [4.0, 5.0], [0.0, 1.0]]
    """
    kind = type(source)
    if kind is Tensor or not isinstance(source, Tensor):
        return rows
    meta_tensor = getattr(sys.modules.get("monai.data.meta_tensor"), "MetaTensor", None)
    if meta_tensor is not None and isinstance(source, meta_tensor):
        return _meta_tensor_rows(meta_tensor, source, rows, row_ranges)
    if getattr(kind.__torch_function__, "__func__", None) is Tensor.__torch_function__.__func__:
        return rows.as_subclass(kind)
    return rows


def _meta_tensor_rows(meta_tensor: type, source: Tensor, rows: Tensor, row_ranges: Sequence[tuple[int, int]]) -> Tensor:
    """A ``MetaTensor`` of ``rows`` with the metadata of the samples they came from (see :func:`rows_like`)."""
    from monai.data.utils import decollate_batch

    result = meta_tensor(rows)
    result.copy_meta_from(source)  # MONAI's own copy: meta, applied_operations, is_batch, spatial_ndim
    size = source.shape[0]
    if not source.is_batch or list(row_ranges) == [(0, size)]:  # one metadata for all rows, or the batch itself
        return result
    operations = source.applied_operations
    try:
        metas = decollate_batch(source.meta, detach=False)
        if len(metas) != size or len(operations) not in (0, size):  # none recorded (a hand-built batch) is fine
            raise ValueError(f"{len(metas)} metadata dicts and {len(operations)} applied_operations entries")
        index = [sample for start, stop in row_ranges for sample in range(start, stop)]
        # as MONAI's DataLoader collates them (monai.data.utils.collate_meta_tensor_fn)
        result.meta = torch.utils.data.default_collate([metas[sample] for sample in index])
    except Exception as err:  # MONAI and default_collate raise many types on metadata they cannot split
        warnings.warn(
            f"A batched MetaTensor of shape {tuple(source.shape)} has metadata that do not split into its {size} "
            f"samples ({type(err).__name__}: {err}): the rows built from it reach the model as plain tensors, without "
            "metadata. Batch MetaTensors with monai.data.DataLoader (or monai.data.list_data_collate) to keep them.",
            UserWarning,
            stacklevel=3,
        )
        return rows
    result.applied_operations = [operations[sample] for sample in index] if operations else []
    return result
