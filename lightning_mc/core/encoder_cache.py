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
that gives encoders one row (:attr:`~lightning_mc.core.occlusion.Fill.encoder_input`): the fill's row, expanded, which
the encoders run once. What each encoder does in each forward call is decided once per batch layout and kept in the
batch's plan (:class:`~lightning_mc.core.plan.BatchPlan`); the cache only chooses the executor of each batch
(:class:`~lightning_mc.core.executor.ReplayingExecutor` or the plain one). Where replaying does not pay (tiny
encoders), the timing of the batch after the check (its clean pass against its cached copies, per row) keeps the plain
path for the fit (:mod:`~lightning_mc.core.path_choice`).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.utilities import rank_zero_info, rank_zero_warn

from lightning_mc.core.discovery import discover_encoders
from lightning_mc.core.encoders import ResolvedEncoders, noise_gap, relative_gap
from lightning_mc.core.executor import Call, ChunkRunner, ChunkSettings, PlainExecutor, ReplayingExecutor
from lightning_mc.core.layout import BatchFills, BatchView, Copy, Piece, plan_chunks, samples_of
from lightning_mc.core.modality import Modality
from lightning_mc.core.occlusion import EncoderInput
from lightning_mc.core.path_choice import PathChoice
from lightning_mc.core.plan import BatchPlan, chunks_of
from lightning_mc.core.replay import EncoderHooks, KeptRows, Mode, Recording, Replay, _index_rows, rows_of
from lightning_mc.core.spot_check import SpotCheck

