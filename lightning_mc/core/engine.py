"""Builds the occluded copies of a batch and runs them through the model in as few forward calls as allowed.

For a batch of ``N`` samples and ``H`` attributes over all modalities the engine needs up to ``(1 + H) · N`` rows of
model input: the clean batch and one copy per attribute, plus one copy per coalition of whole modalities an analysis
asks for. It describes each copy (:class:`~.layout.Copy`: what it occludes, on which samples it runs), lays the
copies' rows out as one virtual batch, cuts it into chunks of at most ``max_batch_size`` rows and runs each chunk in
one forward call. An attribute copy runs only on the samples its mask occludes something in; its other rows are the
clean outputs, so their difference is exactly 0. With ``encoders``, the encoder cache
(:class:`~lightning_mc.core.encoder_cache.EncoderCache`) decides what each encoder does in each call. Nothing here
knows about Lightning, and nothing here has a default: the settings come resolved from
:class:`~lightning_mc.analyses.options.MeasurementOptions`.

Example:
    >>> import torch
    >>> from lightning_mc.analyses.options import MeasurementOptions
    >>> from lightning_mc.core.modality import resolve_modalities
    >>> model = torch.nn.Bilinear(3, 2, 4)
    >>> engine = OcclusionEngine(resolve_modalities({"a": 0, "b": 1}), MeasurementOptions(occlusion="zeros").engine)
    >>> outputs = engine.run(model, (torch.randn(5, 3), torch.randn(5, 2)))
    >>> outputs.clean.shape, outputs.occluded["a"].shape
    (torch.Size([5, 4]), torch.Size([5, 1, 4]))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_mc.core.copies import (
    attribute_masks,
    coalition_copy,
    describe_copies,
    is_whole,
    outputs_by_modality,
)
from lightning_mc.core.encoder_cache import BeforeChunk, EncoderCache
from lightning_mc.core.encoders import ResolvedEncoders
from lightning_mc.core.fill_draws import FillDraws
from lightning_mc.core.forward import ForwardFn, UnmappableBatch, default_forward
from lightning_mc.core.layout import (
    BatchFills,
    BatchView,
    Copy,
    Piece,
    mask_rows,
    plan_chunks,
    sample_ranges,
    take,
)
from lightning_mc.core.modality import Batch, Modality
from lightning_mc.core.occlusion import (
    Fill,
    occlude,
    plain_tensor,
    rows_like,
)
from lightning_mc.core.outputs import GivenCleanError, OutputReader
from lightning_mc.core.replay import Recording

__all__ = [
    "DEFAULT_COPIES_PER_CALL",
    "EngineSettings",
    "ForwardFn",
    "GivenCleanError",
    "OccludedOutputs",
    "OcclusionEngine",
]


#: With ``max_batch_size=None``, one forward call takes this many batch-sized copies at most.
DEFAULT_COPIES_PER_CALL = 4


@dataclass(frozen=True)
class EngineSettings:
    """What the engine needs of a measurement's options, resolved once (:attr:`.MeasurementOptions.engine`).

    Attributes:
        forward_fn: ``(model, batch) -> output``; ``None``: :func:`default_forward`.
        outputs: Reads the prediction out of what the model returns and applies the output transform.
        fill: The fill of modalities that set none of their own.
        max_batch_size: Most rows per forward call; ``None``: ``DEFAULT_COPIES_PER_CALL ×`` the batch size.
        seed: Seed of the engine's own random generator (``"noise"``, ``"permute"``); the global RNG is never touched.
        encoders: The checked ``encoders`` spec.
    """

    forward_fn: ForwardFn | None
    outputs: OutputReader
    fill: Fill
    max_batch_size: int | None
    seed: int
    encoders: ResolvedEncoders


@dataclass(frozen=True)
class OccludedOutputs:
    """Model outputs of one batch, clean and under each occlusion.

    Attributes:
        clean: ``(N, C)``, after the output transform, outputs flattened per sample.
        occluded: ``name -> (N, h_i, C)``: outputs with attribute ``l`` of modality ``name`` occluded. A sample in
            which attribute ``l``'s mask occludes nothing was not run: its row is ``clean``'s, exactly.
        attribute_names: ``name -> h_i`` attribute names.
        coalitions: ``modality indices -> (N, C)``: the outputs with every modality of the coalition occluded whole,
            for the coalitions asked for.
        changed: ``name -> (h_i,)`` on the CPU: ``1`` where attribute ``l``'s occlusion changed some sample's input,
            ``0`` where its mask covered input but the fill equals it there (no row ran), ``-1`` where its mask
            covered nothing (padding).
        batch_size: The samples of the batch (before :meth:`first`).
    """

    clean: Tensor
    occluded: dict[str, Tensor]
    attribute_names: dict[str, tuple[str, ...]]
    coalitions: dict[frozenset[int], Tensor] = field(default_factory=dict)
    changed: dict[str, Tensor] = field(default_factory=dict)
    batch_size: int = 0

    def first(self, count: int) -> OccludedOutputs:
        """The outputs of the first ``count`` samples only."""
        return OccludedOutputs(
            self.clean[:count],
            {name: value[:count] for name, value in self.occluded.items()},
            self.attribute_names,
            {members: value[:count] for members, value in self.coalitions.items()},
            self.changed,
            self.batch_size,
        )


class OcclusionEngine:
    """Runs a model on a batch and on its occluded copies, batched.

    Args:
        modalities: The resolved modalities.
        settings: The resolved options (:attr:`.MeasurementOptions.engine`).

    Raises:
        ValueError: If ``settings.encoders`` names a modality that is not measured.
    """

    def __init__(self, modalities: Sequence[Modality], settings: EngineSettings) -> None:
        self.modalities = tuple(modalities)
        self.settings = settings
        self.outputs = settings.outputs
        self.forward_fn = settings.forward_fn if settings.forward_fn is not None else default_forward(self.modalities)
        self.fills = tuple(m.fill if m.fill is not None else settings.fill for m in self.modalities)
        #: The encoder cache (``None`` without ``encoders``).
        self.cache = None if settings.encoders is None else EncoderCache(settings.encoders, self.modalities)
        #: Each batch's fills (:meth:`start_draws` starts a measurement's draws).
        self.draws = FillDraws(self.modalities, self.fills, settings.seed)
        #: Model input rows run so far (clean and occluded copies), for progress reports.
        self.rows_forwarded = 0

    @property
    def modality_names(self) -> tuple[str, ...]:
        """The modalities' names, in order."""
        return tuple(modality.name for modality in self.modalities)

    @contextmanager
    def recording_encoders(self, model: nn.Module) -> Iterator[Recording | None]:
        """Record the encoders' outputs in the forward calls made inside the block (e.g. the validation step).

        Hand the recording to :meth:`run` with the clean outputs of the same forward call: the clean batch then never
        runs again. Yields ``None`` (and records nothing) without encoders.
        """
        if self.cache is None:
            yield None
            return
        with self.cache.recording(model) as recording:
            yield recording

    def run(
        self,
        model: nn.Module,
        batch: Batch,
        clean: Tensor | None = None,
        encoder_outputs: Recording | None = None,
        coalitions: Sequence[frozenset[int]] = (),
    ) -> OccludedOutputs:
        """Return the outputs of ``model`` on ``batch``, on every attribute copy and on each coalition asked for.

        The model runs in eval mode under :func:`torch.inference_mode`; its previous mode is restored. ``batch`` is
        never modified.

        Args:
            model: The model.
            batch: The batch.
            clean: The model's prediction on ``batch`` if it was already computed (e.g. by the validation step), as
                ``forward_fn`` and ``output_key`` would give it, before the output transform: then only the occluded
                copies are run. ``None``: the clean batch runs too.
            encoder_outputs: With ``encoders`` and ``clean``: what :meth:`recording_encoders` recorded in the forward
                call that gave ``clean``.
            coalitions: Sets of modality indices to occlude whole at once. A single modality measured whole is the
                one-at-a-time copy already and runs no extra rows.

        Raises:
            TypeError: If the model output is not a tensor.
            ValueError: If the outputs have a different shape in the occluded passes or a wrong batch dimension, a
                coalition names no known modality, or ``encoders`` names a module whose output also depends on
                another modality.
        """
        view = BatchView.of(batch, self.modalities)
        modalities = self.modalities
        masks = [attribute_masks(m, value, batch) for m, value in zip(modalities, view.values)]
        extra = [coalition_copy(modalities, members) for members in dict.fromkeys(map(frozenset, coalitions))]
        reused = {copy.occluded: next(iter(copy.occluded)) for copy in extra if is_whole(modalities, copy.occluded)}
        extra = [copy for copy in extra if copy.occluded not in reused]
        with _evaluating(model), torch.inference_mode():
            fills = self.draws.fill(view)
            attributes, changed = describe_copies(modalities, masks, view.values, fills.values)
            copies = [*([Copy(None)] if clean is None else []), *attributes, *extra]
            rows = self._run_copies(model, view, fills, copies, encoder_outputs)
            clean_rows = rows.pop(0) if clean is None else self.outputs.given_clean(clean, _width(rows), view.size)
            occluded = outputs_by_modality(modalities, masks, clean_rows, attributes, rows[: len(attributes)])
        coalition_rows = dict(zip((copy.occluded for copy in extra), rows[len(attributes) :]))
        for members, owner in reused.items():
            coalition_rows[members] = occluded[modalities[owner].name][:, 0]
        names = {m.name: a.names for m, a in zip(modalities, masks)}
        coalition_outputs = {c: coalition_rows[frozenset(c)] for c in coalitions}
        return OccludedOutputs(clean_rows, occluded, names, coalition_outputs, changed, view.size)

    def check_batch(self, model: nn.Module, batch: Batch) -> None:
        """Check the modalities, the fills and the output on ``batch`` without measuring (one forward call of 1 row).

        Raises:
            KeyError, IndexError, TypeError, ValueError: What :meth:`run` would raise on this batch for a wrong key or
                index, a fill that does not fit the data, an ``output_key`` the output lacks or an output the transform
                cannot read.
        """
        view = BatchView.of(batch, self.modalities)
        first = torch.zeros(1, dtype=torch.long, device=view.values[0].device)
        with _evaluating(model), torch.inference_mode():
            self.draws.check(view)
            fills = BatchFills(view.values, (None,) * len(view.values), (False,) * len(view.values))
            self.forward_copies(model, view, fills, [Copy(None, samples=first)])

    def forward_copies(
        self,
        model: nn.Module,
        view: BatchView,
        fills: BatchFills,
        copies: Sequence[Copy],
        before_chunk: BeforeChunk | None = None,
    ) -> list[Tensor]:
        """Lay ``copies`` out as one virtual batch, run it chunk by chunk, and split the outputs by copy.

        Args:
            model: The model (already in eval and inference mode).
            view: The batch.
            fills: The batch's fills.
            copies: The copies to run.
            before_chunk: Called with each chunk's pieces before its forward call; given one, a chunk holds copies
                that occlude the same way only (the encoder cache sets one mode per encoder per call). It returns the
                modalities (indices) whose rows are not built in that call, or ``None``: one row stands in for all,
                expanded without a copy: the fill's row where the copies replace the modality whole by a fill drawn
                without a permutation, else the clean row.
        """
        outputs, labels = [], []
        max_rows = self.rows_per_call(view.size)
        groups = None if before_chunk is None else [(copy.occluded, copy.mask is None) for copy in copies]
        for chunk in plan_chunks([copy.num_rows(view.size) for copy in copies], max_rows, groups):
            stand_ins = before_chunk(chunk) if before_chunk is not None else None
            output, label = self._forward_chunk(model, view, fills, copies, chunk, stand_ins)
            outputs.append(output)
            labels.append(label)
        if not outputs:
            return [torch.empty(0, 0) for _ in copies]
        self.outputs.check_same_width(outputs, labels)
        return list(torch.cat(outputs).split([copy.num_rows(view.size) for copy in copies]))

    def rows_per_call(self, batch_size: int) -> int:
        """The most rows one forward call takes, for batches of ``batch_size`` samples."""
        return self.settings.max_batch_size or DEFAULT_COPIES_PER_CALL * batch_size

    # ------------------------------------------------------------------------------------------------ the copies

    def _modality_rows(
        self, view: BatchView, fills: BatchFills, copy: Copy, owner: int, rows: slice | Tensor
    ) -> Tensor:
        """Rows ``rows`` of modality ``owner`` in ``copy``."""
        if owner not in copy.occluded:
            return take(view.values[owner], rows, view.size)
        if copy.mask is None:
            return take(fills.values[owner], rows, view.size)
        value, fill = take(view.values[owner], rows, view.size), take(fills.values[owner], rows, view.size)
        return occlude(value, fill, mask_rows(copy.mask, rows, view.size))

    def start_draws(self, check: int) -> None:
        """The next batch is the first of measurement ``check``: random fills depend only on the seed and where."""
        self.draws.start(check)

    # --------------------------------------------------------------------------------------------- forward calls

    def _run_copies(
        self, model: nn.Module, view: BatchView, fills: BatchFills, copies: list[Copy], given: Recording | None
    ) -> list[Tensor]:
        """The transformed outputs of each copy, ``(rows of the copy, C)``, through the encoder cache if any."""
        if self.cache is not None:
            return self.cache.run(self, model, view, fills, copies, given)
        return self.forward_copies(model, view, fills, copies)

    def _forward_chunk(
        self,
        model: nn.Module,
        view: BatchView,
        fills: BatchFills,
        copies: Sequence[Copy],
        chunk: list[Piece],
        stand_ins: frozenset[int] | None = None,
    ) -> tuple[Tensor, str]:
        """Run one chunk: its rows of every modality and of the batch's other tensors, in one forward call.

        A modality in ``stand_ins`` gets one row expanded to the chunk's rows (no copy is made): its fill's where the
        chunk's copies replace it whole by a fill drawn without a permutation (the encoder cache gives only fills that
        are the same for every sample), else its clean row.
        """
        num_rows = sum(piece.stop - piece.start for piece in chunk)
        first = copies[chunk[0].copy]
        rows = [copies[piece.copy].rows(piece.start, piece.stop) for piece in chunk]
        ranges = [span for piece_rows in rows for span in sample_ranges(piece_rows)]
        # the modality tensors are replaced below: only the other tensors of the batch are cut here
        skip = {id(original) for original in view.originals}
        chunk_batch = apply_to_collection(view.batch, Tensor, _cut_rows, rows=rows, view=view, ranges=ranges, skip=skip)
        for owner, modality in enumerate(self.modalities):
            if stand_ins and owner in stand_ins:
                filled = owner in first.occluded and first.mask is None and fills.sources[owner] is None
                source = fills.values[owner] if filled else view.values[owner]
                value = source[:1].expand(num_rows, *view.values[owner].shape[1:])
            else:
                value = torch.cat(
                    [
                        self._modality_rows(view, fills, copies[piece.copy], owner, piece_rows)
                        for piece, piece_rows in zip(chunk, rows)
                    ]
                )
            chunk_batch = modality.replace(chunk_batch, rows_like(view.originals[owner], value, ranges))
        names = list(dict.fromkeys(copies[piece.copy].name for piece in chunk))
        label = _call_label(None in names, [name for name in names if name is not None])
        return self._forward(model, chunk_batch, num_rows, label, names, view.size), label

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


