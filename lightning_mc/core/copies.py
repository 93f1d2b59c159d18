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
from lightning_mc.core.occlusion import AttributeMasks, WholeModality


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


def attribute_copies(modalities: Sequence[Modality], owner: int, masks: AttributeMasks, value: Tensor) -> list[Copy]:
    """One copy per attribute of modality ``owner`` (tensor ``value``), each on the samples it occludes anything in.

    A sample whose mask is all false (a padded token, a word the sample does not have) would be the clean sample
    again: it is not run, and its row of the outputs is the clean row, so its difference is exactly 0.
    """
    if not isinstance(masks, AttributeMasks):
        raise TypeError(
            f"Modality {modalities[owner].name!r}: attributes returned {type(masks).__name__}, expected "
            "lightning_mc.masks.AttributeMasks."
        )
    name = modalities[owner].name
    if masks.whole:
        return [Copy(name, frozenset({owner}))]
    # masks broadcast against (N, ...) aligned on the right: give each its sample dimension (N or 1)
    aligned = masks.masks.reshape(
        masks.masks.shape[0], *[1] * (value.ndim + 1 - masks.masks.ndim), *masks.masks.shape[1:]
    )
    # one device sync per modality: which (attribute, sample) pairs occlude anything
    occludes = aligned.reshape(*aligned.shape[:2], -1).any(dim=-1).cpu()
    copies = []
    for attribute, (label, mask) in enumerate(zip(masks.names, aligned)):
        samples = occludes[attribute]
        if samples.shape[0] == 1:  # a mask shared by all samples: every sample or none
            selected = None if samples.item() else torch.empty(0, dtype=torch.long)
        else:
            selected = None if samples.all() else samples.nonzero().flatten()
        if selected is not None:
            selected = selected.to(mask.device)
        copies.append(Copy(f"{name}/{label}", frozenset({owner}), mask, selected))
    return copies


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


__all__ = ["attribute_copies", "attribute_masks", "coalition_copy", "is_whole", "outputs_by_modality"]
