"""Runs a batch's copies through the model, chunk by chunk: the plain executor and the replaying one.

An executor takes the copies of a batch and the chunks they are cut into (:func:`~lightning_mc.core.layout.plan_chunks`,
kept in the batch's :class:`~lightning_mc.core.plan.BatchPlan`) and returns each copy's transformed outputs. Both
build a chunk's model input the same way (:class:`ChunkRunner`: each modality's rows of every copy in the chunk,
stacked, and the batch's other tensors cut to match) and make one forward call per chunk. The plain executor runs the
whole model on every row; the replaying one (``encoders=``) first tells each encoder what to do in the call (run,
replay its recorded clean rows, run one row of a constant fill) and leaves the rows of a modality that only replayed
encoders read unbuilt: one row, expanded without a copy, stands in for them.

Example:
    >>> import torch
    >>> from lightning_mc.core.layout import BatchFills, BatchView, Copy, plan_chunks
    >>> from lightning_mc.core.forward import default_forward
    >>> from lightning_mc.core.modality import resolve_modalities
    >>> from lightning_mc.core.occlusion import EncoderInput
    >>> from lightning_mc.core.outputs import OutputReader
    >>> modalities = resolve_modalities({"a": 0, "b": 1})
    >>> runner = ChunkRunner(modalities, default_forward(modalities), OutputReader(None, None))
    >>> view = BatchView.of((torch.ones(2, 3), torch.ones(2, 2)), modalities)
    >>> fills = BatchFills(tuple(v * 0 for v in view.values), (None, None), (EncoderInput.ONE_ROW,) * 2)
    >>> copies = [Copy(None), Copy("a", frozenset({0}))]
    >>> call = Call(torch.nn.Bilinear(3, 2, 1), view, fills)
    >>> outputs = PlainExecutor(runner).run(call, copies, plan_chunks([2, 2], 4))
    >>> [tuple(rows.shape) for rows in outputs]
    [(2, 1), (2, 1)]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_mc.core.forward import ForwardFn, UnmappableBatch
from lightning_mc.core.layout import BatchFills, BatchView, Copy, Piece, mask_rows, sample_ranges, take
from lightning_mc.core.modality import Batch, Modality
from lightning_mc.core.occlusion import EncoderInput, occlude, plain_tensor, rows_like
from lightning_mc.core.outputs import OutputReader
from lightning_mc.core.replay import EncoderHooks, Mode, Replay

__all__ = ["Call", "ChunkRunner", "ChunkSettings", "Executor", "PlainExecutor", "ReplayingExecutor"]


@dataclass(frozen=True)
class Call:
    """One batch's forward calls: the model (in eval and inference mode), the batch and its fills, bound once."""

    model: nn.Module
    view: BatchView
    fills: BatchFills


@dataclass(frozen=True)
class ChunkSettings:
    """What the encoders do in one forward call of the replaying executor.

    Attributes:
        modes: ``encoder name -> (mode, the sample of each row)``.
        stand_ins: The modalities (indices) whose rows are not built: one row, expanded, stands in for them.
    """

    modes: dict[str, tuple[Mode, Tensor]]
    stand_ins: frozenset[int] = frozenset()


class Executor(Protocol):
    """Runs copies, cut into chunks, and returns each copy's transformed outputs ``(rows of the copy, C)``."""

    def run(self, call: Call, copies: Sequence[Copy], chunks: Sequence[list[Piece]]) -> list[Tensor]:  # noqa: D102
        ...


