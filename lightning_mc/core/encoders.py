"""Encoder-aware occlusion: record each modality encoder's output on the clean pass, replay it where it cannot change.

In a late-fusion network each modality has its own encoder and a fusion head combines their outputs. Occluding
modality ``i`` changes only what modality ``i``'s encoders see, so the engine records every named encoder's output
on the clean rows and, for a copy that occludes ``i``, replaces the forward of the other modalities' encoders by a
lookup of the recorded rows: only ``i``'s encoders and the layers after the encoders run.

::

    copy                    image encoder            table encoder            fusion head
    clean                   runs, recorded           runs, recorded           runs
    image occluded          runs on the copy         replays                  runs
      (fill "zeros"/number: once per batch, expanded; "permute": replays permuted recorded rows)
    table column j          replays                  runs on the copy         runs
    image+table (Shapley)   runs on the copy         runs on the copy         runs

Replay is exact only when an encoder's output row depends on its own modality's input row alone (true in eval mode
for CNNs, MLPs, transformers with their own attention mask). The engine compares the cached and the plain path on the
first samples of each measurement (:meth:`~lightning_mc.core.engine.OcclusionEngine.check_encoders_again`) and
raises a ``ValueError`` naming the module otherwise.

Example:
    >>> import torch
    >>> resolve_encoders({"image": "net.cnn", "table": ["net.mlp", "net.embed"]}, ["image", "table"])
    {'image': ('net.cnn',), 'table': ('net.mlp', 'net.embed')}
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_mc.core.occlusion import plain_tensor

EncodersSpec = Union[Mapping[str, Union[str, Sequence[str]]], Literal["auto"]]
#: Samples compared between the cached and the plain path on the first batch of a measurement.
CHECK_SAMPLES = 2
#: Largest relative gap (max |cached - plain| / max |plain|) taken as float noise, by dtype of the compared values.
FLOAT32_GAP = 1e-4
HALF_GAP = 5e-2


def resolve_encoders(
    encoders: EncodersSpec | None,
    modality_names: Sequence[str] | None,
    argument: str = "encoders",
    allow_auto: bool = True,
) -> dict[str, tuple[str, ...]] | Literal["auto"] | None:
    """Check ``encoders`` (``modality -> submodule name(s)``, or ``"auto"``) and give each modality a tuple of names.

    ``"auto"`` is kept as it is: :func:`discover_encoders` finds the encoders on the first batch.

    Args:
        encoders: The spec, or ``None``.
        modality_names: The measured modalities, every key must be one; ``None``: not known yet, not checked.
        argument: The argument's name, for error messages.
        allow_auto: Whether ``"auto"`` is accepted.

    Raises:
        TypeError: If ``encoders`` is not a mapping of modality names to a name or a sequence of names.
        ValueError: If it names an unknown modality, no module, or one module for two modalities.
    """
    if encoders is None or (allow_auto and encoders == "auto"):
        return encoders
    if not isinstance(encoders, Mapping) or not encoders:
        accepted = "None, 'auto'" if allow_auto else "None"
        raise TypeError(
            f"{argument}={encoders!r} must be {accepted} or a non-empty mapping modality -> submodule name(s), e.g. "
            "{'image': 'image_encoder', 'table': ['table_mlp']}."
        )
    resolved: dict[str, tuple[str, ...]] = {}
    for modality, names in encoders.items():
        if modality_names is not None and modality not in modality_names:
            raise ValueError(f"{argument} names modality {modality!r}; the modalities are {list(modality_names)}.")
        names = (names,) if isinstance(names, str) else names
        if not isinstance(names, Sequence) or not all(isinstance(name, str) for name in names):
            raise TypeError(
                f"{argument}[{modality!r}]={encoders[modality]!r} must be a submodule name or a non-empty list of "
                "names, as model.get_submodule reads them (e.g. 'net.image_encoder')."
            )
        if not names or not all(names):
            raise ValueError(
                f"{argument}[{modality!r}]={encoders[modality]!r} must be a submodule name or a non-empty list of "
                "names, as model.get_submodule reads them (e.g. 'net.image_encoder')."
            )
        resolved[modality] = tuple(dict.fromkeys(names))
    every = [name for names in resolved.values() for name in names]
    repeated = sorted({name for name in every if every.count(name) > 1})
    if repeated:
        raise ValueError(f"{argument} names {repeated} for more than one modality; an encoder belongs to one modality.")
    return resolved


def submodule(model: nn.Module, name: str, argument: str = "encoders") -> nn.Module:
    """``model.get_submodule(name)``, or a ``ValueError`` that lists the model's top-level submodules.

    Example:
        >>> submodule(nn.Sequential(nn.Linear(2, 2)), "0")
        Linear(in_features=2, out_features=2, bias=True)
    """
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = [child for child, _ in model.named_children()]
        raise ValueError(
            f"{argument}: {type(model).__name__} has no submodule {name!r}. Its top-level submodules are "
            f"{children!r}; name nested ones with dots (e.g. 'net.image_encoder')."
        ) from None


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
    """Each encoder's outputs, one entry per forward call, recorded by :meth:`EncoderCache.record`."""

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
                if not _has_rows(output, rows):
                    raise ValueError(
                        f"encoders: {name!r} returned no tensor with the {rows} input rows along dimension 0; an "
                        "encoder must keep the samples along dimension 0 to be replayed."
                    )
            joined[name] = _concatenate(outputs, rows_per_call)
        return joined


