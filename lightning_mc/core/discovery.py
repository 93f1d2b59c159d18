"""``encoders="auto"``: find the submodules of a model whose output depends on one modality only.

Example:
    >>> import torch
    >>> class LateFusion(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(2, 4), torch.nn.Linear(8, 1)
    ...     def forward(self, a, b):
    ...         return self.head(torch.cat([self.a(a), self.b(b)], 1))
    >>> from lightning_mc.core.modality import resolve_modalities
    >>> model, modalities = LateFusion(), resolve_modalities({"a": 0, "b": 1})
    >>> discover_encoders(model, lambda batch: model(*batch), (torch.randn(4, 3), torch.randn(4, 2)), modalities)
    {'a': ('a',), 'b': ('b',)}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_mc.core.replay import recorder, rows_of, same_tree


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
    usable = {name for name in names if len(clean.get(name, ())) == 1 and rows_of(clean[name][0]) == size}
    for modality in modalities:
        rolled = _all_outputs(model, forward, modality.replace(batch, modality.select(batch).roll(1, 0)))
        for name in list(usable):
            if len(rolled.get(name, ())) != 1:
                usable.discard(name)
            elif not same_tree(_leaves_only(rolled[name][0]), _leaves_only(clean[name][0])):
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
        module.register_forward_hook(recorder(calls.setdefault(name, [])))
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


__all__ = ["discover_encoders"]
