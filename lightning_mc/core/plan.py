"""The plan of a batch layout: what a measurement does with every batch of the same shapes, decided once.

For a batch of ``N`` samples and ``H`` attributes over all modalities a measurement runs the clean batch (unless its
outputs are given), one copy per attribute and one per coalition of whole modalities an analysis asks for. What those
copies are (their names, masks and modalities), how their rows are cut into forward calls and what each encoder does
in each call depend on the layout only: the modalities' shapes, dtypes and devices, the batch size, whether the clean
outputs are given and the coalitions. :class:`Planner` builds one :class:`BatchPlan` per layout and hands the same
plan to every batch of that layout; the plan keeps what an executor derives from it (:meth:`BatchPlan.memo`).

What depends on a batch's values is not in the plan: which samples each copy changes
(:mod:`~lightning_mc.core.changed_rows`). A copy whose occlusion leaves a sample as it was (a padded token, zeros on
zeros) does not run on it: :meth:`BatchPlan.restricted` gives that batch its own plan, with each copy's samples.
Masks that read the batch (:class:`~lightning_mc.core.attribute_builders.Tokens` with a padding source, custom
masks) are built per batch, so such a modality's plan is not kept either.

Example:
    >>> import torch
    >>> from lightning_mc import Modality
    >>> from lightning_mc.core.layout import BatchView
    >>> from lightning_mc.core.modality import resolve_modalities
    >>> from lightning_mc.masks import Columns
    >>> modalities = resolve_modalities([Modality("a", key=0), Modality("b", key=1, attributes=Columns())])
    >>> planner = Planner(modalities)
    >>> batch = (torch.randn(4, 3), torch.randn(4, 2))
    >>> plan = planner.plan(BatchView.of(batch, modalities), clean_given=False)
    >>> [copy.name for copy in plan.copies]
    [None, 'a', 'b/0', 'b/1']
    >>> planner.plan(BatchView.of(batch, modalities), clean_given=False) is plan  # the same layout: the same plan
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_mc.core.layout import BatchView, Copy, Piece, plan_chunks
from lightning_mc.core.modality import Modality
from lightning_mc.core.occlusion import AttributeMasks, WholeModality

__all__ = ["BatchPlan", "Planner", "chunks_of", "coalition_copy"]

#: Layouts whose plans are kept (a measurement sees a handful: the full batches and a last, smaller one).
_MAX_PLANS = 64


@dataclass(frozen=True)
class BatchPlan:
    """The copies of a batch of one layout and what is derived from them, shared by every batch of the layout.

    Attributes:
        modalities: The measured modalities.
        masks: Each modality's attribute masks.
        aligned: Each modality's masks with a sample dimension, aligned on the right of its tensor (``None``: whole).
        covered: ``(H,)`` on the CPU: whether attribute ``l``'s mask covers any element (``False``: padding).
        copies: The clean copy (unless its outputs are given), one copy per attribute, then the coalition copies.
        attributes: Where the attribute copies are in ``copies``.
        reused: ``coalition -> modality index`` for coalitions that are one modality measured whole (no copy).
        batch_size: The samples ``N``.
        dense: Whether every copy runs on every sample (``False`` for a plan :meth:`restricted` to a batch).
    """

    modalities: tuple[Modality, ...]
    masks: tuple[AttributeMasks, ...]
    aligned: tuple[Tensor | None, ...]
    covered: Tensor
    copies: tuple[Copy, ...]
    attributes: slice
    reused: dict[frozenset[int], int]
    batch_size: int
    dense: bool = True
    _memo: dict[Hashable, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def attribute_names(self) -> dict[str, tuple[str, ...]]:
        """``name -> h_i`` attribute names (the same dict for every batch of the layout)."""
        return self.memo("names", lambda: {m.name: masks.names for m, masks in zip(self.modalities, self.masks)})

    @property
    def runs_clean(self) -> bool:
        """Whether the clean batch is one of the copies (its outputs were not given)."""
        return self.attributes.start == 1

    @property
    def coalitions(self) -> tuple[Copy, ...]:
        """The copies that occlude several modalities whole at once."""
        return self.copies[self.attributes.stop :]

    def memo(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """What ``build`` derives from this plan, built on first use (chunks, each call's encoder settings)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def changed(self) -> dict[str, Tensor]:
        """Which attribute copies changed anything: ``name -> (h_i,)`` on the CPU.

        ``1`` where attribute ``l``'s copy ran, ``0`` where its mask covered input that its fill equals (no row ran),
        ``-1`` where its mask covered nothing (padding). A dense plan's copies all ran: one set of flags for the layout.
        """
        if self.dense:
            return self.memo("changed", lambda: self._changed(torch.ones_like(self.covered)))
        copies = self.copies[self.attributes]
        ran = torch.tensor([copy.samples is None or bool(copy.samples.numel()) for copy in copies], dtype=torch.bool)
        return self._changed(ran)

    def _changed(self, ran: Tensor) -> dict[str, Tensor]:
        flags, first = {}, 0
        for modality, masks in zip(self.modalities, self.masks):
            rows = slice(first, first + len(masks.names))
            flags[modality.name] = torch.where(self.covered[rows], ran[rows].long(), -1)
            first = rows.stop
        return flags

    def restricted(self, samples: Sequence[Tensor | None]) -> BatchPlan:
        """This plan for one batch whose attribute copies run on ``samples`` only (``None``: on every sample).

        Its derived values are its own: the plan of the layout is not changed.
        """
        attributes = [
            Copy(copy.name, copy.occluded, copy.mask, chosen)
            for copy, chosen in zip(self.copies[self.attributes], samples)
        ]
        copies = (*self.copies[: self.attributes.start], *attributes, *self.coalitions)
        return BatchPlan(
            self.modalities,
            self.masks,
            self.aligned,
            self.covered,
            copies,
            self.attributes,
            self.reused,
            self.batch_size,
            dense=False,
        )

    def outputs_by_modality(self, clean: Tensor, rows: Sequence[Tensor]) -> dict[str, Tensor]:
        """``name -> (N, h, C)``: each attribute copy's outputs, the clean outputs on the samples it did not run.

        Args:
            clean: The clean outputs ``(N, C)``.
            rows: The attribute copies' outputs, in order, ``(rows of the copy, C)`` each.
        """
        occluded, copies, first = {}, self.copies[self.attributes], 0
        for modality, masks in zip(self.modalities, self.masks):
            own = list(zip(copies[first : first + len(masks.names)], rows[first : first + len(masks.names)]))
            first += len(masks.names)
            if all(copy.samples is None for copy, _ in own):  # every copy ran on every sample
                occluded[modality.name] = torch.stack([copy_rows for _, copy_rows in own], dim=1)
                continue
            outputs = clean.unsqueeze(1).repeat(1, len(own), 1)
            for index, (copy, copy_rows) in enumerate(own):
                if copy.samples is None:
                    outputs[:, index] = copy_rows
                elif copy.samples.numel():
                    outputs[copy.samples, index] = copy_rows
            occluded[modality.name] = outputs
        return occluded


class Planner:
    """Builds the plan of each batch layout once and keeps it.

    Args:
        modalities: The measured modalities.
    """

    def __init__(self, modalities: Sequence[Modality]) -> None:
        self.modalities = tuple(modalities)
        #: Whether every modality's masks depend on its tensor's shape only (then a layout's plan is kept).
        self.keeps_plans = all(_shape_only(modality) for modality in self.modalities)
        self._plans: dict[tuple[Any, ...], BatchPlan] = {}

    def plan(self, view: BatchView, clean_given: bool, coalitions: Sequence[frozenset[int]] = ()) -> BatchPlan:
        """The plan of ``view``'s layout: kept from an earlier batch of the layout, or built now.

        Args:
            view: The batch.
            clean_given: Whether the clean outputs are given (the clean batch does not run).
            coalitions: Sets of modality indices to occlude whole at once (the analyses' coalitions).

        Raises:
            TypeError: If an attribute builder returns no :class:`~lightning_mc.masks.AttributeMasks`.
            ValueError: If a coalition names no known modality.
        """
        wanted = tuple(dict.fromkeys(map(frozenset, coalitions)))
        if not self.keeps_plans:
            return self._build(view, clean_given, wanted)
        key = (view.size, clean_given, wanted, *((v.shape, v.dtype, v.device) for v in view.values))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = self._build(view, clean_given, wanted)
        return plan

    def _build(self, view: BatchView, clean_given: bool, coalitions: Sequence[frozenset[int]]) -> BatchPlan:
        masks, aligned, covered, attributes = [], [], [], []
        for owner, (modality, value) in enumerate(zip(self.modalities, view.values)):
            modality_masks = _attribute_masks(modality, value, view)
            masks.append(modality_masks)
            if modality_masks.whole:
                aligned.append(None)
                covered.append(torch.ones(1, dtype=torch.bool))
                attributes.append(Copy(modality.name, frozenset({owner})))
                continue
            mask = _aligned(modality_masks.masks, value.ndim)
            aligned.append(mask)
            covered.append(mask.reshape(mask.shape[0], -1).any(dim=1).cpu())
            attributes.extend(
                Copy(f"{modality.name}/{label}", frozenset({owner}), one)
                for label, one in zip(modality_masks.names, mask)
            )
        coalition_copies = {members: coalition_copy(self.modalities, members) for members in coalitions}
        reused = {members: next(iter(members)) for members in coalitions if _is_whole(self.modalities, members)}
        extra = [copy for members, copy in coalition_copies.items() if members not in reused]
        clean = [] if clean_given else [Copy(None)]
        return BatchPlan(
            self.modalities,
            tuple(masks),
            tuple(aligned),
            torch.cat(covered),
            (*clean, *attributes, *extra),
            slice(len(clean), len(clean) + len(attributes)),
            reused,
            view.size,
        )


def coalition_copy(modalities: Sequence[Modality], members: frozenset[int]) -> Copy:
    """The copy with every modality in ``members`` (indices) occluded whole.

    Raises:
        ValueError: If ``members`` is not a non-empty set of modality indices.
    """
    if not members or not members <= frozenset(range(len(modalities))):
        raise ValueError(
            f"Coalition {sorted(members)} must be a non-empty set of modality indices in range({len(modalities)})."
        )
    return Copy("+".join(modalities[i].name for i in sorted(members)), members)


def _is_whole(modalities: Sequence[Modality], members: frozenset[int]) -> bool:
    """Whether ``members`` is one modality measured whole (its one-at-a-time copy is the coalition's)."""
    return len(members) == 1 and modalities[next(iter(members))].attributes is None


def _shape_only(modality: Modality) -> bool:
    """Whether the modality's masks depend on its tensor's shape alone (whole, columns, patches)."""
    return modality.attributes is None or getattr(modality.attributes, "shape_only", False)


def _attribute_masks(modality: Modality, value: Tensor, view: BatchView) -> AttributeMasks:
    """The modality's masks; builders with ``reads_batch`` (a padding mask in the batch) get the batch too."""
    if modality.attributes is None:
        return _whole_modality_masks(value.ndim, value.device)
    builder = modality.attribute_masks
    built = builder(value, batch=view.batch) if getattr(builder, "reads_batch", False) else builder(value)
    if not isinstance(built, AttributeMasks):
        raise TypeError(
            f"Modality {modality.name!r}: attributes returned {type(built).__name__}, expected "
            "lightning_mc.masks.AttributeMasks."
        )
    return built


@functools.cache
def _whole_modality_masks(ndim: int, device: torch.device) -> AttributeMasks:
    """One all-true mask for a modality of ``ndim`` dimensions (built once: the engine only reads its count)."""
    return WholeModality()(torch.empty((0,) * ndim, device=device))


def _aligned(masks: Tensor, ndim: int) -> Tensor:
    """Masks that broadcast against ``(N, ...)`` aligned on the right, each given its sample dimension (N or 1)."""
    return masks.reshape(masks.shape[0], *[1] * (ndim + 1 - masks.ndim), *masks.shape[1:])


def chunks_of(plan: BatchPlan, max_rows: int, grouped: bool = False, skip_clean: bool = False) -> list[list[Piece]]:
    """The plan's copies cut into forward calls of at most ``max_rows`` rows, kept in the plan.

    Args:
        plan: The batch's plan.
        max_rows: The most rows per call.
        grouped: A call holds copies that occlude one way only (the replaying executor's calls).
        skip_clean: Without the clean copy (the encoder cache runs it on its own, recorded).

    Example:
        >>> from lightning_mc.core.layout import BatchView
        >>> from lightning_mc.core.modality import resolve_modalities
        >>> modalities = resolve_modalities({"a": 0, "b": 1})
        >>> plan = Planner(modalities).plan(BatchView.of((torch.ones(3, 2), torch.ones(3, 1)), modalities), False)
        >>> [[(p.copy, p.start, p.stop) for p in chunk] for chunk in chunks_of(plan, max_rows=4)]
        [[(0, 0, 3), (1, 0, 1)], [(1, 1, 3), (2, 0, 2)], [(2, 2, 3)]]
    """
    skip = skip_clean and plan.runs_clean
    copies = plan.copies[1:] if skip else plan.copies

    def build() -> list[list[Piece]]:
        groups = [(copy.occluded, copy.mask is None) for copy in copies] if grouped else None
        return plan_chunks([copy.num_rows(plan.batch_size) for copy in copies], max_rows, groups)

    return plan.memo(("chunks", max_rows, grouped, skip), build)