def _call_label(holds_clean: bool, occluded: Sequence[str]) -> str:
    """What one forward call holds, for error messages: ``the clean batch, 'b' occluded``."""
    return ", ".join((["the clean batch"] if holds_clean else []) + [f"{name!r} occluded" for name in occluded])


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and give each submodule its own mode back afterwards.

    A model already in eval mode (the monitor's case, inside validation) is left alone: no second module-tree walk.
    A user's frozen submodule that was in eval mode inside a training model stays in eval mode.
    """
    modes = [module.training for module in model.modules()]
    needs_eval = any(modes)
    if needs_eval:
        model.eval()
    try:
        yield
    finally:
        if needs_eval:
            for module, training in zip(model.modules(), modes):
                module.training = training


def _cut_rows(
    tensor: Tensor, rows: list[slice | Tensor], view: BatchView, ranges: list[tuple[int, int]], skip: set[int]
) -> Tensor:
    """A batch tensor's rows for one chunk; tensors without the batch dimension or in ``skip`` (ids) pass unchanged."""
    if id(tensor) in skip or tensor.ndim == 0 or tensor.shape[0] != view.size:
        return tensor
    plain = plain_tensor(tensor)
    return rows_like(tensor, torch.cat([take(plain, piece_rows, view.size) for piece_rows in rows]), ranges)


def _width(rows: Sequence[Tensor]) -> int | None:
    """The outputs per sample of the copies that ran; ``None`` when none ran a row."""
    return next((copy_rows.shape[-1] for copy_rows in rows if copy_rows.numel()), None)
