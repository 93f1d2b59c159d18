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
      (fill "zeros"/number: once per batch, expanded; "permute": replays permuted recorded rows)
    table column j          replays                  runs on the copy         runs
    image+table (Shapley)   runs on the copy         runs on the copy         runs

Replay is exact only when an encoder's output row depends on its own modality's input row alone (true in eval mode
for CNNs, MLPs, transformers with their own attention mask). The cache compares the cached and the plain path on the
first samples of the first batch (and again after :meth:`EncoderCache.check_again`) and raises a ``ValueError``
naming the module otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torchmetrics.utilities import rank_zero_info, rank_zero_warn

from lightning_mc.core.discovery import discover_encoders
from lightning_mc.core.encoders import ResolvedEncoders, noise_gap, relative_gap
from lightning_mc.core.layout import BatchFills, BatchView, Copy, Piece, samples_of
from lightning_mc.core.modality import Batch, Modality
from lightning_mc.core.replay import EncoderHooks, Mode, Recording, Replay

#: Called with the pieces of each chunk before its forward call.
BeforeChunk = Callable[[list[Piece]], None]
#: Samples compared between the cached and the plain path on the first batch.
CHECK_SAMPLES = 2


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
        #: ``encoder name -> (state, input row, output row)`` of a fill that is the same for every sample.
        self._once: dict[str, tuple[Any, Any, Any]] = {}

    def check_again(self) -> None:
        """Compare the cached path with the plain one on the next batch (a new fit: the model may differ)."""
        self._check_pending = True
        self.forget_weights()

    def forget_weights(self) -> None:
        """Run the encoders of fills that are the same for every sample again (the weights changed since)."""
        self._once.clear()

    @contextmanager
    def recording(self, model: nn.Module) -> Iterator[Recording | None]:
        """Record the encoders in the forward calls made inside the block (``None`` while no encoder is known)."""
        if self._hooks is None:
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
        """The outputs of each copy, with the encoders replayed where their modality is left alone."""
        if not self._searched and view.size > 1:
            self._discover(runner, model, view)
        if self._hooks is None:
            return runner.forward_copies(model, view, fills, copies)
        recorded, clean_rows = self._recorded(runner, model, view, fills, copies, given)
        occluded = [copy for copy in copies if copy.occluded]
        replay = Replay(recorded, self._once)
        with self._hooks.replaying(model, replay):
            rows = runner.forward_copies(
                model, view, fills, occluded, self._setting_modes(replay, view, fills, occluded)
            )
        if self._check_pending:
            self._check(runner, model, view, fills, occluded, recorded)
            self._check_pending = False
        return [clean_rows, *rows] if len(occluded) < len(copies) else rows

    def _recorded(
        self,
        runner: CopiesRunner,
        model: nn.Module,
        view: BatchView,
        fills: BatchFills,
        copies: list[Copy],
        given: Recording | None,
    ) -> tuple[dict[str, Any], Tensor | None]:
        """The encoders' outputs on the clean rows, and the clean outputs when the clean copy ran for them.

        What the caller recorded in the forward call that gave the clean outputs; else the clean copy runs, recorded.
        """
        assert self._hooks is not None
        recorded = None
        if given is not None:
            try:
                recorded = given.concatenated([view.size])
            except ValueError as err:  # e.g. a validation step that calls the model twice: record by running again
                rank_zero_warn(f"{err} (in the forward call that gave the clean outputs); the clean batch runs again.")
        clean_rows = None
        if recorded is None or (copies and copies[0].name is None):
            calls: list[int] = []
            with self._hooks.record(model) as recording:
                clean_rows = runner.forward_copies(model, view, fills, [Copy(None)], _counting_rows(calls))[0]
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

        def set_modes(chunk: list[Piece]) -> None:
            replay.modes = self._modes(view, fills, copies, chunk)

        return set_modes

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

    def _check(
        self,
        runner: CopiesRunner,
        model: nn.Module,
        view: BatchView,
        fills: BatchFills,
        copies: list[Copy],
        recorded: dict[str, Any],
    ) -> None:
        """Compare the cached and the plain path on the first samples: raise if an encoder is not one modality's.

        Raises:
            ValueError: Naming the encoder whose output changed with another modality occluded, or, if each
                encoder's output matches, saying that the final outputs differ.
        """
        assert self._hooks is not None and self.found is not None
        first = torch.arange(min(view.size, CHECK_SAMPLES), device=view.values[0].device)
        restricted = [_restrict(copy, first) for copy in copies]
        restricted = [copy for copy in restricted if copy.num_rows(view.size)]
        call_copies: list[Copy] = []

        def note_call(chunk: list[Piece]) -> None:
            call_copies.append(restricted[chunk[0].copy])

        with self._hooks.record(model) as plain_recording:
            plain = runner.forward_copies(model, view, fills, restricted, note_call)
        replay = Replay(recorded, self._once)
        with self._hooks.replaying(model, replay), self._hooks.record(model) as cached_recording:
            cached = runner.forward_copies(
                model, view, fills, restricted, self._setting_modes(replay, view, fills, restricted)
            )
        owners = {name: modality for modality, names in self.found.items() for name in names}
        for name, plain_calls in plain_recording.calls.items():
            for copy, want, got in zip(call_copies, plain_calls, cached_recording.calls[name]):
                gap = relative_gap(got, want)
                if gap > noise_gap(want):
                    occluded = ", ".join(repr(self.modality_names[i]) for i in sorted(copy.occluded))
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
                    f"encoders={self.found!r}: every encoder's output matches the plain path, but the model's "
                    f"outputs with {copy.name!r} occluded differ by {gap:.3g} (relative) on the first "
                    f"{first.numel()} samples; the model does not run its encoders once per forward call on its "
                    "own inputs. Leave encoders out for this model."
                )


def _counting_rows(calls: list[int]) -> BeforeChunk:
    """A ``before_chunk`` that appends each call's number of rows to ``calls``."""

    def count(chunk: list[Piece]) -> None:
        calls.append(sum(piece.stop - piece.start for piece in chunk))

    return count


def _restrict(copy: Copy, samples: Tensor) -> Copy:
    """``copy`` on those of ``samples`` it runs on."""
    if copy.samples is None:
        return replace(copy, samples=samples)
    return replace(copy, samples=copy.samples[torch.isin(copy.samples, samples)])


__all__ = ["CHECK_SAMPLES", "BeforeChunk", "CopiesRunner", "EncoderCache"]
