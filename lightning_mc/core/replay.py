"""Encoder replay mechanics: record a submodule's outputs with a forward hook, replay them by swapping its forward.

:class:`EncoderHooks` binds the named encoders of a model; :meth:`EncoderHooks.record` collects each encoder's output
of every forward call made inside a block (a :class:`Recording`); :meth:`EncoderHooks.replaying` replaces each
encoder's ``forward`` by one that obeys :attr:`Replay.modes` for the next forward call: look the recorded rows up
(the module does not run), run one row and expand it (a fill that is the same for every sample), or run. The original
``forward`` is always put back, also when a user's exception escapes. What each copy does is decided by
:class:`~lightning_mc.core.encoder_cache.EncoderCache`.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    >>> hooks = EncoderHooks({"x": ("0",)}, ["x", "y"])
    >>> with hooks.record(model) as recording:
    ...     _ = model(torch.ones(4, 2))
    >>> recording.concatenated([4])["0"].shape
    torch.Size([4, 3])
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_mc.core.encoders import submodule
from lightning_mc.core.occlusion import plain_tensor


class Mode(enum.Enum):
    """What a named encoder does in one forward call of the cached path."""

    RUN = "run"  # its own modality changes on these rows: run it
    REPLAY = "replay"  # its input is a clean (or permuted clean) row: look the recorded output up
    RUN_ONCE = "run once"  # a fill that is the same for every sample: run one row, expand it


@dataclass(frozen=True)
class Encoder:
    """A named encoder of one modality, found in the model."""

    name: str
    owner: int
    module: nn.Module


@dataclass
class Recording:
    """Each encoder's outputs, one entry per forward call, recorded by :meth:`EncoderHooks.record`."""

    calls: dict[str, list[Any]] = field(default_factory=dict)

    def concatenated(self, rows_per_call: Sequence[int]) -> dict[str, Any]:
        """Each encoder's outputs over the calls as one output of ``sum(rows_per_call)`` rows.

        Raises:
            ValueError: If an encoder was not called exactly once per forward call, or did not return one row per
                input row.
        """
        joined = {}
        for name, outputs in self.calls.items():
            if len(outputs) != len(rows_per_call):
                raise ValueError(
                    f"encoders: {name!r} ran {len(outputs)} times in {len(rows_per_call)} forward calls; an encoder "
                    "must run exactly once per forward call to be replayed (a module called twice, or on some calls "
                    "only, cannot be)."
                )
            for output, rows in zip(outputs, rows_per_call):
                if not has_rows(output, rows):
                    raise ValueError(
                        f"encoders: {name!r} returned no tensor with the {rows} input rows along dimension 0; an "
                        "encoder must keep the samples along dimension 0 to be replayed."
                    )
            joined[name] = _concatenate(outputs, rows_per_call)
        return joined


class EncoderHooks:
    """Records the named encoders of a model and swaps their ``forward`` for replay.

    Args:
        encoders: ``modality name -> submodule names`` (checked: :func:`~lightning_mc.core.encoders.resolve_encoders`).
        modality_names: The modalities in engine order.
    """

    def __init__(self, encoders: Mapping[str, tuple[str, ...]], modality_names: Sequence[str]) -> None:
        self.encoders = dict(encoders)
        self.modality_names = tuple(modality_names)

    def bind(self, model: nn.Module) -> list[Encoder]:
        """The named encoders of ``model``.

        Raises:
            ValueError: If a name is not a submodule of ``model``.
        """
        return [
            Encoder(name, self.modality_names.index(modality), submodule(model, name, f"encoders[{modality!r}]"))
            for modality, names in self.encoders.items()
            for name in names
        ]

    @contextmanager
    def record(self, model: nn.Module) -> Iterator[Recording]:
        """Record every encoder's output in each forward call made inside the block."""
        encoders = self.bind(model)
        recording = Recording({encoder.name: [] for encoder in encoders})
        handles = [
            encoder.module.register_forward_hook(recorder(recording.calls[encoder.name])) for encoder in encoders
        ]
        try:
            yield recording
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def replaying(self, model: nn.Module, replay: Replay) -> Iterator[Replay]:
        """Replace each encoder's ``forward`` by one that obeys ``replay.modes``; restored on leaving the block.

        The module does not run when it replays (a forward hook could only overwrite its result after it ran).
        """
        encoders = self.bind(model)
        # a forward set on the instance (a wrapper, a patch of the user's) is put back as it was, not deleted
        own = [vars(encoder.module).get("forward") for encoder in encoders]
        for encoder in encoders:
            encoder.module.forward = replay.forward_of(encoder.name, encoder.module)
        try:
            yield replay
        finally:
            for encoder, forward in zip(encoders, own):
                if forward is None:
                    del encoder.module.forward
                else:
                    encoder.module.forward = forward


