"""Which samples each copy of a batch changes: the one guard of the plan that depends on the batch's values.

A sample whose occluded input equals its clean input would be the clean sample again: its mask is all false (a padded
token, a word the sample does not have), or the fill equals the data under the mask (``"permute"`` on a one-sample
batch, ``"zeros"`` on zeros). It is not run, and its row of the outputs is the clean row, so its difference is exactly
0 by construction, not by float luck. The test runs vectorised over the whole batch, every attribute of a modality at
once, and is read to the host once per batch: in the usual case (every copy changes every sample) the batch then runs
its layout's plan as it is; otherwise :meth:`~lightning_mc.core.plan.BatchPlan.restricted` gives it a plan of its own.

Example:
    >>> import torch
    >>> from lightning_mc.core.layout import BatchFills, BatchView
    >>> from lightning_mc.core.modality import resolve_modalities
    >>> from lightning_mc.core.occlusion import EncoderInput
    >>> from lightning_mc.core.plan import Planner
    >>> modalities = resolve_modalities({"a": 0, "b": 1})
    >>> view = BatchView.of((torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.ones(2, 3)), modalities)
    >>> fills = BatchFills(tuple(v * 0 for v in view.values), (None, None), (EncoderInput.ONE_ROW,) * 2)
    >>> plan = restrict(Planner(modalities).plan(view, clean_given=True), view, fills)
    >>> plan.copies[0].samples.tolist(), plan.copies[1].samples  # a's 2nd sample is zeros already
    ([0], None)
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mc.core.layout import BatchFills, BatchView
from lightning_mc.core.plan import BatchPlan

__all__ = ["restrict"]

#: From this many elements per sample, a whole modality on the CPU is compared with its fill sample by sample.
_PER_SAMPLE_FROM = 4096

#: Most elements of the ``(h, N, ...)`` mask-and-change tensor built at once (larger ones go attribute by attribute).
_MAX_BROADCAST = 2**25


def restrict(plan: BatchPlan, view: BatchView, fills: BatchFills) -> BatchPlan:
    """``plan`` where every attribute copy changes every sample of ``view``; else this batch's own restricted plan.

    One host read per batch (whether every copy changes every sample), and one more, of the ``(H, N)`` flags, where
    some does not.
    """
    runs = [
        _changed_samples(aligned, value, fill) for aligned, value, fill in zip(plan.aligned, view.values, fills.values)
    ]
    if not runs:
        return plan
    if all(flag.device.type == "cpu" for flag in runs):  # reading a flag is free: no concatenation in the usual case
        if all(bool(flag.all()) for flag in runs):
            return plan
        flags = torch.cat(runs)
    else:
        flags = torch.cat(runs) if len({flag.device for flag in runs}) == 1 else torch.cat([r.cpu() for r in runs])
        if bool(flags.all()):
            return plan
    host = flags.cpu()
    every = host.all(dim=1)
    return _with_samples(plan, host, every, view.values[0].device)


def _with_samples(plan: BatchPlan, runs: Tensor, every: Tensor, device: torch.device) -> BatchPlan:
    """``plan`` restricted to the samples ``runs`` (``(H, N)`` bool, CPU) says; sent to ``device`` in one transfer."""
    chosen: list[Tensor | None] = [None] * runs.shape[0]
    some = (~every).nonzero().flatten()
    partial = runs.index_select(0, some)
    positions = partial.nonzero()[:, 1].to(device)  # row by row: each copy's samples in order
    for copy, samples in zip(some.tolist(), positions.split(partial.sum(dim=1).tolist())):
        chosen[copy] = samples
    return plan.restricted(chosen)


def _changed_samples(aligned: Tensor | None, value: Tensor, fill: Tensor) -> Tensor:
    """``(h, N)``: whether attribute ``l``'s occlusion changes sample ``n``'s input (``aligned``: ``None``, whole)."""
    if aligned is None:
        return _changed_rows(value, fill)[None]
    changed = value != fill  # NaN != NaN: a NaN input counts as changed
    num_attributes, num_samples = aligned.shape[0], changed.shape[0]
    if num_attributes * changed.numel() <= _MAX_BROADCAST:
        return (aligned & changed).reshape(num_attributes, num_samples, -1).any(dim=-1)
    return torch.stack([(mask & changed).reshape(num_samples, -1).any(dim=-1) for mask in aligned])


def _changed_rows(value: Tensor, fill: Tensor) -> Tensor:
    """``(N,)``: whether each sample's input differs from its fill anywhere (a NaN input counts as changed).

    On the CPU, large samples are compared one by one with :func:`torch.equal`, which stops at the first element that
    differs (where data and fill differ, at once): comparing every element costs more than the fill itself. On other
    devices, and for small samples, every element is compared at once (no host sync).

    Example:
        >>> _changed_rows(torch.tensor([[0.0, 1.0], [0.0, 0.0], [float("nan"), 0.0]]), torch.zeros(3, 2)).tolist()
        [True, False, True]
    """
    per_sample = value.shape[1:].numel() if value.ndim and value.shape[0] else 0
    if per_sample >= _PER_SAMPLE_FROM and value.device.type == "cpu":
        if fill.shape == value.shape and fill.dtype == value.dtype:  # torch.equal: NaN never equals, -0.0 equals 0.0
            return torch.tensor(
                [not torch.equal(row, fill_row) for row, fill_row in zip(value, fill)], dtype=torch.bool
            )
    changed = torch.ne(value, fill)  # NaN != NaN: a NaN input counts as changed
    return changed.flatten(1).any(dim=1) if value.ndim > 1 else changed
