"""Builds the occluded copies of a batch and runs them through the model in as few forward calls as allowed.

For a batch of ``N`` samples and ``H`` attributes over all modalities the engine needs up to ``(1 + H) · N`` rows of
model input: the clean batch and one copy per attribute. It describes each copy (:class:`~.layout.Copy`: what it
occludes, on which samples it runs), lays the copies' rows out as one virtual batch, cuts it into chunks of at most
``max_batch_size`` rows and runs each chunk in one forward call. An attribute copy runs only on the samples its mask
occludes something in; its other rows are the clean outputs, so their difference is exactly 0. With ``encoders``, the
named encoders' outputs on the clean rows are recorded and replayed for copies that leave their modality alone
(:mod:`~lightning_mc.core.encoders`). Nothing here knows about Lightning.

Example:
    >>> import torch
    >>> from lightning_mc.core.modality import resolve_modalities
    >>> model = torch.nn.Bilinear(3, 2, 4)
    >>> engine = OcclusionEngine(resolve_modalities({"a": 0, "b": 1}), occlusion="zeros")
    >>> outputs = engine.run(model, (torch.randn(5, 3), torch.randn(5, 2)))
    >>> outputs.clean.shape, outputs.occluded["a"].shape
    (torch.Size([5, 4]), torch.Size([5, 1, 4]))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torchmetrics.utilities import rank_zero_info, rank_zero_warn

from lightning_mc.core.checks import check_int
from lightning_mc.core.encoders import (
    CHECK_SAMPLES,
    EncoderCache,
    EncodersSpec,
    Mode,
    Recording,
    discover_encoders,
    noise_gap,
    relative_gap,
    resolve_encoders,
)
from lightning_mc.core.layout import BatchView, Copy, Piece, mask_rows, plan_chunks, sample_ranges, samples_of, take
from lightning_mc.core.modality import Batch, Modality
from lightning_mc.core.occlusion import (
    AttributeMasks,
    FillSpec,
    PermuteFill,
    WholeModality,
    occlude,
    plain_tensor,
    resolve_fill,
    rows_like,
)
from lightning_mc.core.outputs import GivenCleanError, OutputReader, OutputTransform

__all__ = ["DEFAULT_COPIES_PER_CALL", "ForwardFn", "GivenCleanError", "OccludedOutputs", "OcclusionEngine"]

ForwardFn = Callable[[nn.Module, Batch], Any]

#: With ``max_batch_size=None``, one forward call takes this many batch-sized copies at most.
DEFAULT_COPIES_PER_CALL = 4
#: Mixed into the user's seed so the fills' random stream never equals data drawn with the same seed.
_SEED_SALT = 0x6C6D63


@dataclass(frozen=True)
class OccludedOutputs:
    """Model outputs of one batch, clean and under each occlusion.

    Attributes:
        clean: ``(N, C)``, after the output transform, outputs flattened per sample.
        occluded: ``name -> (N, h_i, C)``: outputs with attribute ``l`` of modality ``name`` occluded. A sample in
            which attribute ``l``'s mask occludes nothing was not run: its row is ``clean``'s, exactly.
        attribute_names: ``name -> h_i`` attribute names.
    """

    clean: Tensor
    occluded: dict[str, Tensor]
    attribute_names: dict[str, tuple[str, ...]]


def default_forward(modalities: Sequence[Modality]) -> ForwardFn:
    """The default ``forward_fn``: the model called with the modality tensors as positional arguments, in order.

    For ``modalities={"image": "x_img", "table": "x_tab"}`` this is ``model(batch["x_img"], batch["x_tab"])``.
    """
    return _PositionalForward(tuple(modalities))


class _PositionalForward:
    """``model(*modality_tensors)``; a class, not a closure, so monitors pickle (``ddp_spawn`` sends callbacks)."""

    def __init__(self, modalities: tuple[Modality, ...]) -> None:
        self.modalities = modalities

    def __call__(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(*(modality.select(batch) for modality in self.modalities))


@dataclass(frozen=True)
class _Fills:
    """Each modality's fill for one batch, and for ``"permute"`` the sample each filled row came from."""

    values: tuple[Tensor, ...]
    sources: tuple[Tensor | None, ...]
    same_for_every_sample: tuple[bool, ...]