class Replay:
    """The mode of each encoder in the forward call about to run, and the replaying forwards that read it.

    Args:
        recorded: Each encoder's output on the clean rows.
        once: Where a constant fill's output row is kept between batches and measurements.
    """

    def __init__(self, recorded: Mapping[str, Any], once: KeptRows) -> None:
        self.recorded = recorded
        self.once = once
        #: ``encoder name -> (mode, sample of each row)`` for the next forward call.
        self.modes: dict[str, tuple[Mode, Tensor]] = {}

    def forward_of(self, name: str, module: nn.Module) -> Callable[..., Any]:
        """The replaying forward of encoder ``name``, which is ``module``."""
        forward = module.forward

        def replaying_forward(*args: Any, **kwargs: Any) -> Any:
            mode, samples = self.modes[name]
            if mode is Mode.REPLAY:
                return _index_rows(self.recorded[name], samples)
            if mode is Mode.RUN_ONCE:
                return self._run_once(name, module, forward, samples.numel(), args, kwargs)
            return forward(*args, **kwargs)

        return replaying_forward

    def _run_once(
        self, name: str, module: nn.Module, forward: Callable[..., Any], rows: int, args: Any, kwargs: Any
    ) -> Any:
        """Run the first row only when every row of every input is the same, and expand it to ``rows`` rows.

        The row's output is kept (:class:`Kept`) and reused while every row of the inputs equals the kept input row
        (one comparison per input tensor), the module's parameters and buffers stay the same (their version counters
        move on every in-place update, an optimizer step; the tensors are listed once, when the row is computed, not
        walked on every call) and so does the autocast state.
        """
        inputs = _call_leaves(args, kwargs)
        batched = [leaf for leaf in inputs if isinstance(leaf, Tensor) and leaf.ndim > 0 and leaf.shape[0] == rows]
        if not batched:
            return forward(*args, **kwargs)
        device = batched[0].device.type
        kept = self.once.get(name, module, device)
        if kept is None or not kept.holds(inputs, rows, device):
            if not all(_rows_equal(leaf) for leaf in batched):
                return forward(*args, **kwargs)  # the fill is constant but the encoder also reads per-sample inputs
            first = _map_call(lambda leaf: _first_row(leaf, rows), args, kwargs)
            kept = Kept.of(module, first, forward(*first[0], **first[1]), device)
            self.once.rows[name] = kept
        return _map(lambda leaf: _expand_row(leaf, rows), kept.output)


#: Parameters and buffers of an encoder (elements in all) up to which a kept row keeps a copy of them, so that the
#: next measurement can reuse the row where they still hold the same values; larger encoders run the row again.
KEEP_WEIGHTS_UP_TO = 2**22