class ChunkRunner:
    """Builds one chunk's model input and runs it in one forward call; shared by every executor.

    Args:
        modalities: The measured modalities.
        forward_fn: ``(model, batch) -> output``.
        outputs: Reads the prediction out of what the model returns and transforms it.
    """

    def __init__(self, modalities: Sequence[Modality], forward_fn: ForwardFn, outputs: OutputReader) -> None:
        self.modalities = tuple(modalities)
        self.forward_fn = forward_fn
        self.outputs = outputs
        #: Model input rows run so far (clean and occluded copies), for progress reports.
        self.rows_forwarded = 0

    def run(
        self,
        call: Call,
        copies: Sequence[Copy],
        chunks: Sequence[list[Piece]],
        settings: Sequence[ChunkSettings] | None = None,
        replay: Replay | None = None,
    ) -> list[Tensor]:
        """Run each chunk (``settings``: what its encoders do, one per chunk, set on ``replay``); split by copy."""
        view = call.view
        outputs, labels = [], []
        for position, chunk in enumerate(chunks):
            stand_ins = None
            if settings is not None and replay is not None:
                replay.modes = settings[position].modes
                stand_ins = settings[position].stand_ins
            output, label = self.forward_chunk(call, copies, chunk, stand_ins)
            outputs.append(output)
            labels.append(label)
        if not outputs:
            return [torch.empty(0, 0) for _ in copies]
        self.outputs.check_same_width(outputs, labels)
        return list(torch.cat(outputs).split([copy.num_rows(view.size) for copy in copies]))

    def forward_chunk(
        self, call: Call, copies: Sequence[Copy], chunk: list[Piece], stand_ins: frozenset[int] | None = None
    ) -> tuple[Tensor, str]:
        """Run one chunk: its rows of every modality and of the batch's other tensors, in one forward call.

        A modality in ``stand_ins`` gets one row expanded to the chunk's rows (no copy is made): its fill's where the
        chunk's copies replace it whole by a fill that gives encoders one row, else its clean row.
        """
        view, fills = call.view, call.fills
        num_rows = sum(piece.stop - piece.start for piece in chunk)
        first = copies[chunk[0].copy]
        rows = [copies[piece.copy].rows(piece.start, piece.stop) for piece in chunk]
        ranges = [span for piece_rows in rows for span in sample_ranges(piece_rows)]
        # the modality tensors are replaced below: only the other tensors of the batch are cut here
        skip = {id(original) for original in view.originals}
        chunk_batch = apply_to_collection(view.batch, Tensor, _cut_rows, rows=rows, view=view, ranges=ranges, skip=skip)
        for owner, modality in enumerate(self.modalities):
            if stand_ins and owner in stand_ins:
                filled = (
                    owner in first.occluded
                    and first.mask is None
                    and fills.encoder_inputs[owner] is EncoderInput.ONE_ROW
                )
                source = fills.values[owner] if filled else view.values[owner]
                value = source[:1].expand(num_rows, *view.values[owner].shape[1:])
            else:
                value = torch.cat(
                    [
                        _modality_rows(view, fills, copies[piece.copy], owner, piece_rows)
                        for piece, piece_rows in zip(chunk, rows)
                    ]
                )
            chunk_batch = modality.replace(chunk_batch, rows_like(view.originals[owner], value, ranges))
        names = list(dict.fromkeys(copies[piece.copy].name for piece in chunk))
        label = _call_label(None in names, [name for name in names if name is not None])
        return self._forward(call.model, chunk_batch, num_rows, label, names, view.size), label

    def _forward(
        self, model: nn.Module, batch: Batch, rows: int, label: str, names: Sequence[str | None], batch_size: int
    ) -> Tensor:
        self.rows_forwarded += rows
        try:
            output = self.forward_fn(model, batch)
        except UnmappableBatch:  # a mistake in the options, not in the model: raised as it is
            raise
        except Exception as err:
            occluded = [name for name in names if name is not None]
            what = f"while occluding modality {', '.join(map(repr, occluded))}" if occluded else "on the clean batch"
            raise RuntimeError(
                f"The model's forward call raised {type(err).__name__} {what} (one call of {rows} stacked rows: "
                f"{label}): {err}\n"
                "Reproduce it on this batch, one occluded copy per call, with the functional API: "
                "lightning_mc.functional.modality_contribution(model, [batch], modalities, forward_fn=forward_fn, "
                f"occlusion=occlusion, max_batch_size={batch_size}), with the same modalities, forward_fn "
                "and occlusion as here."
            ) from err
        return self.outputs.read(output, rows)


class PlainExecutor:
    """Runs every row through the whole model.

    Args:
        runner: Builds and runs each chunk.
    """

    def __init__(self, runner: ChunkRunner) -> None:
        self.runner = runner

    def run(self, call: Call, copies: Sequence[Copy], chunks: Sequence[list[Piece]]) -> list[Tensor]:
        """Each copy's outputs, one forward call per chunk."""
        return self.runner.run(call, copies, chunks)


class ReplayingExecutor:
    """Runs the copies with the named encoders replayed where their modality is left alone.

    Args:
        runner: Builds and runs each chunk.
        hooks: The named encoders of the model.
        replay: The encoders' recorded clean outputs (and the kept rows of constant fills).
        settings: ``(copies, chunks, fills) -> one ChunkSettings per chunk`` (a chunk holds copies that occlude one
            way only): what the encoders do in each call.
    """

    def __init__(
        self,
        runner: ChunkRunner,
        hooks: EncoderHooks,
        replay: Replay,
        settings: Callable[[Sequence[Copy], Sequence[list[Piece]], BatchFills], Sequence[ChunkSettings]],
    ) -> None:
        self.runner, self.hooks, self.replay, self.settings = runner, hooks, replay, settings

    def run(self, call: Call, copies: Sequence[Copy], chunks: Sequence[list[Piece]]) -> list[Tensor]:
        """Each copy's outputs, one forward call per chunk, each encoder doing what its chunk's settings say."""
        settings = self.settings(copies, chunks, call.fills)
        with self.hooks.replaying(call.model, self.replay):
            return self.runner.run(call, copies, chunks, settings, self.replay)


def _modality_rows(view: BatchView, fills: BatchFills, copy: Copy, owner: int, rows: slice | Tensor) -> Tensor:
    """Rows ``rows`` of modality ``owner`` in ``copy``."""
    if owner not in copy.occluded:
        return take(view.values[owner], rows, view.size)
    if copy.mask is None:
        return take(fills.values[owner], rows, view.size)
    value, fill = take(view.values[owner], rows, view.size), take(fills.values[owner], rows, view.size)
    return occlude(value, fill, mask_rows(copy.mask, rows, view.size))


def _call_label(holds_clean: bool, occluded: Sequence[str]) -> str:
    """What one forward call holds, for error messages: ``the clean batch, 'b' occluded``."""
    return ", ".join((["the clean batch"] if holds_clean else []) + [f"{name!r} occluded" for name in occluded])


def _cut_rows(
    tensor: Tensor, rows: list[slice | Tensor], view: BatchView, ranges: list[tuple[int, int]], skip: set[int]
) -> Tensor:
    """A batch tensor's rows for one chunk; tensors without the batch dimension or in ``skip`` (ids) pass unchanged."""
    if id(tensor) in skip or tensor.ndim == 0 or tensor.shape[0] != view.size:
        return tensor
    plain = plain_tensor(tensor)
    return rows_like(tensor, torch.cat([take(plain, piece_rows, view.size) for piece_rows in rows]), ranges)
