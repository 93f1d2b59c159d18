"""The hand floor of P10: one measurement of :class:`~benchmarks.encoders.VolumeTableNet` by hand, in plain torch.

It is the least work a measurement with ``encoders=`` could do on that model (zeros fill, the CT whole, the table
whole or column by column), per batch:

1. the clean pass, keeping both encoders' outputs (``model.ct``, ``model.table``, ``model.head`` called directly);
2. the CT copy: the CT encoder's output on a zeros volume, computed once per measurement (one row, expanded), joined
   with the clean table encoding;
3. the table copies (one whole, or one per column with that column zeroed): the table encoder on all the occluded
   rows in one call, joined with the clean CT encoding;

then one head call for every copy, softmax, ``|Δ|`` summed per copy on the device, and the shares as a ratio of sums
once at the end. No checks, no accumulators, no NaN handling: what the library adds to it is its overhead.

Example:
    >>> _ = torch.manual_seed(0)
    >>> model = VolumeTableNet(channels=4, columns=3).eval()
    >>> batches = [{"ct": torch.randn(2, 1, 8, 8, 8), "table": torch.randn(2, 3)}]
    >>> floor = HandFloor(model, batches, per_column=True)
    >>> shares = floor.shares()
    >>> sorted(shares), round(sum(shares.values()), 6)
    (['ct', 'table'], 1.0)
    >>> len(floor.column_shares())
    3
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from benchmarks.encoders import VolumeTableNet


class HandFloor:
    """One P10 measurement by hand; calling it runs one and returns the raw sums ``[ct, table copy 1, …]``.

    Args:
        model: The model whose ``ct``, ``table`` and ``head`` are called.
        batches: Dict batches with ``"ct"`` ``(N, 1, D, H, W)`` and ``"table"`` ``(N, C)``.
        per_column: One table copy per column (column ``j`` zeroed), or one copy with the whole table zeroed.
    """

    def __init__(self, model: VolumeTableNet, batches: Sequence[dict[str, Tensor]], per_column: bool) -> None:
        self.model = model
        self.batches = batches
        self.per_column = per_column
        columns = batches[0]["table"].shape[1]
        keep = torch.ones(columns, columns) - torch.eye(columns) if per_column else torch.zeros(1, columns)
        #: ``(copies, 1, C)``: 1 where a copy keeps the table's value, 0 where it is zeroed.
        self.keep = keep.unsqueeze(1).to(batches[0]["table"].device)

    def __call__(self) -> Tensor:
        model, keep = self.model, self.keep
        copies = keep.shape[0]
        with torch.inference_mode():
            zeros_ct = model.ct(torch.zeros_like(self.batches[0]["ct"][:1]))  # once per measurement
            sums = torch.zeros(1 + copies, device=keep.device)
            for batch in self.batches:
                ct, table = batch["ct"], batch["table"]
                rows = table.shape[0]
                ct_code, table_code = model.ct(ct), model.table(table)
                clean = model.head(torch.cat([ct_code, table_code], dim=1)).float().softmax(dim=-1)
                occluded_tables = (table.unsqueeze(0) * keep).reshape(copies * rows, -1)
                occluded_codes = model.table(occluded_tables)
                joined = torch.cat(
                    [
                        torch.cat([zeros_ct.expand(rows, -1), table_code], dim=1),
                        torch.cat([ct_code.repeat(copies, 1), occluded_codes], dim=1),
                    ]
                )
                outputs = model.head(joined).float().softmax(dim=-1).view(1 + copies, rows, -1)
                sums += (outputs - clean).abs().sum(dim=(1, 2))
        return sums

    def shares(self) -> dict[str, float]:
        """``{"ct": share, "table": share}``: each modality's sum over its copies ÷ the sum over all copies."""
        sums = self()
        total = float(sums.sum())
        return {"ct": float(sums[0]) / total, "table": float(sums[1:].sum()) / total}

    def column_shares(self) -> list[float]:
        """Each table copy's share of the sum over all copies (the per-column attribute shares)."""
        sums = self()
        return (sums[1:] / sums.sum()).tolist()