@dataclass(frozen=True)
class Kept:
    """An encoder's output on one row of a constant fill, and what it was computed from.

    Attributes:
        tensors: The module's parameters and buffers then.
        state: Their version counters, and the autocast state.
        inputs: The input row (``(args, kwargs)``, batch tensors cut to their first row).
        output: The output row.
        weights: Copies of ``tensors`` (``None`` past :data:`KEEP_WEIGHTS_UP_TO` elements).
    """

    tensors: tuple[Tensor, ...]
    state: tuple[Any, ...]
    inputs: Any
    output: Any
    weights: tuple[Tensor, ...] | None = None

    @classmethod
    def of(cls, module: nn.Module, inputs: Any, output: Any, device: str) -> Kept:
        """The kept row of ``module``, computed on ``inputs`` now."""
        tensors = (*module.parameters(), *module.buffers())
        small = sum(tensor.numel() for tensor in tensors) <= KEEP_WEIGHTS_UP_TO
        weights = tuple(tensor.detach().clone() for tensor in tensors) if small else None
        return cls(tensors, _state(tensors, device), inputs, output, weights)

    def holds(self, inputs: list[Any], rows: int, device: str) -> bool:
        """Whether the output still holds for a call with the leaves ``inputs`` of ``rows`` rows each."""
        if _state(self.tensors, device) != self.state:
            return False
        kept = _call_leaves(*self.inputs)
        return len(kept) == len(inputs) and all(_same_rows(row, leaf, rows) for row, leaf in zip(kept, inputs))

    def verified(self, module: nn.Module, device: str) -> Kept | None:
        """This row for ``module`` as it is now, if its parameters and buffers hold the values they had; else ``None``.

        Compares values, not version counters: a write through ``.data`` (an EMA swap) moves no counter.
        """
        tensors = (*module.parameters(), *module.buffers())
        if self.weights is None or len(tensors) != len(self.weights):
            return None
        for tensor, weight in zip(tensors, self.weights):
            same_kind = tensor.shape == weight.shape and tensor.dtype == weight.dtype and tensor.device == weight.device
            if not same_kind or not torch.equal(tensor, weight):
                return None
        return replace(self, tensors=tensors, state=_state(tensors, device))


class KeptRows:
    """Each encoder's kept row of a constant fill (:class:`Kept`), kept across measurements while the weights hold.

    Within a measurement a row is reused while its module's version counters stay the same; the first use in a new
    measurement (:meth:`new_measurement`) compares the module's parameters and buffers with the copies kept with the
    row, once.
    """

    def __init__(self) -> None:
        #: ``encoder name -> kept row``.
        self.rows: dict[str, Kept] = {}
        self._unverified: set[str] = set()

    def new_measurement(self) -> None:
        """The weights may have changed since the rows were computed: check each once before its next use."""
        self._unverified = set(self.rows)

    def clear(self) -> None:
        """Forget every row (a new fit)."""
        self.rows.clear()
        self._unverified.clear()

    def get(self, name: str, module: nn.Module, device: str) -> Kept | None:
        """The kept row of encoder ``name`` (``module``), verified once per measurement; ``None`` if none holds."""
        kept = self.rows.get(name)
        if kept is not None and name in self._unverified:
            self._unverified.discard(name)
            kept = kept.verified(module, device)
            if kept is None:
                del self.rows[name]
            else:
                self.rows[name] = kept
        return kept


def _state(tensors: tuple[Tensor, ...], device: str) -> tuple[Any, ...]:
    return (
        tuple(tensor._version for tensor in tensors),
        torch.is_autocast_enabled(device),
        torch.get_autocast_dtype(device),
    )


def _same_rows(row: Any, leaf: Any, rows: int) -> bool:
    """Whether ``leaf`` is ``row`` (a kept leaf): every row equal to it for a batch tensor, else equal or the same."""
    if not isinstance(row, Tensor) or not isinstance(leaf, Tensor):
        return row is leaf
    if leaf.ndim and leaf.shape[0] == rows and row.ndim and row.shape[0] == 1:
        if leaf.dtype != row.dtype or leaf.shape[1:] != row.shape[1:] or leaf.device != row.device:
            return False
        leaf = leaf[:1] if leaf.stride(0) == 0 else leaf
        return torch.equal(leaf, row.expand_as(leaf))
    return torch.equal(leaf, row)


# pytree helpers, shared with encoder discovery (lightning_mc.core.discovery) --------------------------------------


def recorder(calls: list[Any]) -> Callable[[nn.Module, Any, Any], None]:
    """A forward hook that appends the module's output (as plain tensors) to ``calls``."""

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        calls.append(_map(lambda leaf: plain_tensor(leaf) if isinstance(leaf, Tensor) else leaf, output))

    return hook


def has_rows(output: Any, rows: int) -> bool:
    """Whether one of ``output``'s tensors has ``rows`` rows along dimension 0."""
    return any(isinstance(leaf, Tensor) and leaf.ndim and leaf.shape[0] == rows for leaf in _leaves(output))


