"""The occluded copies of a batch laid out as one virtual batch, and that batch cut into forward calls.

A :class:`Copy` says what one copy of the batch changes (which modalities, under which mask) and on which samples it
runs: an attribute copy whose mask occludes nothing in a sample (a padded token, a word the sample does not have) is
identical to the clean sample, so it is not run at all and its difference is exactly 0 by construction.
:func:`plan_chunks` cuts the copies' rows into chunks of at most ``max_rows`` rows, one forward call each.

Example:
    >>> import torch
    >>> copies = [Copy(None), Copy("b", frozenset({1})), Copy("b/t1", frozenset({1}), samples=torch.tensor([0, 2]))]
    >>> [[(p.copy, p.start, p.stop) for p in chunk] for chunk in plan_chunks([c.num_rows(3) for c in copies], 4)]
    [[(0, 0, 3), (1, 0, 1)], [(1, 1, 3), (2, 0, 2)]]
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_mc.core.modality import Batch, Modality
from lightning_mc.core.occlusion import EncoderInput, plain_tensor

#: Rows of one copy: a slice of the batch's samples, or the indices of the samples it runs on.
Rows = slice | Tensor


@dataclass(frozen=True)
class BatchView:
    """A batch with its modality tensors picked out once.

    Attributes:
        batch: The user's batch, never modified.
        originals: Each modality's tensor, of the batch's own (sub)class (a MONAI ``MetaTensor`` stays one).
        values: The same tensors as plain views: the engine cuts, fills and masks these.
        size: The number of samples ``N``.
    """

    batch: Batch
    originals: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    size: int

    @classmethod
    def of(cls, batch: Batch, modalities: Sequence[Modality]) -> BatchView:
        """Pick each modality's tensor out of ``batch``.

        Raises:
            ValueError: If the modalities have different numbers of samples.
        """
        originals = tuple(modality.select(batch) for modality in modalities)
        size = originals[0].shape[0]
        for modality, value in zip(modalities, originals):
            if value.shape[0] != size:
                raise ValueError(
                    f"Modality {modality.name!r} has {value.shape[0]} samples but {modalities[0].name!r} has {size}; "
                    "every modality needs the samples along dimension 0."
                )
        return cls(batch, originals, tuple(plain_tensor(value) for value in originals), size)


@dataclass(frozen=True)
class BatchFills:
    """Each modality's fill for one batch.

    Attributes:
        values: Each modality's filled tensor (the shape of its values; a constant fill is one element, expanded).
        orders: For a permutation (``"permute"``), the sample each filled row came from (``None`` for other fills).
        encoder_inputs: What each fill gives a replayed encoder (:class:`~lightning_mc.core.occlusion.EncoderInput`).
    """

    values: tuple[Tensor, ...]
    orders: tuple[Tensor | None, ...]
    encoder_inputs: tuple[EncoderInput, ...]


@dataclass(frozen=True)
class Copy:
    """One copy of the batch in the virtual batch.

    Attributes:
        name: What the copy occludes (``"table"``, ``"text/t3"``, ``"image+table"``), for messages; ``None`` for the
            clean batch.
        occluded: Indices of the modalities the copy changes.
        mask: The attribute mask (``(N or 1, ...)``) of the single modality in ``occluded``; ``None``: each modality
            in ``occluded`` is replaced by its fill as a whole.
        samples: The samples the copy runs on, in order; ``None``: all of them.
    """

    name: str | None
    occluded: frozenset[int] = frozenset()
    mask: Tensor | None = None
    samples: Tensor | None = None

    def num_rows(self, batch_size: int) -> int:
        """The rows this copy adds to the virtual batch."""
        return batch_size if self.samples is None else int(self.samples.numel())

    def rows(self, start: int, stop: int) -> Rows:
        """The samples at positions ``start:stop`` of this copy's rows."""
        return slice(start, stop) if self.samples is None else self.samples[start:stop]


@dataclass(frozen=True)
class Piece:
    """Positions ``start:stop`` of copy number ``copy``'s rows, in one chunk."""

    copy: int
    start: int
    stop: int


def plan_chunks(
    rows_per_copy: Sequence[int], max_rows: int, groups: Sequence[Hashable] | None = None
) -> list[list[Piece]]:
    """Cut copies of ``rows_per_copy[c]`` rows each into chunks of at most ``max_rows`` rows, in order.

    Args:
        rows_per_copy: The number of rows of each copy; a copy of 0 rows gets no piece.
        max_rows: The most rows in one chunk.
        groups: One key per copy; a chunk never holds copies of two groups (the encoder cache runs one kind of copy
            per forward call). ``None``: copies share chunks freely.

    Example:
        >>> [[(p.copy, p.start, p.stop) for p in chunk] for chunk in plan_chunks([2, 2, 2], 4, groups=[0, 1, 1])]
        [[(0, 0, 2)], [(1, 0, 2), (2, 0, 2)]]
    """
    chunks: list[list[Piece]] = [[]]
    room = max_rows
    for copy, count in enumerate(rows_per_copy):
        if groups is not None and chunks[-1] and groups[chunks[-1][-1].copy] != groups[copy]:
            chunks.append([])
            room = max_rows
        start = 0
        while start < count:
            if room == 0:
                chunks.append([])
                room = max_rows
            stop = min(count, start + room)
            chunks[-1].append(Piece(copy, start, stop))
            room -= stop - start
            start = stop
    return [chunk for chunk in chunks if chunk]


def take(tensor: Tensor, rows: Rows, batch_size: int) -> Tensor:
    """``tensor``'s rows ``rows``; the tensor itself when they are all of its ``batch_size`` rows, in order."""
    if isinstance(rows, slice):
        return tensor if rows.start == 0 and rows.stop == batch_size else tensor[rows]
    return tensor.index_select(0, rows)


def mask_rows(mask: Tensor, rows: Rows, batch_size: int) -> Tensor:
    """The rows of a per-sample mask (``(N, ...)``); a mask shared by all samples (``(1, ...)``) passes unchanged."""
    return mask if mask.shape[0] == 1 else take(mask, rows, batch_size)


def sample_ranges(rows: Rows) -> list[tuple[int, int]]:
    """The samples of ``rows`` as ``(start, stop)`` runs of consecutive indices, for :func:`~.occlusion.rows_like`.

    Example:
        >>> sample_ranges(torch.tensor([0, 1, 2, 5, 7, 8]))
        [(0, 3), (5, 6), (7, 9)]
    """
    if isinstance(rows, slice):
        return [(rows.start, rows.stop)]
    ranges: list[tuple[int, int]] = []
    for sample in rows.tolist():
        if ranges and ranges[-1][1] == sample:
            ranges[-1] = (ranges[-1][0], sample + 1)
        else:
            ranges.append((sample, sample + 1))
    return ranges


def samples_of(rows: Rows, device: torch.device) -> Tensor:
    """The sample indices of ``rows`` as a tensor on ``device``."""
    return torch.arange(rows.start, rows.stop, device=device) if isinstance(rows, slice) else rows
