"""Encoder-aware occlusion: record each modality encoder's output on the clean pass, replay it where it cannot change.

In a late-fusion network each modality has its own encoder and a fusion head combines their outputs. Occluding
modality ``i`` changes only what modality ``i``'s encoders see, so the cache records every named encoder's output
on the clean rows and, for a copy that occludes ``i``, replaces the forward of the other modalities' encoders by a
lookup of the recorded rows (:mod:`~lightning_mc.core.replay`): only ``i``'s encoders and the layers after the
encoders run.

::

    copy                    image encoder            table encoder            fusion head
    clean                   runs, recorded           runs, recorded           runs
    image occluded          runs on the copy         replays                  runs
      (fill "zeros"/number: one row, expanded, kept while the weights hold; "permute": replays permuted rows)
    table column j          replays                  runs on the copy         runs
    image+table (Shapley)   runs on the copy         runs on the copy         runs

Replay is exact only when an encoder's output row depends on its own modality's input row alone (true in eval mode
for CNNs, MLPs, transformers with their own attention mask). The cache compares the cached and the plain path on one
row of each copy of the first batch of a fit (and again after :meth:`EncoderCache.check_again`, or for another model)
and raises a ``ValueError`` naming the module otherwise. One seeded random batch of every measurement is checked again
on a seeded random row (:mod:`~lightning_mc.core.spot_check`): an encoder that reads another modality only on later
batches is caught within a few measurements.

A copy does not build the rows of a modality whose encoders all replay: one clean row, expanded, stands in for them
(the check makes sure the model reads that input nowhere else); nor those of a modality it fills whole with a fill
that is the same for every sample: the fill's row, expanded, which the encoders run once. Where replaying does not
pay (tiny encoders), the timing of the batch after the check (its clean pass against its cached copies, per row) keeps
the plain path for the fit (:mod:`~lightning_mc.core.path_choice`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torchmetrics.utilities import rank_zero_info, rank_zero_warn

from lightning_mc.core.discovery import discover_encoders
from lightning_mc.core.encoders import ResolvedEncoders, noise_gap, relative_gap
from lightning_mc.core.layout import BatchFills, BatchView, Copy, Piece, samples_of
from lightning_mc.core.modality import Batch, Modality
from lightning_mc.core.path_choice import PathChoice
from lightning_mc.core.replay import EncoderHooks, KeptRows, Mode, Recording, Replay, _index_rows, rows_of
from lightning_mc.core.spot_check import SpotCheck

#: Chunk layouts whose encoder modes are kept (a batch of another size or device adds its own).
_MAX_CHUNK_PLANS = 256

#: Called with the pieces of each chunk before its forward call; returns the modalities (indices) whose rows are not
#: built for the call (read only through replayed encoders), or ``None``.
BeforeChunk = Callable[[list[Piece]], "frozenset[int] | None"]


class CopiesRunner(Protocol):
    """What the cache needs of the engine: the modalities, the forward call and running copies chunk by chunk."""

    modalities: tuple[Modality, ...]
    forward_fn: Callable[[nn.Module, Batch], Any]

    def forward_copies(  # noqa: D102
        self,
        model: nn.Module,
        view: BatchView,
        fills: BatchFills,
        copies: Sequence[Copy],
        before_chunk: BeforeChunk | None = None,
    ) -> list[Tensor]: ...

    def rows_per_call(self, batch_size: int) -> int:  # noqa: D102
        ...


@dataclass(frozen=True)
class _Call:
    """One batch's forward calls through the runner: the model, the batch and its fills, bound once."""

    runner: CopiesRunner
    model: nn.Module
    view: BatchView
    fills: BatchFills

    def run(self, copies: Sequence[Copy], before_chunk: BeforeChunk | None = None) -> list[Tensor]:
        """The outputs of each of ``copies`` (:meth:`CopiesRunner.forward_copies`)."""
        return self.runner.forward_copies(self.model, self.view, self.fills, copies, before_chunk)