class EncoderCache:
    """Records the named encoders on the clean rows and replays them for copies that leave their modality alone.

    Args:
        encoders: ``modality name -> submodule names``, as :func:`resolve_encoders` gives them.
        modality_names: The modalities in engine order.
    """

    def __init__(self, encoders: Mapping[str, tuple[str, ...]], modality_names: Sequence[str]) -> None:
        self.encoders = dict(encoders)
        self.modality_names = tuple(modality_names)
        #: ``encoder name -> (state, input row, output row)`` of a fill that is the same for every sample: the same
        #: in every batch, so it runs once per measurement while the encoder's parameters stay as they are.
        self.once: dict[str, tuple[Any, Any, Any]] = {}

    def forget(self) -> None:
        """Drop the outputs kept for constant fills (a new measurement starts)."""
        self.once.clear()

    def bind(self, model: nn.Module) -> list[Encoder]:
        """The named encoders of ``model``.

        Raises:
            ValueError: If a name is not a submodule of ``model``.
        """
        found = []
        for modality, names in self.encoders.items():
            for name in names:
                module = submodule(model, name, f"encoders[{modality!r}]")
                found.append(Encoder(name, self.modality_names.index(modality), module))
        return found

    @contextmanager
    def record(self, model: nn.Module) -> Iterator[Recording]:
        """Record every encoder's output in each forward call made inside the block."""
        recording = Recording({encoder.name: [] for encoder in self.bind(model)})
        handles = [
            encoder.module.register_forward_hook(_recorder(recording.calls[encoder.name]))
            for encoder in self.bind(model)
        ]
        try:
            yield recording
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def replaying(self, model: nn.Module, recorded: Mapping[str, Any]) -> Iterator[Replay]:
        """Replace each encoder's ``forward`` by one that obeys :attr:`Replay.modes`; restored on leaving the block.

        The module does not run when it replays (a forward hook could only overwrite its result after it ran).
        """
        encoders = self.bind(model)
        replay = Replay(recorded, self.once)
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
        once: Where a constant fill's output row is kept (:attr:`EncoderCache.once`).
    """

    def __init__(self, recorded: Mapping[str, Any], once: dict[str, tuple[Any, Any, Any]]) -> None:
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

        The row's output is kept and reused while the input row, the module's parameters and buffers (their version
        counters move on every in-place update, an optimizer step) and the autocast state stay the same.
        """
        inputs = pytree.tree_leaves((args, kwargs))
        batched = [leaf for leaf in inputs if isinstance(leaf, Tensor) and leaf.ndim > 0 and leaf.shape[0] == rows]
        if not batched or not all(torch.equal(leaf, leaf[:1].expand_as(leaf)) for leaf in batched):
            return forward(*args, **kwargs)  # the fill is constant but the encoder also reads per-sample inputs
        first = pytree.tree_map(lambda leaf: _first_row(leaf, rows), (args, kwargs))
        device = batched[0].device.type
        state = (
            tuple(tensor._version for tensor in (*module.parameters(), *module.buffers())),
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device),
        )
        kept = self.once.get(name)
        if kept is None or kept[0] != state or not _same_tree(kept[1], first):
            kept = (state, first, forward(*first[0], **first[1]))
            self.once[name] = kept
        return pytree.tree_map(lambda leaf: _expand_row(leaf, rows), kept[2])