class OcclusionEngine:
    """Runs a model on a batch and on its occluded copies, batched.

    Args:
        modalities: The resolved modalities.
        forward_fn: ``(model, batch) -> output``; default :func:`default_forward`.
        output_transform: Output activation applied before differences are taken: ``None``, ``"softmax"``
            (over the last dimension), ``"sigmoid"`` or a callable.
        occlusion: Default fill for modalities that do not set their own.
        max_batch_size: Most rows per forward call. ``None``: ``4 ×`` the incoming batch size, so a call holds the
            clean batch and up to three occluded copies.
        seed: Seed of the engine's own random generator (used by ``"noise"`` and ``"permute"``); the global RNG is
            never touched.
        output_key: Where the prediction is in the output (a dict key, ``ModelOutput`` field or attribute, e.g.
            ``"logits"``); ``None``: the output is the prediction tensor. Applied after ``forward_fn``.
        encoders: ``modality -> submodule name(s)`` of the model (as ``model.get_submodule`` reads them) whose
            outputs are recorded on the clean pass and replayed for the copies that occlude another modality. The
            first batch after construction or :meth:`check_encoders_again` compares the cached path with the plain
            one on its first samples.

    Raises:
        ValueError: On an invalid ``max_batch_size``, ``output_transform`` or ``encoders``.
    """

    def __init__(
        self,
        modalities: Sequence[Modality],
        forward_fn: ForwardFn | None = None,
        output_transform: OutputTransform = None,
        occlusion: FillSpec = "mean",
        max_batch_size: int | None = None,
        seed: int = 0,
        output_key: str | None = None,
        encoders: EncodersSpec | None = None,
    ) -> None:
        check_int("max_batch_size", max_batch_size, optional=True)
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"forward_fn={forward_fn!r} must be a callable (model, batch) -> Tensor.")
        self.outputs = OutputReader(output_key, output_transform)
        self.modalities = tuple(modalities)
        self.forward_fn = forward_fn if forward_fn is not None else default_forward(self.modalities)
        default_fill = resolve_fill(occlusion)
        self.fills = tuple(m.fill if m.fill is not None else default_fill for m in self.modalities)
        self.max_batch_size = max_batch_size
        self.seed = seed
        self.encoders = resolve_encoders(encoders, self.modality_names)
        self._cache = None if not isinstance(self.encoders, dict) else EncoderCache(self.encoders, self.modality_names)
        self._check_pending = True
        self._last_recorded: tuple[tuple[Tensor, ...], dict[str, Any]] | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        #: Model input rows run so far (clean and occluded copies), for progress reports.
        self.rows_forwarded = 0

    @property
    def modality_names(self) -> tuple[str, ...]:
        """The modalities' names, in order."""
        return tuple(modality.name for modality in self.modalities)

    @property
    def output_key(self) -> str | None:
        """Where the prediction is in the model's output."""
        return self.outputs.output_key

    @property
    def output_transform(self) -> OutputTransform:
        """The output activation applied before differences are taken."""
        return self.outputs.output_transform

    def check_encoders_again(self) -> None:
        """Compare the cached path with the plain one on the next batch, and run constant fills' encoders again.

        Called when a new measurement starts (:meth:`lightning_mc.ContributionMeasurement.reset`).
        """
        self._check_pending = True
        if self._cache is not None:
            self._cache.forget()

    @contextmanager
    def recording_encoders(self, model: nn.Module) -> Iterator[Recording | None]:
        """Record the encoders' outputs in the forward calls made inside the block (e.g. the validation step).

        Hand the recording to :meth:`run` with the clean outputs of the same forward call: the clean batch then never
        runs again. Yields ``None`` (and records nothing) without ``encoders``.
        """
        if self._cache is None:
            yield None
            return
        with self._cache.record(model) as recording:
            yield recording

    def run(
        self, model: nn.Module, batch: Batch, clean: Tensor | None = None, encoder_outputs: Recording | None = None
    ) -> OccludedOutputs:
        """Return the outputs of ``model`` on ``batch`` and on every occluded copy.

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

        Raises:
            TypeError: If the model output is not a tensor.
            ValueError: If the outputs have a different shape in the occluded passes or a wrong batch dimension, or
                if ``encoders`` names a module whose output also depends on another modality.
        """
        view = BatchView.of(batch, self.modalities)
        masks = [self._attribute_masks(m, value, batch) for m, value in zip(self.modalities, view.values)]
        attribute_copies = [copy for i, m in enumerate(masks) for copy in self._attribute_copies(i, m, view.values[i])]
        with _evaluating(model), torch.inference_mode():
            fills = self._fill_batch(view)
            if clean is None:
                clean_rows, *rows = self._run_copies(model, view, fills, [Copy(None), *attribute_copies])
            else:
                rows = self._run_copies(model, view, fills, attribute_copies, encoder_outputs)
                clean_rows = self.outputs.given_clean(clean, _width(rows), view.size)
            occluded = self._by_modality(masks, clean_rows, attribute_copies, rows)
        return OccludedOutputs(clean_rows, occluded, {m.name: a.names for m, a in zip(self.modalities, masks)})

    def run_coalitions(
        self,
        model: nn.Module,
        batch: Batch,
        coalitions: Sequence[frozenset[int]],
        include_clean: bool = True,
        encoder_outputs: Recording | None = None,
    ) -> tuple[Tensor | None, Tensor]:
        """Return the outputs of ``model`` on ``batch`` and on one copy per coalition of whole modalities occluded.

        Copy ``k`` has every modality whose index (in ``self.modalities``) is in ``coalitions[k]`` replaced by its
        fill at once (the whole modality; attributes are ignored). The copies are laid out and cut into forward calls
        as in :meth:`run`. The model runs in eval mode under :func:`torch.inference_mode`; its previous mode is
        restored. With ``include_clean=False`` the clean outputs are not returned (``None``): the caller already has
        them from :meth:`run` on the same batch.

        Returns:
            ``(clean, occluded)``: ``(N, C)`` and ``(N, len(coalitions), C)``, after the output transform.

        Raises:
            ValueError: On a coalition naming no known modality index, or mismatched batch dimensions.
        """
        copies = []
        for coalition in map(frozenset, coalitions):
            if not coalition or not coalition <= frozenset(range(len(self.modalities))):
                raise ValueError(
                    f"Coalition {sorted(coalition)} must be a non-empty set of modality indices in "
                    f"range({len(self.modalities)})."
                )
            copies.append(Copy("+".join(self.modalities[i].name for i in sorted(coalition)), coalition))
        view = BatchView.of(batch, self.modalities)
        with _evaluating(model), torch.inference_mode():
            rows = self._run_copies(
                model, view, self._fill_batch(view), [Copy(None)] * include_clean + copies, encoder_outputs
            )
        clean = rows.pop(0) if include_clean else None
        return clean, torch.stack(rows, dim=1)

    def _by_modality(
        self, masks: list[AttributeMasks], clean: Tensor, copies: list[Copy], rows: list[Tensor]
    ) -> dict[str, Tensor]:
        """``name -> (N, h, C)``: each attribute copy's outputs, the clean outputs on the samples it did not run."""
        occluded, ran = {}, iter(zip(copies, rows))
        for modality, attribute_masks in zip(self.modalities, masks):
            outputs = clean.unsqueeze(1).repeat(1, len(attribute_masks.names), 1)
            for index, (copy, copy_rows) in zip(range(len(attribute_masks.names)), ran):
                if copy.samples is None:
                    outputs[:, index] = copy_rows
                elif copy.samples.numel():
                    outputs[copy.samples, index] = copy_rows
            occluded[modality.name] = outputs
        return occluded

    def given_clean(self, clean: Tensor, num_outputs: int, batch_size: int) -> Tensor:
        """A clean prediction computed elsewhere, checked and transformed (see :meth:`.OutputReader.given_clean`)."""
        return self.outputs.given_clean(clean, num_outputs, batch_size)

    # ------------------------------------------------------------------------------------------------ the copies

    def _attribute_copies(self, owner: int, masks: AttributeMasks, value: Tensor) -> list[Copy]:
        """One copy per attribute of modality ``owner`` (tensor ``value``), each on the samples it occludes anything in.

        A sample whose mask is all false (a padded token, a word the sample does not have) would be the clean sample
        again: it is not run, and its row of the outputs is the clean row, so its difference is exactly 0.
        """
        if not isinstance(masks, AttributeMasks):
            raise TypeError(
                f"Modality {self.modalities[owner].name!r}: attributes returned {type(masks).__name__}, expected "
                "lightning_mc.masks.AttributeMasks."
            )
        name = self.modalities[owner].name
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

    def _fill_batch(self, view: BatchView) -> _Fills:
        """Each modality's fill for this batch; ``"permute"`` keeps its order (the encoder cache replays by it)."""
        values, sources = [], []
        for modality, fill, value in zip(self.modalities, self.fills, view.values):
            generator = self._generator(value.device)
            try:
                if isinstance(fill, PermuteFill):
                    order = fill.order(value, generator)
                    values.append(value[order])
                    sources.append(order)
                else:
                    values.append(fill(value, generator))
                    sources.append(None)
            except (TypeError, ValueError) as err:
                raise type(err)(f"Modality {modality.name!r}: {err}") from None
        return _Fills(tuple(values), tuple(sources), tuple(fill.same_for_every_sample for fill in self.fills))

    def _modality_rows(self, view: BatchView, fills: _Fills, copy: Copy, owner: int, rows: slice | Tensor) -> Tensor:
        """Rows ``rows`` of modality ``owner`` in ``copy``."""
        if owner not in copy.occluded:
            return take(view.values[owner], rows, view.size)
        if copy.mask is None:
            return take(fills.values[owner], rows, view.size)
        value, fill = take(view.values[owner], rows, view.size), take(fills.values[owner], rows, view.size)
        return occlude(value, fill, mask_rows(copy.mask, rows, view.size))

    # --------------------------------------------------------------------------------------------- forward calls

    def _run_copies(
        self,
        model: nn.Module,
        view: BatchView,
        fills: _Fills,
        copies: list[Copy],
        encoder_outputs: Recording | None = None,
    ) -> list[Tensor]:
        """The transformed outputs of each copy, ``(rows of the copy, C)``; the encoder cache where there is one."""
        if self.encoders == "auto" and view.size > 1:
            self._discover_encoders(model, view)
        if self._cache is None:
            return self._forward_copies(model, view, fills, copies)
        recorded, clean_rows = self._recorded(model, view, fills, copies, encoder_outputs)
        occluded = [copy for copy in copies if copy.occluded]
        with self._cache.replaying(model, recorded) as replay:
            rows = self._forward_copies(model, view, fills, occluded, replay)
        if self._check_pending:
            self._check_replay(model, view, fills, occluded, recorded)
            self._check_pending = False
        return [clean_rows, *rows] if len(occluded) < len(copies) else rows

    def _forward_copies(
        self, model: nn.Module, view: BatchView, fills: _Fills, copies: Sequence[Copy], replay: Any = None
    ) -> list[Tensor]:
        """Lay ``copies`` out as one virtual batch, run it chunk by chunk, and split the outputs by copy."""
        outputs, labels = [], []
        for chunk in self._plan(view, copies):
            if replay is not None:
                replay.modes = self._encoder_modes(view, fills, copies, chunk)
            output, label = self._forward_chunk(model, view, fills, copies, chunk)
            outputs.append(output)
            labels.append(label)
        if not outputs:
            return [torch.empty(0, 0) for _ in copies]
        self.outputs.check_same_width(outputs, labels)
        return list(torch.cat(outputs).split([copy.num_rows(view.size) for copy in copies]))

    def _plan(self, view: BatchView, copies: Sequence[Copy]) -> list[list[Piece]]:
        """The chunks of ``copies``; with encoders, each chunk holds copies that occlude the same way."""
        max_rows = self.max_batch_size or DEFAULT_COPIES_PER_CALL * view.size
        groups = None if self._cache is None else [(copy.occluded, copy.mask is None) for copy in copies]
        return plan_chunks([copy.num_rows(view.size) for copy in copies], max_rows, groups)

    def _forward_chunk(
        self, model: nn.Module, view: BatchView, fills: _Fills, copies: Sequence[Copy], chunk: list[Piece]
    ) -> tuple[Tensor, str]:
        """Run one chunk: its rows of every modality and of the batch's other tensors, in one forward call."""
        rows = [copies[piece.copy].rows(piece.start, piece.stop) for piece in chunk]
        ranges = [span for piece_rows in rows for span in sample_ranges(piece_rows)]
        # the modality tensors are replaced below: only the other tensors of the batch are cut here
        skip = {id(original) for original in view.originals}
        chunk_batch = apply_to_collection(view.batch, Tensor, _cut_rows, rows=rows, view=view, ranges=ranges, skip=skip)
        for owner, modality in enumerate(self.modalities):
            parts = [
                self._modality_rows(view, fills, copies[piece.copy], owner, piece_rows)
                for piece, piece_rows in zip(chunk, rows)
            ]
            chunk_batch = modality.replace(chunk_batch, rows_like(view.originals[owner], torch.cat(parts), ranges))
        names = list(dict.fromkeys(copies[piece.copy].name for piece in chunk))
        holds_clean = None in names
        occluded = [name for name in names if name is not None]
        num_rows = sum(piece.stop - piece.start for piece in chunk)
        return self._forward(model, chunk_batch, num_rows, occluded, holds_clean, view.size), _call_label(
            holds_clean, occluded
        )

    def _forward(
        self,
        model: nn.Module,
        batch: Batch,
        rows: int,
        occluded: Sequence[str] = (),
        holds_clean: bool = True,
        batch_size: int | None = None,
    ) -> Tensor:
        self.rows_forwarded += rows
        try:
            output = self.forward_fn(model, batch)
        except Exception as err:
            what = f"while occluding modality {', '.join(map(repr, occluded))}" if occluded else "on the clean batch"
            raise RuntimeError(
                f"The model's forward call raised {type(err).__name__} {what} (one call of {rows} stacked rows: "
                f"{_call_label(holds_clean, occluded)}): {err}\n"
                "Reproduce it on this batch, one occluded copy per call, with the functional API: "
                "lightning_mc.functional.modality_contribution(model, [batch], modalities, forward_fn=forward_fn, "
                f"occlusion=occlusion, max_batch_size={batch_size or rows}), with the same modalities, forward_fn "
                "and occlusion as here."
            ) from err
        return self.outputs.read(output, rows)

    # ------------------------------------------------------------------------------------------- encoder cache

    def _recorded(
        self, model: nn.Module, view: BatchView, fills: _Fills, copies: list[Copy], given: Recording | None
    ) -> tuple[dict[str, Any], Tensor | None]:
        """The encoders' outputs on the clean rows, and the clean outputs when the clean copy ran for them.

        In order: what the caller recorded in the forward call that gave the clean outputs; what the last clean run
        of this same batch recorded (:meth:`run` then :meth:`run_coalitions`); else the clean copy runs, recorded.
        """
        assert self._cache is not None
        recorded = None
        if given is not None:
            try:
                recorded = given.concatenated([view.size])
            except ValueError as err:  # e.g. a validation step that calls the model twice: record by running again
                rank_zero_warn(f"{err} (in the forward call that gave the clean outputs); the clean batch runs again.")
        if (
            recorded is None
            and self._last_recorded is not None
            and _same_tensors(self._last_recorded[0], view.originals)
        ):
            recorded = self._last_recorded[1]
        clean_rows = None
        if recorded is None or (copies and copies[0].name is None):
            with self._cache.record(model) as recording:
                clean_rows = self._forward_copies(model, view, fills, [Copy(None)])[0]
            calls = self._plan(view, [Copy(None)])
            recorded = recording.concatenated([sum(piece.stop - piece.start for piece in chunk) for chunk in calls])
        self._last_recorded = (view.originals, recorded)
        return recorded, clean_rows

    def _discover_encoders(self, model: nn.Module, view: BatchView) -> None:
        """Resolve ``encoders="auto"`` on this batch (:func:`~.encoders.discover_encoders`), and say what it found."""
        found = discover_encoders(model, functools.partial(self.forward_fn, model), view.batch, self.modalities)
        self.encoders = found or None
        self._cache = EncoderCache(found, self.modality_names) if found else None
        if found:
            rank_zero_info(f"encoders='auto' found {found}; each is checked against the plain path on this batch.")
        else:
            rank_zero_warn(
                "encoders='auto' found no submodule whose output depends on one modality only (an early-fusion "
                "model?): every copy runs the whole model.",
                UserWarning,
            )

    def _encoder_modes(
        self, view: BatchView, fills: _Fills, copies: Sequence[Copy], chunk: list[Piece]
    ) -> dict[str, tuple[Mode, Tensor]]:
        """What each encoder does in this chunk, whose copies all occlude the same modalities the same way."""
        assert self._cache is not None
        first = copies[chunk[0].copy]
        device = view.values[0].device
        samples = torch.cat([samples_of(copies[piece.copy].rows(piece.start, piece.stop), device) for piece in chunk])
        modes = {}
        for modality, names in self._cache.encoders.items():
            owner = self.modality_names.index(modality)
            if owner not in first.occluded:
                mode = (Mode.REPLAY, samples)
            elif first.mask is None and fills.sources[owner] is not None:  # permute: other samples' clean rows
                mode = (Mode.REPLAY, fills.sources[owner].index_select(0, samples))
            elif first.mask is None and fills.same_for_every_sample[owner]:
                mode = (Mode.RUN_ONCE, samples)
            else:
                mode = (Mode.RUN, samples)
            modes.update(dict.fromkeys(names, mode))
        return modes

    def _check_replay(
        self, model: nn.Module, view: BatchView, fills: _Fills, copies: list[Copy], recorded: dict[str, Any]
    ) -> None:
        """Compare the cached and the plain path on the first samples: raise if an encoder is not one modality's.

        Raises:
            ValueError: Naming the encoder whose output changed with another modality occluded, or, if each
                encoder's output matches, saying that the final outputs differ.
        """
        assert self._cache is not None
        first = torch.arange(min(view.size, CHECK_SAMPLES), device=view.values[0].device)
        restricted = [_restrict(copy, first, view.size) for copy in copies]
        restricted = [copy for copy in restricted if copy.num_rows(view.size)]
        with self._cache.record(model) as plain_recording:
            plain = self._forward_copies(model, view, fills, restricted)
        with self._cache.replaying(model, recorded) as replay, self._cache.record(model) as cached_recording:
            cached = self._forward_copies(model, view, fills, restricted, replay)
        call_copies = [restricted[chunk[0].copy] for chunk in self._plan(view, restricted)]
        owners = {name: modality for modality, names in self._cache.encoders.items() for name in names}
        for name, plain_calls in plain_recording.calls.items():
            for copy, want, got in zip(call_copies, plain_calls, cached_recording.calls[name]):
                gap = relative_gap(got, want)
                if gap > noise_gap(want):
                    occluded = ", ".join(repr(self.modalities[i].name) for i in sorted(copy.occluded))
                    raise ValueError(
                        f"encoders: {name!r} (given for modality {owners[name]!r}) is not an encoder of "
                        f"{owners[name]!r} alone: with {occluded} occluded its output differs from its replayed "
                        f"output by {gap:.3g} (relative) on the first {first.numel()} samples, so it also depends on "
                        f"modality {occluded} (cross-attention, FiLM, early fusion, or state kept between calls). "
                        f"Name only modules whose output depends on {owners[name]!r}'s input alone, or leave "
                        f"{owners[name]!r} out of encoders."
                    )
        for copy, want, got in zip(restricted, plain, cached):
            gap = relative_gap(got, want)
            if gap > noise_gap(want) and not torch.is_autocast_enabled(want.device.type):
                raise ValueError(
                    f"encoders={self.encoders!r}: every encoder's output matches the plain path, but the model's "
                    f"outputs with {copy.name!r} occluded differ by {gap:.3g} (relative) on the first "
                    f"{first.numel()} samples; the model does not run its encoders once per forward call on its "
                    "own inputs. Leave encoders out for this model."
                )

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed + _SEED_SALT)
        return self._generators[device]

    @staticmethod
    def _attribute_masks(modality: Modality, value: Tensor, batch: Batch) -> AttributeMasks:
        """The modality's masks; builders with ``reads_batch`` (a padding mask in the batch) get the batch too."""
        if modality.attributes is None:  # the whole modality: the same single mask every batch
            return _whole_modality_masks(value.ndim, value.device)
        builder = modality.attribute_masks
        return builder(value, batch=batch) if getattr(builder, "reads_batch", False) else builder(value)


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


@functools.cache
def _whole_modality_masks(ndim: int, device: torch.device) -> AttributeMasks:
    """One all-true mask for a modality of ``ndim`` dimensions (built once: the engine only reads its count)."""
    return WholeModality()(torch.empty((0,) * ndim, device=device))


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


def _same_tensors(left: Sequence[Tensor], right: Sequence[Tensor]) -> bool:
    return len(left) == len(right) and all(a is b for a, b in zip(left, right))


def _restrict(copy: Copy, samples: Tensor, batch_size: int) -> Copy:
    """``copy`` on those of ``samples`` it runs on."""
    if copy.samples is None:
        return replace(copy, samples=samples)
    return replace(copy, samples=copy.samples[torch.isin(copy.samples, samples)])
