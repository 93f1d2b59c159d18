"""Runs a model on a batch and on its occluded copies: the plan of the batch's layout, run by an executor.

For a batch of ``N`` samples and ``H`` attributes over all modalities the engine needs up to ``(1 + H) · N`` rows of
model input: the clean batch and one copy per attribute, plus one copy per coalition of whole modalities an analysis
asks for. Per batch it

1. finds the plan of the batch's layout (:class:`~lightning_mc.core.plan.Planner`: the copies, their chunks and what
   the encoders do in each call, decided once per layout),
2. draws the fills (:class:`~lightning_mc.core.fill_draws.FillDraws`),
3. runs the one guard that reads values, which samples each copy changes
   (:func:`~lightning_mc.core.changed_rows.restrict`: a copy does not run on a sample it leaves as it was, so that
   sample's difference is exactly 0),
4. hands the plan to an executor (:mod:`~lightning_mc.core.executor`): the plain one, or with ``encoders`` the one the
   encoder cache chooses (:class:`~lightning_mc.core.encoder_cache.EncoderCache`),
5. lays the outputs out by modality and attribute.

Nothing here knows about Lightning, and nothing here has a default: the settings come resolved from
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
from torch import Tensor, nn

from lightning_mc.core.changed_rows import restrict
from lightning_mc.core.encoder_cache import EncoderCache
from lightning_mc.core.encoders import ResolvedEncoders
from lightning_mc.core.executor import Call, ChunkRunner, PlainExecutor
from lightning_mc.core.fill_draws import FillDraws
from lightning_mc.core.forward import ForwardFn, default_forward
from lightning_mc.core.layout import BatchView, Copy, plan_chunks
from lightning_mc.core.modality import Batch, Modality
from lightning_mc.core.occlusion import Fill
from lightning_mc.core.outputs import GivenCleanError, OutputReader
from lightning_mc.core.plan import BatchPlan, Planner, chunks_of
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
        #: The plan of each batch layout.
        self.planner = Planner(self.modalities)
        #: Builds and runs each forward call, for every executor.
        self.runner = ChunkRunner(self.modalities, self.forward_fn, self.outputs)
        #: Runs every row through the whole model.
        self.plain = PlainExecutor(self.runner)
        #: The encoder cache (``None`` without ``encoders``): chooses the executor of each batch.
        self.cache = None if settings.encoders is None else EncoderCache(settings.encoders, self.modalities)
        #: Each batch's fills (:meth:`start_draws` starts a measurement's draws).
        self.draws = FillDraws(self.modalities, self.fills, settings.seed)
        self._modules: tuple[nn.Module, ...] | None = None

    @property
    def modality_names(self) -> tuple[str, ...]:
        """The modalities' names, in order."""
        return tuple(modality.name for modality in self.modalities)

    def __getstate__(self) -> dict[str, object]:
        """Pickled (``ddp_spawn``) or copied without the listed modules of the last model (they are listed again)."""
        return {**self.__dict__, "_modules": None}

    @property
    def rows_forwarded(self) -> int:
        """Model input rows run so far (clean and occluded copies), for progress reports."""
        return self.runner.rows_forwarded

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
        layout_plan = self.planner.plan(view, clean is not None, coalitions)
        with _evaluating(self._modules_of(model)), torch.inference_mode():
            fills = self.draws.fill(view)
            plan = restrict(layout_plan, view, fills)
            rows = self._execute(Call(model, view, fills), plan, encoder_outputs)
            clean_rows = rows[0] if plan.runs_clean else self.outputs.given_clean(clean, _width(rows), view.size)
            occluded = plan.outputs_by_modality(clean_rows, rows[plan.attributes])
        coalition_rows = dict(zip((copy.occluded for copy in plan.coalitions), rows[plan.attributes.stop :]))
        for members, owner in plan.reused.items():
            coalition_rows[members] = occluded[self.modalities[owner].name][:, 0]
        coalition_outputs = {c: coalition_rows[frozenset(c)] for c in coalitions}
        return OccludedOutputs(clean_rows, occluded, plan.attribute_names, coalition_outputs, plan.changed(), view.size)

    def check_batch(self, model: nn.Module, batch: Batch) -> None:
        """Check the modalities, the fills and the output on ``batch`` without measuring (one forward call of 1 row).

        Raises:
            KeyError, IndexError, TypeError, ValueError: What :meth:`run` would raise on this batch for a wrong key or
                index, a fill that does not fit the data, an ``output_key`` the output lacks or an output the transform
                cannot read.
        """
        view = BatchView.of(batch, self.modalities)
        first = torch.zeros(1, dtype=torch.long, device=view.values[0].device)
        with _evaluating(self._modules_of(model)), torch.inference_mode():
            self.draws.check(view)
            call = Call(model, view, self.draws.unfilled(view))
            self.plain.run(call, [Copy(None, samples=first)], plan_chunks([1], 1))

    def rows_per_call(self, batch_size: int) -> int:
        """The most rows one forward call takes, for batches of ``batch_size`` samples."""
        return self.settings.max_batch_size or DEFAULT_COPIES_PER_CALL * batch_size

    def start_draws(self, check: int) -> None:
        """The next batch is the first of measurement ``check``: random fills depend only on the seed and where."""
        self.draws.start(check)
        self._modules = None  # a submodule added between measurements is seen

    def _modules_of(self, model: nn.Module) -> tuple[nn.Module, ...]:
        """The model and its submodules, listed once per measurement (a walk of the tree costs a small model's op)."""
        if self._modules is None or self._modules[0] is not model:
            self._modules = tuple(model.modules())
        return self._modules

    def _execute(self, call: Call, plan: BatchPlan, given: Recording | None) -> list[Tensor]:
        """The transformed outputs of each of the plan's copies, ``(rows of the copy, C)``, by the chosen executor."""
        max_rows = self.rows_per_call(call.view.size)
        if self.cache is not None:
            return self.cache.run(self.runner, call, plan, given, max_rows)
        return self.plain.run(call, plan.copies, chunks_of(plan, max_rows))


@contextmanager
def _evaluating(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Put the model (``modules[0]``, then its submodules) in eval mode and give each its own mode back afterwards.

    A model already in eval mode (the monitor's case, inside validation) costs one read per module. Exactly the
    submodules that were in training mode are switched back, so a user's frozen submodule in eval mode inside a
    training model stays in eval mode.
    """
    training = [module for module in modules if module.training]
    if training:
        modules[0].eval()  # through eval(): a module that overrides train() sees the switch
    try:
        yield
    finally:
        for module in training:
            module.training = True


def _width(rows: Sequence[Tensor]) -> int | None:
    """The outputs per sample of the copies that ran; ``None`` when none ran a row."""
    return next((copy_rows.shape[-1] for copy_rows in rows if copy_rows.numel()), None)