def rows_of(output: Any) -> int:
    """The largest leading dimension of the output's tensors (0 when it has none)."""
    return max((leaf.shape[0] for leaf in _leaves(output) if isinstance(leaf, Tensor) and leaf.ndim), default=0)


def same_tree(left: Any, right: Any) -> bool:
    """Whether two outputs have the same leaves: tensors equal elementwise, anything else the same object."""
    left_leaves, right_leaves = pytree.tree_leaves(left), pytree.tree_leaves(right)
    return len(left_leaves) == len(right_leaves) and all(
        torch.equal(a, b) if isinstance(a, Tensor) and isinstance(b, Tensor) else a is b
        for a, b in zip(left_leaves, right_leaves)
    )


def _rows_equal(leaf: Tensor) -> bool:
    """Whether every row of ``leaf`` equals its first (free for a row expanded with stride 0)."""
    return leaf.stride(0) == 0 or torch.equal(leaf, leaf[:1].expand_as(leaf))


def _concatenate(outputs: Sequence[Any], rows_per_call: Sequence[int]) -> Any:
    """One output from the outputs of several calls: batch tensors concatenated, anything else from the first."""
    if len(outputs) == 1:
        return outputs[0]
    flat = [pytree.tree_flatten(output) for output in outputs]
    leaves = []
    for position, first in enumerate(flat[0][0]):
        if isinstance(first, Tensor) and first.ndim and first.shape[0] == rows_per_call[0]:
            leaves.append(torch.cat([leaves_of[position] for leaves_of, _ in flat]))
        else:
            leaves.append(first)
    return pytree.tree_unflatten(leaves, flat[0][1])


def _index_rows(recorded: Any, samples: Tensor) -> Any:
    if isinstance(recorded, Tensor):  # the usual encoder output: no tree walk
        return recorded.index_select(0, samples) if recorded.ndim else recorded
    size = rows_of(recorded)
    return pytree.tree_map(
        lambda leaf: (
            leaf.index_select(0, samples) if isinstance(leaf, Tensor) and leaf.ndim and leaf.shape[0] == size else leaf
        ),
        recorded,
    )


def _leaves(tree: Any) -> list[Any]:
    """``pytree.tree_leaves``, without the tree walk for a single tensor (an encoder's usual output)."""
    return [tree] if isinstance(tree, Tensor) else pytree.tree_leaves(tree)


def _map(function: Callable[[Any], Any], tree: Any) -> Any:
    """``pytree.tree_map``, without the tree walk for a single tensor."""
    return function(tree) if isinstance(tree, Tensor) else pytree.tree_map(function, tree)


def _call_leaves(args: Any, kwargs: Any) -> list[Any]:
    """The leaves of a call's ``(args, kwargs)``; tensors passed positionally need no tree walk."""
    if not kwargs and all(isinstance(arg, Tensor) for arg in args):
        return list(args)
    return pytree.tree_leaves((args, kwargs))


def _map_call(function: Callable[[Any], Any], args: Any, kwargs: Any) -> tuple[Any, Any]:
    """``function`` on each leaf of a call's ``(args, kwargs)``, the structure kept."""
    if not kwargs and all(isinstance(arg, Tensor) for arg in args):
        return tuple(function(arg) for arg in args), {}
    return pytree.tree_map(function, (args, kwargs))


def _first_row(leaf: Any, rows: int) -> Any:
    """Row 0 of a batch tensor, copied (a view would keep the whole chunk alive); anything else as it is."""
    return leaf[:1].clone() if isinstance(leaf, Tensor) and leaf.ndim and leaf.shape[0] == rows else leaf


def _expand_row(leaf: Any, rows: int) -> Any:
    if isinstance(leaf, Tensor) and leaf.ndim and leaf.shape[0] == 1:
        return leaf.expand(rows, *leaf.shape[1:]).contiguous()
    return leaf


__all__ = ["KEEP_WEIGHTS_UP_TO", "Encoder", "EncoderHooks", "Kept", "KeptRows", "Mode", "Recording", "Replay"]