#: ``encoder name -> (mode, the samples of the rows, the modality whose permutation reorders them or None)``.
_BaseModes = dict[str, tuple[Mode, Tensor, int | None]]


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
        self, runner: ChunkRunner, call: Call, plan: BatchPlan, given: Recording | None, max_rows: int
    ) -> list[Tensor]:
        """The outputs of each of the plan's copies, with the encoders replayed where their modality is left alone.

        The first batch of a fit (or of another model) is checked against the plain path first; the next one's clean
        pass (the plain path's work on the clean rows) and its cached copies are timed, and the plain path is kept
        where caching does not pay (:mod:`~lightning_mc.core.path_choice`).

        Args:
            runner: Builds and runs each forward call.
            call: The model, the batch and its fills.
            plan: The batch's plan.
            given: The encoders' outputs recorded in the forward call that gave the clean outputs, if any.
            max_rows: The most rows per forward call.
        """
        view, plain = call.view, PlainExecutor(runner)
        if self._hooks is None and not self._searched and view.size > 1:
            self._discover(runner, call.model, view)
        if self._hooks is None or self.choice.plain:  # no encoders, or the plain path chosen for this fit
            return plain.run(call, plan.copies, chunks_of(plan, max_rows))
        checked_for = self._model_key(call.model)
        if checked_for != self._checked_for:
            if self._checked_for is not None:  # another model: other weights, maybe another architecture
                self.check_again()
            self._checked_for = checked_for
        device = view.values[0].device
        spot = self.spot.next_batch() and not self._check_pending  # a fully checked batch needs no spot check
        # the check's batch is not timed: its clean pass is the model's first call with these shapes (and warms it)
        timed = None if self._check_pending else self.choice.next_to_time
        if timed == "plain":  # the timed batch ran no clean pass of its own (reuse_outputs): time this one plain
            rows = sum(copy.num_rows(view.size) for copy in plan.copies)
            with self.choice.timing("plain", rows, device, "on the next batch"):
                return plain.run(call, plan.copies, chunks_of(plan, max_rows))
        occluded = plan.copies[1:] if plan.runs_clean else plan.copies
        rows = sum(copy.num_rows(view.size) for copy in occluded)
        # The plain path would run the occluded rows in `calls` forward calls. With a call's cost = a + b · rows, the
        # clean pass (one call of N rows) times the rows of one such call, or N where they are fewer, is at most what
        # the plain path costs: the estimate leans to the plain path, which is never dearer than without encoders.
        calls = -(-rows // max_rows)
        clean_stands_for = max(view.size, rows // max(calls, 1))
        recorded, clean_rows = self._recorded(runner, call, plan, given, max_rows, clean_stands_for if timed else None)
        if self._check_pending:
            self._check(runner, call, occluded, recorded, max_rows)
            self._check_pending = False
            if view.size < 2:  # the stand-in row is the only row: whether the model reads it cannot show
                self.stand_ins = False
        executor = self._replaying(runner, recorded, self.stand_ins, plan)
        with self.choice.timing("cached", rows, device) if timed else nullcontext():
            rows_out = executor.run(call, occluded, chunks_of(plan, max_rows, grouped=True, skip_clean=True))
        if spot:  # outside the timing: the path choice compares the paths' own work
            self._spot_check(runner, call, recorded, max_rows)
        return [clean_rows, *rows_out] if plan.runs_clean else rows_out

    def _model_key(self, model: nn.Module) -> tuple[Any, ...]:
        """What identifies the modules the check ran on: the model and each named encoder."""
        assert self._hooks is not None
        return (id(model), *((id(encoder.module), type(encoder.module)) for encoder in self._hooks.bind(model)))

    def _recorded(
        self,
        runner: ChunkRunner,
        call: Call,
        plan: BatchPlan,
        given: Recording | None,
        max_rows: int,
        timed_as: int | None = None,
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
        if recorded is None or plan.runs_clean:
            chunks = plan_chunks([call.view.size], max_rows)
            device = call.view.values[0].device
            timing = (
                nullcontext()
                if timed_as is None
                else self.choice.timing("plain", timed_as, device, "(from the clean pass of the same batch)")
            )
            with self._hooks.record(call.model) as recording, timing:
                clean_rows = runner.run(call, [Copy(None)], chunks)[0]
            recorded = recording.concatenated([sum(piece.stop - piece.start for piece in chunk) for chunk in chunks])
        return recorded, clean_rows

    def _discover(self, runner: ChunkRunner, model: nn.Module, view: BatchView) -> None:
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

    def _replaying(
        self, runner: ChunkRunner, recorded: dict[str, Any], stand_ins: bool, plan: BatchPlan | None = None
    ) -> ReplayingExecutor:
        """The replaying executor of one batch; its chunks' settings are kept in ``plan`` (``None``: computed now)."""
        assert self._hooks is not None

        def settings(copies: Sequence[Copy], chunks: Sequence[list[Piece]], fills: BatchFills) -> list[ChunkSettings]:
            if plan is None:
                base = self._base_settings(copies, chunks, fills, stand_ins)
            else:  # the chunks are the plan's own (kept in it): their settings are kept beside them
                key: Hashable = ("replay settings", stand_ins, id(chunks))
                base = plan.memo(key, lambda: self._base_settings(copies, chunks, fills, stand_ins))
            return [_for_batch(settings, permuted, fills) for settings, permuted in base]

        return ReplayingExecutor(runner, self._hooks, Replay(recorded, self._once), settings)

    def _base_settings(
        self, copies: Sequence[Copy], chunks: Sequence[list[Piece]], fills: BatchFills, stand_ins: bool
    ) -> list[tuple[ChunkSettings, dict[str, int]]]:
        """Each chunk's settings, and the encoders whose rows a permutation drawn per batch reorders (their owner)."""
        device = fills.values[0].device
        settings = []
        for chunk in chunks:
            modes = self._modes(copies, chunk, fills, device)
            replayed = self._replayed_whole(copies[chunk[0].copy], fills) if stand_ins else frozenset()
            plain = {name: (mode, samples) for name, (mode, samples, _) in modes.items()}
            permuted = {name: owner for name, (_, _, owner) in modes.items() if owner is not None}
            settings.append((ChunkSettings(plain, replayed), permuted))
        return settings

    def _replayed_whole(self, first: Copy, fills: BatchFills) -> frozenset[int]:
        """The modalities whose rows are not built in a call of copies like ``first``: one row stands in for them.

        Those whose every encoder replays (the clean row stands in), and those the copies replace whole by a fill that
        gives encoders one row (its row stands in: the encoders see one row expanded, which they run once) or a
        permutation of the clean rows (replayed permuted).
        """
        assert self.found is not None
        replayed = []
        for modality in self.found:
            owner = self.modality_names.index(modality)
            whole = owner in first.occluded and first.mask is None
            if owner not in first.occluded or (whole and fills.encoder_inputs[owner] is not EncoderInput.ROWS):
                replayed.append(owner)
        return frozenset(replayed)

    def _modes(self, copies: Sequence[Copy], chunk: list[Piece], fills: BatchFills, device: torch.device) -> _BaseModes:
        """What each encoder does in this chunk, whose copies all occlude the same modalities the same way."""
        assert self.found is not None
        first = copies[chunk[0].copy]
        samples = torch.cat([samples_of(copies[piece.copy].rows(piece.start, piece.stop), device) for piece in chunk])
        modes: _BaseModes = {}
        for modality, names in self.found.items():
            owner = self.modality_names.index(modality)
            given = fills.encoder_inputs[owner]
            if owner not in first.occluded:
                mode = (Mode.REPLAY, samples, None)
            elif first.mask is None and given is EncoderInput.PERMUTED:  # other samples' clean rows
                mode = (Mode.REPLAY, samples, owner)
            elif first.mask is None and given is EncoderInput.ONE_ROW:
                mode = (Mode.RUN_ONCE, samples, None)
            else:
                mode = (Mode.RUN, samples, None)
            modes.update(dict.fromkeys(names, mode))
        return modes

    def _check(
        self, runner: ChunkRunner, call: Call, copies: Sequence[Copy], recorded: dict[str, Any], max_rows: int
    ) -> None:
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
        view = call.view
        restricted = check_copies(copies, view.size, view.values[0].device)
        groups = [(copy.occluded, copy.mask is None) for copy in restricted]
        chunks = plan_chunks([copy.num_rows(view.size) for copy in restricted], max_rows, groups)
        call_copies = [restricted[chunk[0].copy] for chunk in chunks]
        with self._hooks.record(call.model) as plain_recording:
            plain = runner.run(call, restricted, chunks)
        cached_recording, cached = self._cached_rows(runner, call, restricted, chunks, recorded, self.stand_ins)
        if self.stand_ins:  # with the rows built, the cached path must give the same floats bit for bit
            built_recording, built = self._cached_rows(runner, call, restricted, chunks, recorded, stand_ins=False)
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

    def _spot_check(self, runner: ChunkRunner, call: Call, recorded: dict[str, Any], max_rows: int) -> None:
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
            runner.run(call, copies, plan_chunks([1] * len(copies), max_rows))
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
            f"fusion, or state kept between calls). Name only modules whose output depends on the input of {owner!r} "
            f"alone, or leave {owner!r} out of encoders."
        )

    def _outputs_differ(self, copy: Copy, gap: float, where: str = "") -> ValueError:
        """The error of a model whose outputs with ``copy`` occluded differ between the paths, encoders matching."""
        assert copy.samples is not None
        return ValueError(
            f"encoders={self.found!r}: every encoder's output matches the plain path, but the model's outputs with "
            f"{copy.name!r} occluded differ by {gap:.3g} (relative) on sample {int(copy.samples[0])}{where}; the model "
            "does not run its encoders once per forward call on its own inputs. Leave encoders out for this model."
        )

    def _cached_rows(
        self,
        runner: ChunkRunner,
        call: Call,
        copies: Sequence[Copy],
        chunks: Sequence[list[Piece]],
        recorded: dict[str, Any],
        stand_ins: bool,
    ) -> tuple[Recording, list[Tensor]]:
        """The cached path's outputs of ``copies``, with the encoders' (replayed) outputs of each call recorded."""
        assert self._hooks is not None
        with self._hooks.record(call.model) as recording:
            rows = self._replaying(runner, recorded, stand_ins).run(call, copies, chunks)
        return recording, rows


def _for_batch(settings: ChunkSettings, permuted: dict[str, int], fills: BatchFills) -> ChunkSettings:
    """A chunk's settings for this batch: the rows of a permuted modality's encoders follow this batch's draw."""
    if not permuted:
        return settings
    modes = dict(settings.modes)
    for name, owner in permuted.items():
        order = fills.orders[owner]
        assert order is not None
        modes[name] = (Mode.REPLAY, order.index_select(0, modes[name][1]))
    return ChunkSettings(modes, settings.stand_ins)


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


__all__ = ["EncoderCache", "check_copies"]
