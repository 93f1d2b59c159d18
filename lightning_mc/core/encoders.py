"""The ``encoders`` spec: which submodules encode which modality, checked once, and how they are found in a model.

``encoders={"image": "image_encoder", "table": ["table_mlp"]}`` names, for a late-fusion model, the submodules whose
output depends on one modality's input alone (as ``model.get_submodule`` reads them). The engine records their outputs
on the clean rows and replays them for copies that leave their modality alone
(:class:`~lightning_mc.core.encoder_cache.EncoderCache`); ``"auto"`` finds them on the first batch
(:func:`~lightning_mc.core.discovery.discover_encoders`).

Example:
    >>> import torch
    >>> resolve_encoders({"image": "net.cnn", "table": ["net.mlp", "net.embed"]}, ["image", "table"])
    {'image': ('net.cnn',), 'table': ('net.mlp', 'net.embed')}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_mc.core.occlusion import plain_tensor

EncodersSpec = Union[Mapping[str, Union[str, Sequence[str]]], Literal["auto"]]
#: A checked spec: each modality's encoders as a tuple of names, ``"auto"``, or ``None`` (no encoders).
ResolvedEncoders = Union[dict[str, tuple[str, ...]], Literal["auto"], None]
#: Largest relative gap (max |cached - plain| / max |plain|) taken as float noise, by dtype of the compared values.
FLOAT32_GAP = 1e-4
HALF_GAP = 5e-2


def resolve_encoders(
    encoders: EncodersSpec | None,
    modality_names: Sequence[str] | None,
    argument: str = "encoders",
    allow_auto: bool = True,
) -> ResolvedEncoders:
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


__all__ = ["EncodersSpec", "ResolvedEncoders", "noise_gap", "relative_gap", "resolve_encoders", "submodule"]
