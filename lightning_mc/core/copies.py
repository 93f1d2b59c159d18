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


def describe_copies(
    modalities: Sequence[Modality], masks: Sequence[AttributeMasks], values: Sequence[Tensor], fills: Sequence[Tensor]
) -> tuple[list[Copy], dict[str, Tensor]]:
    """One copy per attribute of each modality, each on the samples whose input its occlusion changes.

    A sample whose occluded input equals its clean input would be the clean sample again: its mask is all false (a
    padded token, a word the sample does not have), or the fill equals the data under the mask (``"permute"`` on a
    one-sample batch, ``"zeros"`` on zeros). It is not run, and its row of the outputs is the clean row, so its
    difference is exactly 0. Which samples each copy runs on is found on the device for every attribute of every
    modality at once and read to the host in one transfer; the samples go back in one more.

    Args:
        modalities: The measured modalities.
        masks: Each modality's attribute masks.
        values: Each modality's tensor ``(N, ...)``.
        fills: Each modality's fill for this batch, the shape of its value (or broadcastable to it).

    Returns:
        The copies, modality after modality, and ``name -> (h_i,)`` on the CPU: ``1`` where attribute ``l``'s
        occlusion changed some sample's input, ``0`` where its mask covered input but the fill equals it there (no row
        ran), ``-1`` where its mask covered nothing (padding).

    Example:
        >>> from lightning_mc.core.modality import resolve_modalities
        >>> modalities = resolve_modalities({"a": 0, "b": 1})
        >>> a, b = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.ones(2, 3)
        >>> whole = _whole_modality_masks(2, a.device)
        >>> copies, changed = describe_copies(modalities, [whole, whole], [a, b], [a * 0, b * 0])
        >>> copies[0].samples.tolist(), copies[1].samples, changed["a"].tolist()  # a's 2nd sample: zeros already
        ([0], None, [1])
    """
    flags, aligned_masks = [], []
    for owner, (attribute_masks, value, fill) in enumerate(zip(masks, values, fills)):
        if not isinstance(attribute_masks, AttributeMasks):
            raise TypeError(
                f"Modality {modalities[owner].name!r}: attributes returned {type(attribute_masks).__name__}, expected "
                "lightning_mc.masks.AttributeMasks."
            )
        if attribute_masks.whole:
            runs = _changed_rows(plain_tensor(value), plain_tensor(fill)).unsqueeze(0)  # (1, N)
            covered = torch.ones(1, 1, dtype=torch.bool, device=runs.device)
            aligned_masks.append(None)
        else:
            changed = plain_tensor(value) != plain_tensor(fill)  # NaN != NaN: a NaN input counts as changed
            aligned = _aligned(attribute_masks.masks, value.ndim)
            covered = aligned.reshape(*aligned.shape[:2], -1).any(dim=-1).any(dim=-1, keepdim=True)  # (h, 1)
            runs = _changed_samples(aligned, changed)
            aligned_masks.append(aligned)
        flags.append(torch.cat([runs, covered], dim=1))
    if not flags:
        return [], {}
    host = _to_host(flags)  # the one device sync: which samples each copy changes
    runs, covered = host[:, :-1], host[:, -1]
    every = runs.all(dim=1)
    ran = every | runs.any(dim=1)
    samples = _samples(runs, every, values[0].device)
    copies, changed_by_name, first = [], {}, 0
    for owner, (modality, attribute_masks, aligned) in enumerate(zip(modalities, masks, aligned_masks)):
        count = len(attribute_masks.names)
        if aligned is None:
            copies.append(Copy(modality.name, frozenset({owner}), None, samples[first]))
        else:
            copies.extend(
                Copy(f"{modality.name}/{label}", frozenset({owner}), mask, samples[first + index])
                for index, (label, mask) in enumerate(zip(attribute_masks.names, aligned))
            )
        rows = slice(first, first + count)
        changed_by_name[modality.name] = torch.where(covered[rows], ran[rows].long(), -1)
        first += count
    return copies, changed_by_name


#: From this many elements per sample, a whole modality on the CPU is compared with its fill sample by sample.
_PER_SAMPLE_FROM = 4096


def _changed_rows(value: Tensor, fill: Tensor) -> Tensor:
    """``(N,)``: whether each sample's input differs from its fill anywhere (a NaN input counts as changed).

    On the CPU, large samples are compared one by one with :func:`torch.equal`, which stops at the first element that
    differs (where data and fill differ, at once): comparing every element costs more than the fill itself. On other
    devices, and for small samples, every element is compared at once (no host sync).

    Example:
        >>> _changed_rows(torch.tensor([[0.0, 1.0], [0.0, 0.0], [float("nan"), 0.0]]), torch.zeros(3, 2)).tolist()
        [True, False, True]
    """
    per_sample = value[0].numel() if value.ndim and value.shape[0] else 0
    if value.device.type == "cpu" and fill.shape == value.shape and fill.dtype == value.dtype:
        if per_sample >= _PER_SAMPLE_FROM:  # torch.equal: NaN never equals, -0.0 equals 0.0, as != has it
            return torch.tensor(
                [not torch.equal(row, fill_row) for row, fill_row in zip(value, fill)], dtype=torch.bool
            )
    return (value != fill).reshape(value.shape[0], -1).any(dim=-1)


def _aligned(masks: Tensor, ndim: int) -> Tensor:
    """Masks that broadcast against ``(N, ...)`` aligned on the right, each given its sample dimension (N or 1)."""
    return masks.reshape(masks.shape[0], *[1] * (ndim + 1 - masks.ndim), *masks.shape[1:])


def _to_host(flags: list[Tensor]) -> Tensor:
    """The flags of every modality, stacked, on the CPU: one transfer where they share a device."""
    if len({flag.device for flag in flags}) == 1:
        return torch.cat(flags).cpu()
    return torch.cat([flag.cpu() for flag in flags])


#: Most elements of the ``(h, N, ...)`` mask-and-change tensor built at once (larger ones go attribute by attribute).
_MAX_BROADCAST = 2**25


def _changed_samples(aligned: Tensor, changed: Tensor) -> Tensor:
    """``(h, N)``: whether attribute ``l``'s occlusion changes sample ``n``'s input."""
    num_attributes, num_samples = aligned.shape[0], changed.shape[0]
    if num_attributes * changed.numel() <= _MAX_BROADCAST:
        return (aligned & changed).reshape(num_attributes, num_samples, -1).any(dim=-1)
    return torch.stack([(mask & changed).reshape(num_samples, -1).any(dim=-1) for mask in aligned])


def _samples(runs: Tensor, every: Tensor, device: torch.device) -> list[Tensor | None]:
    """Each copy's samples (``runs``: ``(H, N)`` bool, CPU): ``None`` where it runs on all; sent in one transfer."""
    chosen: list[Tensor | None] = [None] * runs.shape[0]
    some = (~every).nonzero().flatten()
    if not some.numel():
        return chosen
    partial = runs.index_select(0, some)
    positions = partial.nonzero()[:, 1].to(device)  # row by row: each copy's samples in order
    for copy, samples in zip(some.tolist(), positions.split(partial.sum(dim=1).tolist())):
        chosen[copy] = samples
    return chosen


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
    "attribute_masks",
    "coalition_copy",
    "describe_copies",
    "is_whole",
    "outputs_by_modality",
]