def discover_encoders(
    model: nn.Module, forward: Callable[[Any], Any], batch: Any, modalities: Sequence[Any]
) -> dict[str, tuple[str, ...]]:
    """The largest submodules of ``model`` whose output depends on one modality only (``encoders="auto"``).

    Runs the batch once as it is and once per modality with that modality's samples rolled by one (each row gets
    another sample's input: it works for token ids as for images), recording every submodule's outputs. A submodule
    is an encoder of modality ``m`` when it runs once per forward call with the samples along dimension 0, its output
    moves when ``m`` is rolled and stays bit-identical when any other modality is. Of nested candidates the outermost
    is kept. A batch needs at least 2 samples.

    Args:
        model: The model.
        forward: ``batch -> output``: the model called on a batch.
        batch: A batch of at least 2 samples.
        modalities: The :class:`~lightning_mc.core.modality.Modality` objects, in order.
    """
    names = [name for name, _ in model.named_modules() if name]
    clean = _all_outputs(model, forward, batch)
    moved: dict[str, set[str]] = {name: set() for name in names}
    size = modalities[0].select(batch).shape[0]
    usable = {name for name in names if len(clean.get(name, ())) == 1 and _rows_of(clean[name][0]) == size}
    for modality in modalities:
        rolled = _all_outputs(model, forward, modality.replace(batch, modality.select(batch).roll(1, 0)))
        for name in list(usable):
            if len(rolled.get(name, ())) != 1:
                usable.discard(name)
            elif not _same_tree(_leaves_only(rolled[name][0]), _leaves_only(clean[name][0])):
                moved[name].add(modality.name)
    candidates = {name: next(iter(moved[name])) for name in usable if len(moved[name]) == 1}
    found: dict[str, list[str]] = {}
    for name, owner in candidates.items():
        parts = name.split(".")
        if not any(".".join(parts[:end]) in candidates for end in range(1, len(parts))):
            found.setdefault(owner, []).append(name)
    return {modality.name: tuple(found[modality.name]) for modality in modalities if modality.name in found}


def _all_outputs(model: nn.Module, forward: Callable[[Any], Any], batch: Any) -> dict[str, list[Any]]:
    """Every named submodule's outputs (one entry per call) in one forward call on ``batch``."""
    calls: dict[str, list[Any]] = {}
    handles = [
        module.register_forward_hook(_recorder(calls.setdefault(name, [])))
        for name, module in model.named_modules()
        if name
    ]
    try:
        forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: outputs for name, outputs in calls.items() if outputs}


def _leaves_only(output: Any) -> list[Tensor]:
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, Tensor)]


def relative_gap(actual: Any, expected: Any) -> float:
    """The largest ``max |actual - expected| / max |expected|`` over the tensors of two outputs of the same shape."""
    gaps = [0.0]
    for got, want in zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected)):
        if not isinstance(want, Tensor) or not isinstance(got, Tensor):
            continue
        if got.shape != want.shape:
            return float("inf")
        got, want = plain_tensor(got).double(), plain_tensor(want).double()
        scale = want.abs().max().item() if want.numel() else 0.0
        gaps.append((got - want).abs().max().item() / max(scale, 1e-12) if want.numel() else 0.0)
    return max(gaps)


def noise_gap(*outputs: Any) -> float:
    """The relative gap that float noise can explain for outputs of these dtypes (half precision: coarser)."""
    dtypes = {leaf.dtype for output in outputs for leaf in pytree.tree_leaves(output) if isinstance(leaf, Tensor)}
    return HALF_GAP if dtypes & {torch.float16, torch.bfloat16} else FLOAT32_GAP


def _recorder(calls: list[Any]) -> Callable[[nn.Module, Any, Any], None]:
    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        calls.append(pytree.tree_map(lambda leaf: plain_tensor(leaf) if isinstance(leaf, Tensor) else leaf, output))

    return hook


def _has_rows(output: Any, rows: int) -> bool:
    """Whether one of ``output``'s tensors has ``rows`` rows along dimension 0."""
    return any(isinstance(leaf, Tensor) and leaf.ndim and leaf.shape[0] == rows for leaf in pytree.tree_leaves(output))


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
    size = _rows_of(recorded)
    return pytree.tree_map(
        lambda leaf: (
            leaf.index_select(0, samples) if isinstance(leaf, Tensor) and leaf.ndim and leaf.shape[0] == size else leaf
        ),
        recorded,
    )


def _rows_of(output: Any) -> int:
    """The largest leading dimension of the output's tensors (0 when it has none)."""
    return max(
        (leaf.shape[0] for leaf in pytree.tree_leaves(output) if isinstance(leaf, Tensor) and leaf.ndim), default=0
    )


def _first_row(leaf: Any, rows: int) -> Any:
    """Row 0 of a batch tensor, copied (a view would keep the whole chunk alive); anything else as it is."""
    return leaf[:1].clone() if isinstance(leaf, Tensor) and leaf.ndim and leaf.shape[0] == rows else leaf


def _expand_row(leaf: Any, rows: int) -> Any:
    if isinstance(leaf, Tensor) and leaf.ndim and leaf.shape[0] == 1:
        return leaf.expand(rows, *leaf.shape[1:]).contiguous()
    return leaf


def _same_tree(left: Any, right: Any) -> bool:
    left_leaves, right_leaves = pytree.tree_leaves(left), pytree.tree_leaves(right)
    return len(left_leaves) == len(right_leaves) and all(
        torch.equal(a, b) if isinstance(a, Tensor) and isinstance(b, Tensor) else a is b
        for a, b in zip(left_leaves, right_leaves)
    )