class EncoderCache:
    """Records the named encoders on the clean rows and replays them for the copies that leave their modality alone.

    Args:
        spec: The checked ``encoders`` spec: ``modality -> submodule names``, or ``"auto"`` (found on the first batch
            of at least 2 samples).
        modalities: The measured modalities, in engine order.

    Raises:
        ValueError: If ``spec`` names a modality that is not measured.
    """

    def __init__(self, spec: ResolvedEncoders, modalities: Sequence[Modality]) -> None:
        names = tuple(modality.name for modality in modalities)
        if isinstance(spec, dict):
            unknown = [modality for modality in spec if modality not in names]
            if unknown:
                raise ValueError(f"encoders names modality {unknown[0]!r}; the modalities are {list(names)}.")
        #: The spec as given (checked): a mapping, or ``"auto"``.
        self.spec = spec
        self.modality_names = names
        #: The encoders in use: the spec's, or the ones ``"auto"`` found (``None`` until found, or when none were).
        self.found: dict[str, tuple[str, ...]] | None = dict(spec) if isinstance(spec, dict) else None
        self._hooks = None if self.found is None else EncoderHooks(self.found, names)
        self._searched = self.found is not None
        self._check_pending = True
        #: The model and encoder modules the last check ran on: other ones are checked again.
        self._checked_for: tuple[Any, ...] | None = None
        #: Safety checks run so far (the first batch of each fit, and of each other model).
        self.checks_run = 0
        #: Whether a modality read only through replayed encoders gets one expanded row instead of its copies' rows
        #: (off once the check finds that the model also reads such an input elsewhere).
        self.stand_ins = True
        #: Which path runs the copies: timed on the batch after the check, the plain one where caching does not pay.
        self.choice = PathChoice()
        #: Each encoder's output row on a fill that is the same for every sample.
        self._once = KeptRows()
        #: ``chunk layout -> (each encoder's mode, the modalities not built)`` of chunks of whole rows.
        self._chunk_plans: dict[tuple[Any, ...], tuple[dict[str, tuple[Mode, Tensor]], frozenset[int] | None]] = {}
        #: Which batch of each measurement is checked again (:mod:`~lightning_mc.core.spot_check`).
        self.spot = SpotCheck()

    def start_measurement(self, check: int, seed: int) -> None:
        """A measurement starts: draw the batch its spot check runs on (``check``, ``seed``: as the fills')."""
        self.spot.start(check, seed)

    def check_again(self) -> None:
        """Compare the cached path with the plain one on the next batch, and time both again (a new fit)."""
        self._check_pending = True
        self.choice.restart()
        self._once.clear()

    def new_measurement(self) -> None:
        """A new measurement: the weights may have changed, so each kept row of a constant fill is checked once.

        The row is reused where the encoder's parameters and buffers hold the values it was computed with, and run
        again otherwise (:class:`~lightning_mc.core.replay.KeptRows`).
        """
        self._once.new_measurement()

    @contextmanager
    def recording(self, model: nn.Module) -> Iterator[Recording | None]:
        """Record the encoders in the forward calls made inside the block.

        Yields ``None`` (and records nothing) while no encoder is known, or once the plain path was chosen.
        """
        if self._hooks is None or self.choice.plain:
            yield None
            return
        with self._hooks.record(model) as recording:
            yield recording

    def run(
        self,
        runner: CopiesRunner,
        model: nn.Module,
        view: BatchView,
        fills: BatchFills,
        copies: list[Copy],
        given: Recording | None,
    ) -> list[Tensor]:
        """The outputs of each copy, with the encoders replayed where their modality is left alone.

        The first batch of a fit (or of another model) is checked against the plain path first; the next one's clean
        pass (the plain path's work on the clean rows) and its cached copies are timed, and the plain path is kept
        where caching does not pay (:mod:`~lightning_mc.core.path_choice`).
        """
        call = _Call(runner, model, view, fills)
        if self._hooks is None and not self._searched and view.size > 1:
            self._discover(runner, model, view)
        if self._hooks is None or self.choice.plain:  # no encoders, or the plain path chosen for this fit
            return call.run(copies)
        checked_for = self._model_key(model)
        if checked_for != self._checked_for:
            if self._checked_for is not None:  # another model: other weights, maybe another architecture
                self.check_again()
            self._checked_for = checked_for
        device = view.values[0].device
        spot = self.spot.next_batch() and not self._check_pending  # a fully checked batch needs no spot check
        # the check's batch is not timed: its clean pass is the model's first call with these shapes (and warms it)
        timed = None if self._check_pending else self.choice.next_to_time
        if timed == "plain":  # the timed batch ran no clean pass of its own (reuse_outputs): time this one plain
            rows = sum(copy.num_rows(view.size) for copy in copies)
            with self.choice.timing("plain", rows, device, "on the next batch"):
                return call.run(copies)
        occluded = [copy for copy in copies if copy.occluded]
        rows = sum(copy.num_rows(view.size) for copy in occluded)
        # The plain path would run the occluded rows in `calls` forward calls. With a call's cost = a + b · rows, the
        # clean pass (one call of N rows) times the rows of one such call, or N where they are fewer, is at most what
        # the plain path costs: the estimate leans to the plain path, which is never dearer than without encoders.
        calls = -(-rows // runner.rows_per_call(view.size))
        clean_stands_for = max(view.size, rows // max(calls, 1))
        recorded, clean_rows = self._recorded(call, copies, given, clean_stands_for if timed else None)
        if self._check_pending:
            self._check(call, occluded, recorded)
            self._check_pending = False
            if view.size < 2:  # the stand-in row is the only row: whether the model reads it cannot show
                self.stand_ins = False
        replay = Replay(recorded, self._once)
        with self.choice.timing("cached", rows, device) if timed else nullcontext():
            with self._hooks.replaying(model, replay):
                rows_out = call.run(occluded, self._setting_modes(replay, view, fills, occluded))
        if spot:  # outside the timing: the path choice compares the paths' own work
            self._spot_check(call, recorded)
        return [clean_rows, *rows_out] if len(occluded) < len(copies) else rows_out

    def _model_key(self, model: nn.Module) -> tuple[Any, ...]:
        """What identifies the modules the check ran on: the model and each named encoder."""
        assert self._hooks is not None
        return (id(model), *((id(encoder.module), type(encoder.module)) for encoder in self._hooks.bind(model)))

    def _recorded(
        self, call: _Call, copies: list[Copy], given: Recording | None, timed_as: int | None = None
    ) -> tuple[dict[str, Any], Tensor | None]:
        """The encoders' outputs on the clean rows, and the clean outputs when the clean copy ran for them.

        What the caller recorded in the forward call that gave the clean outputs; else the clean copy runs, recorded
        (``timed_as``: timed for :attr:`choice` as the plain path's work on that many rows).
        """
        assert self._hooks is not None
        recorded = None
        if given is not None:
            try:
                recorded = given.concatenated([call.view.size])
            except ValueError as err:  # e.g. a validation step that calls the model twice: record by running again
                rank_zero_warn(f"{err} (in the forward call that gave the clean outputs); the clean batch runs again.")
        clean_rows = None
        if recorded is None or (copies and copies[0].name is None):
            calls: list[int] = []
            device = call.view.values[0].device
            timing = (
                nullcontext()
                if timed_as is None
                else self.choice.timing("plain", timed_as, device, "(from the clean pass of the same batch)")
            )
            with self._hooks.record(call.model) as recording, timing:
                clean_rows = call.run([Copy(None)], _counting_rows(calls))[0]
            recorded = recording.concatenated(calls)
        return recorded, clean_rows

    def _discover(self, runner: CopiesRunner, model: nn.Module, view: BatchView) -> None:
        """Resolve ``"auto"`` on this batch (:func:`~.discovery.discover_encoders`), and say what it found."""
        found = discover_encoders(model, functools.partial(runner.forward_fn, model), view.batch, runner.modalities)
        self._searched = True
        self.found = found or None
        self._hooks = EncoderHooks(found, self.modality_names) if found else None
        if found:
            rank_zero_info(f"encoders='auto' found {found}; each is checked against the plain path on this batch.")
        else:
            rank_zero_warn(
                "encoders='auto' found no submodule whose output depends on one modality only (an early-fusion "
                "model?): every copy runs the whole model.",
                UserWarning,
            )

    def _setting_modes(self, replay: Replay, view: BatchView, fills: BatchFills, copies: Sequence[Copy]) -> BeforeChunk:
        """A ``before_chunk`` that sets what each encoder does in the chunk about to run."""

        def set_modes(chunk: list[Piece]) -> frozenset[int] | None:
            first = copies[chunk[0].copy]
            # what a chunk of whole rows does depends on its layout alone (no permutation drawn): decided once
            key = None
            if all(copies[piece.copy].samples is None for piece in chunk) and all(s is None for s in fills.sources):
                ranges = tuple((piece.start, piece.stop) for piece in chunk)
                layout = (view.size, view.values[0].device, self.stand_ins, fills.same_for_every_sample)
                key = (*layout, first.occluded, first.mask is None, ranges)
                planned = self._chunk_plans.get(key)
                if planned is not None:
                    replay.modes = planned[0]
                    return planned[1]
            modes = self._modes(view, fills, copies, chunk)
            stand_ins = self._replayed_whole(first, fills) if self.stand_ins else None
            if key is not None:
                if len(self._chunk_plans) >= _MAX_CHUNK_PLANS:
                    self._chunk_plans.clear()
                self._chunk_plans[key] = (modes, stand_ins)
            replay.modes = modes
            return stand_ins

        return set_modes

    def _replayed_whole(self, first: Copy, fills: BatchFills) -> frozenset[int]:
        """The modalities whose rows are not built in a call of copies like ``first``: one row stands in for them.

        Those whose every encoder replays (the clean row stands in), and those the copies replace whole by a fill that
        is the same for every sample (its row stands in: the encoders see one row expanded, which they run once).
        """
        assert self.found is not None
        replayed = []
        for modality in self.found:
            owner = self.modality_names.index(modality)
            whole = owner in first.occluded and first.mask is None
            if owner not in first.occluded or (
                whole and (fills.sources[owner] is not None or fills.same_for_every_sample[owner])
            ):
                replayed.append(owner)
        return frozenset(replayed)

    def _modes(
        self, view: BatchView, fills: BatchFills, copies: Sequence[Copy], chunk: list[Piece]
    ) -> dict[str, tuple[Mode, Tensor]]:
        """What each encoder does in this chunk, whose copies all occlude the same modalities the same way."""
        assert self.found is not None
        first = copies[chunk[0].copy]
        device = view.values[0].device
        samples = torch.cat([samples_of(copies[piece.copy].rows(piece.start, piece.stop), device) for piece in chunk])
        modes = {}
        for modality, names in self.found.items():
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

    def _check(self, call: _Call, copies: list[Copy], recorded: dict[str, Any]) -> None:
        """Compare the cached and the plain path on one row of each copy: raise if an encoder is not one modality's.

        Each copy is checked on one of the samples it runs on, the ``k + 1``-th for the ``k``-th copy, so rows whose
        sample differs from their position in the call are among those checked (what replays by sample index) and
        the check rows are mostly not the stand-in row (sample 0) of inputs read only through replayed encoders. The
        cached path runs with and without stand-ins: where their outputs differ at all, the model also reads such an
        input elsewhere, and its rows are built for every copy (said once).

        Raises:
            ValueError: Naming the encoder whose output changed with another modality occluded, or, if each
                encoder's output matches, saying that the final outputs differ.
        """
        assert self._hooks is not None and self.found is not None
        self.checks_run += 1
        restricted = check_copies(copies, call.view.size, call.view.values[0].device)
        call_copies: list[Copy] = []

        def note_call(chunk: list[Piece]) -> None:
            call_copies.append(restricted[chunk[0].copy])

        with self._hooks.record(call.model) as plain_recording:
            plain = call.run(restricted, note_call)
        cached_recording, cached = self._cached_rows(call, restricted, recorded)
        if self.stand_ins:  # with the rows built, the cached path must give the same floats bit for bit
            self.stand_ins = False
            built_recording, built = self._cached_rows(call, restricted, recorded)
            self.stand_ins = all(torch.equal(a, b) for a, b in zip(cached, built))
            if not self.stand_ins:
                cached_recording, cached = built_recording, built
                rank_zero_info(
                    "encoders: the model also reads the inputs of replayed encoders outside them; their rows are built "
                    "for every copy."
                )
        owners = {name: modality for modality, names in self.found.items() for name in names}
        for name, plain_calls in plain_recording.calls.items():
            for copy, want, got in zip(call_copies, plain_calls, cached_recording.calls[name]):
                gap = relative_gap(got, want)
                if gap > noise_gap(want):
                    raise self._not_one_modality(name, owners[name], copy, gap)
        mismatch = _first_mismatch(restricted, plain, cached)
        if mismatch is not None:
            raise self._outputs_differ(*mismatch)

    def _spot_check(self, call: _Call, recorded: dict[str, Any]) -> None:
        """Run a seeded random sample once per modality, it clean and every other modality occluded; compare.

        One plain forward call of one row per modality with encoders: each encoder's output on its own modality's
        row (its input clean, the others' filled) must equal its recorded clean output, or it reads another modality.

        Raises:
            ValueError: As the first batch's check, naming the batch of the measurement.
        """
        assert self._hooks is not None and self.found is not None
        self.spot.done()
        view = call.view
        sample = self.spot.sample(view.size, view.values[0].device)
        everything = range(len(self.modality_names))
        copies = []
        for modality in self.found:
            owner = self.modality_names.index(modality)
            copies.append(Copy(f"all but {modality!r}", frozenset(i for i in everything if i != owner), None, sample))
        with self._hooks.record(call.model) as recording:
            call.run(copies)
        where = f" (the spot check of batch {self.spot.batch} of this measurement; the first batch's full check passed)"
        calls = next(iter(recording.calls.values()))  # more than one with a max_batch_size below the modalities
        plain = recording.concatenated([rows_of(output) for output in calls])
        for row, (copy, (modality, names)) in enumerate(zip(copies, self.found.items())):
            for name in names:
                want = _index_rows(recorded[name], sample)
                gap = relative_gap(_index_rows(plain[name], torch.tensor([row], device=sample.device)), want)
                if gap > noise_gap(want):
                    raise self._not_one_modality(name, modality, copy, gap, where)

    def _not_one_modality(self, name: str, owner: str, copy: Copy, gap: float, where: str = "") -> ValueError:
        """The error of encoder ``name`` whose output changed with ``copy``'s modalities occluded."""
        occluded = ", ".join(repr(self.modality_names[i]) for i in sorted(copy.occluded))
        assert copy.samples is not None
        return ValueError(
            f"encoders: {name!r} (given for modality {owner!r}) is not an encoder of {owner!r} alone: with {occluded} "
            f"occluded its output differs from its replayed output by {gap:.3g} (relative) on sample "
            f"{int(copy.samples[0])}{where}, so it also depends on modality {occluded} (cross-attention, FiLM, early "
            f"fusion, or state kept between calls). Name only modules whose output depends on {owner!r}'s input alone, "
            f"or leave {owner!r} out of encoders."
        )

    def _outputs_differ(self, copy: Copy, gap: float, where: str = "") -> ValueError:
        """The error of a model whose outputs with ``copy`` occluded differ between the paths, encoders matching."""
        assert copy.samples is not None
        return ValueError(
            f"encoders={self.found!r}: every encoder's output matches the plain path, but the model's outputs with "
            f"{copy.name!r} occluded differ by {gap:.3g} (relative) on sample {int(copy.samples[0])}{where}; the model "
            "does not run its encoders once per forward call on its own inputs. Leave encoders out for this model."
        )

    def _cached_rows(self, call: _Call, copies: list[Copy], recorded: dict[str, Any]) -> tuple[Recording, list[Tensor]]:
        """The cached path's outputs of ``copies``, with the encoders' (replayed) outputs of each call recorded."""
        assert self._hooks is not None
        replay = Replay(recorded, self._once)
        with self._hooks.replaying(call.model, replay), self._hooks.record(call.model) as recording:
            rows = call.run(copies, self._setting_modes(replay, call.view, call.fills, copies))
        return recording, rows


def check_copies(copies: Sequence[Copy], batch_size: int, device: torch.device) -> list[Copy]:
    """One row of each copy that runs any: the ``k``-th copy on the ``(k + 1) % n``-th of its ``n`` samples.

    Example:
        >>> [copy.samples.tolist() for copy in check_copies([Copy("a", frozenset({0}))] * 3, 4, torch.device("cpu"))]
        [[1], [2], [3]]
    """
    chosen = []
    for index, copy in enumerate(copies):
        count = copy.num_rows(batch_size)
        if not count:
            continue
        position = (index + 1) % count
        sample = copy.samples[position : position + 1] if copy.samples is not None else torch.tensor([position])
        chosen.append(replace(copy, samples=sample.to(device)))
    return chosen


def _first_mismatch(
    copies: Sequence[Copy], plain: Sequence[Tensor], cached: Sequence[Tensor]
) -> tuple[Copy, float] | None:
    """The first copy whose outputs differ between the paths beyond float noise, with the gap (autocast: none)."""
    for copy, want, got in zip(copies, plain, cached):
        gap = relative_gap(got, want)
        if gap > noise_gap(want) and not torch.is_autocast_enabled(want.device.type):
            return copy, gap
    return None


def _counting_rows(calls: list[int]) -> BeforeChunk:
    """A ``before_chunk`` that appends each call's number of rows to ``calls``."""

    def count(chunk: list[Piece]) -> None:
        calls.append(sum(piece.stop - piece.start for piece in chunk))

    return count


__all__ = ["BeforeChunk", "CopiesRunner", "EncoderCache", "check_copies"]
