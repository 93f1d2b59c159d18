"""The copies of one batch: one per attribute of each modality, one per coalition, and their outputs by modality.

An attribute copy runs only on the samples its mask occludes anything in: a sample whose mask is all false (a padded
token, a word the sample does not have) would be the clean sample again, so it is not run and its row of the outputs is
the clean row, exactly (its difference is 0 by construction, not by float luck).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_mc.core.layout import Copy
from lightning_mc.core.modality import Batch, Modality
from lightning_mc.core.occlusion import AttributeMasks, WholeModality, plain_tensor


def is_whole(modalities: Sequence[Modality], members: frozenset[int]) -> bool:
    """Whether ``members`` is one modality measured whole (its one-at-a-time copy is the coalition's)."""
    return len(members) == 1 and modalities[next(iter(members))].attributes is None


def coalition_copy(modalities: Sequence[Modality], members: frozenset[int]) -> Copy:
    """The copy with every modality in ``members`` (indices) occluded whole."""
    if not members or not members <= frozenset(range(len(modalities))):
        raise ValueError(
            f"Coalition {sorted(members)} must be a non-empty set of modality indices in range({len(modalities)})."
        )
    return Copy("+".join(modalities[i].name for i in sorted(members)), members)


def attribute_copies(
    modalities: Sequence[Modality], owner: int, masks: AttributeMasks, value: Tensor, fill: Tensor
) -> tuple[list[Copy], Tensor]:
    """One copy per attribute of modality ``owner``, each on the samples whose input its occlusion changes.

    A sample whose occluded input equals its clean input would be the clean sample again: its mask is all false (a
    padded token, a word the sample does not have), or the fill equals the data under the mask (``"permute"`` on a
    one-sample batch, ``"zeros"`` on zeros). It is not run, and its row of the outputs is the clean row, so its
    difference is exactly 0.

    Args:
        modalities: The measured modalities.
        owner: The index of the modality.
        masks: Its attribute masks.
        value: Its tensor ``(N, ...)``.
        fill: Its fill for this batch, the shape of ``value`` (or broadcastable to it).

    Returns:
        The copies, and ``(h,)`` (on the CPU): whether each attribute's mask covers anything in this batch.
    """
    if not isinstance(masks, AttributeMasks):
        raise TypeError(
            f"Modality {modalities[owner].name!r}: attributes returned {type(masks).__name__}, expected "
            "lightning_mc.masks.AttributeMasks."
        )
    name = modalities[owner].name
    changed = plain_tensor(value) != plain_tensor(fill)  # NaN != NaN: a NaN input counts as changed
    if masks.whole:
        # one device sync: which samples the fill changes
        runs = changed.reshape(changed.shape[0], -1).any(dim=-1).cpu()
        return [Copy(name, frozenset({owner}), None, _selected(runs, value.device))], torch.ones(1, dtype=torch.bool)
    # masks broadcast against (N, ...) aligned on the right: give each its sample dimension (N or 1)
    aligned = masks.masks.reshape(
        masks.masks.shape[0], *[1] * (value.ndim + 1 - masks.masks.ndim), *masks.masks.shape[1:]
    )
    covered = aligned.reshape(*aligned.shape[:2], -1).any(dim=-1).any(dim=-1, keepdim=True)  # (h, 1)
    both = torch.cat([_changed_samples(aligned, changed), covered], dim=1).cpu()  # one device sync per modality
    runs, covered = both[:, :-1], both[:, -1]
    return [
        Copy(f"{name}/{label}", frozenset({owner}), mask, _selected(runs[attribute], mask.device))
        for attribute, (label, mask) in enumerate(zip(masks.names, aligned))
    ], covered


#: Most elements of the ``(h, N, ...)`` mask-and-change tensor built at once (larger ones go attribute by attribute).
_MAX_BROADCAST = 2**25


def _changed_samples(aligned: Tensor, changed: Tensor) -> Tensor:
    """``(h, N)``: whether attribute ``l``'s occlusion changes sample ``n``'s input."""
    num_attributes, num_samples = aligned.shape[0], changed.shape[0]
    if num_attributes * changed.numel() <= _MAX_BROADCAST:
        return (aligned & changed).reshape(num_attributes, num_samples, -1).any(dim=-1)
    return torch.stack([(mask & changed).reshape(num_samples, -1).any(dim=-1) for mask in aligned])


def _selected(runs: Tensor, device: torch.device) -> Tensor | None:
    """The samples to run (``runs``: ``(N,)`` bool); ``None``: all of them."""
    return None if bool(runs.all()) else runs.nonzero().flatten().to(device)


def what_changed(modalities: Sequence[Modality], per_modality: list[tuple[list[Copy], Tensor]]) -> dict[str, Tensor]:
    """``name -> (h_i,)`` (CPU), from :func:`attribute_copies`' results: which occlusions changed an input.

    ``1`` where attribute ``l``'s occlusion changed some sample's input, ``0`` where its mask covered input but the
    fill equals it there, ``-1`` where its mask covered nothing (padding).
    """
    changed = {}
    for modality, (copies, covered) in zip(modalities, per_modality):
        ran = torch.tensor([copy.samples is None or copy.samples.numel() > 0 for copy in copies])
        changed[modality.name] = torch.where(covered, ran.long(), -1)
    return changed


def outputs_by_modality(
    modalities: Sequence[Modality], masks: list[AttributeMasks], clean: Tensor, copies: list[Copy], rows: list[Tensor]
) -> dict[str, Tensor]:
    """``name -> (N, h, C)``: each attribute copy's outputs, the clean outputs on the samples it did not run."""
    occluded, ran = {}, iter(zip(copies, rows))
    for modality, attribute_masks in zip(modalities, masks):
        own = [pair for _, pair in zip(attribute_masks.names, ran)]
        if own and all(
            copy.samples is None for copy, _ in own
        ):  # every copy ran on every sample: no clean rows to fill in
            occluded[modality.name] = torch.stack([copy_rows for _, copy_rows in own], dim=1)
            continue
        outputs = clean.unsqueeze(1).repeat(1, len(attribute_masks.names), 1)
        for index, (copy, copy_rows) in enumerate(own):
            if copy.samples is None:
                outputs[:, index] = copy_rows
            elif copy.samples.numel():
                outputs[copy.samples, index] = copy_rows
        occluded[modality.name] = outputs
    return occluded


def attribute_masks(modality: Modality, value: Tensor, batch: Batch) -> AttributeMasks:
    """The modality's masks; builders with ``reads_batch`` (a padding mask in the batch) get the batch too."""
    if modality.attributes is None:  # the whole modality: the same single mask every batch
        return _whole_modality_masks(value.ndim, value.device)
    builder = modality.attribute_masks
    return builder(value, batch=batch) if getattr(builder, "reads_batch", False) else builder(value)


@functools.cache
def _whole_modality_masks(ndim: int, device: torch.device) -> AttributeMasks:
    """One all-true mask for a modality of ``ndim`` dimensions (built once: the engine only reads its count)."""
    return WholeModality()(torch.empty((0,) * ndim, device=device))


__all__ = [
    "attribute_copies",
    "attribute_masks",
    "coalition_copy",
    "is_whole",
    "outputs_by_modality",
    "what_changed",
]
