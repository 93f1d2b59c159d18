"""One measurement: the occluded passes of each batch and every sum they feed, turned into a ContributionResult.

:class:`ContributionMeasurement` is the single place where the options of a measurement (``check_redundancy``,
``ci``, ``shapley``, ``perf_metric``) decide which passes run and which accumulators they feed. Every entry point
drives it: :func:`lightning_mc.functional.modality_contribution` and :func:`~lightning_mc.functional.modality_shapley`
loop over batches, :class:`lightning_mc.ModalityContributionMonitor` calls it from validation hooks, and a user's own
training loop can call it the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_mc.analyses.bootstrap import ShareIntervals
from lightning_mc.analyses.contribution import ContributionSums
from lightning_mc.analyses.options import DEFAULT_MAX_CI_SAMPLES, MeasurementOptions, document_options
from lightning_mc.analyses.part import Analysis, Passes, Reduce
from lightning_mc.analyses.perf_drop import PerfDropAnalysis
from lightning_mc.analyses.precision import SharePrecision
from lightning_mc.analyses.redundancy import RedundancyCheck
from lightning_mc.analyses.saturation import SaturationCheck
from lightning_mc.analyses.shapley import ShapleyAnalysis
from lightning_mc.analyses.unchanged import UnchangedOcclusions
from lightning_mc.core.encoders import EncodersSpec
from lightning_mc.core.engine import OccludedOutputs, OcclusionEngine
from lightning_mc.core.forward import ForwardFn
from lightning_mc.core.metric import Normalization
from lightning_mc.core.modality import Batch, ModalitiesSpec, TargetSpec, resolve_modalities
from lightning_mc.core.occlusion import FillSpec
from lightning_mc.core.outputs import OutputKey, OutputTransform
from lightning_mc.core.replay import Recording
from lightning_mc.core.result import ContributionResult

#: The analyses a measurement runs when its options ask for them, in the order they write the result (Shapley values
#: before the redundancy check, which reads their ``v(all)``). A new analysis is one module and one line here.
ANALYSES: tuple[type[Analysis], ...] = (
    ShapleyAnalysis,
    RedundancyCheck,
    ShareIntervals,
    SharePrecision,
    PerfDropAnalysis,
    UnchangedOcclusions,
    SaturationCheck,
)

#: The docs of the arguments that say whether a measurement reduces across processes (taken by the measurement and
#: the functional API; the monitor's measurement always does).
SYNC_DOCS = {
    "sync_across_processes": "Under ``torch.distributed``, reduce the sums across processes in "
    "``compute()`` "
    "(a collective every process must reach; every rank then gets the numbers of the union of all ranks' samples). "
    "``False`` (default): this process's batches only, with no collective, so one rank alone can measure (e.g. "
    "``if trainer.is_global_zero:`` after a DDP fit).",
}


@document_options(docs=SYNC_DOCS, after="encoders")
@document_options()
class ContributionMeasurement:
    """Measures modality contributions batch by batch: ``update(model, batch)``, then ``compute()``.

    Each :meth:`update` runs the model on the batch and on its occluded copies (batched, in eval mode, under
    :func:`torch.inference_mode`) and adds the outputs to torchmetrics accumulators: the contribution sums of
    :class:`~lightning_mc.ModalityContribution` and, where the options ask for them, the analyses of
    :data:`~lightning_mc.measurement.ANALYSES` (Shapley coalitions, all-occluded movement, intervals, precision,
    performance drop). :meth:`compute` returns a :class:`~lightning_mc.ContributionResult`: of this process's batches,
    or, with ``sync_across_processes=True`` under ``torch.distributed``, of every process's (each accumulator syncs
    itself). :meth:`reset` starts a new measurement.

    This is the object behind :func:`~lightning_mc.functional.modality_contribution` and the monitor: use it from any
    training loop (plain PyTorch, Accelerate, a Hugging Face ``Trainer`` callback) to get the same numbers.

    Args:
        modalities: ``name -> dict key`` (dict batches), ``name -> index`` (tuple/list batches), or
            :class:`lightning_mc.Modality` objects (nested batches, per-modality fills, attributes).

    Raises:
        ValueError: On an invalid argument (the message names it and what is valid).
        TypeError: If ``modalities``, ``occlusion``, ``forward_fn``, ``output_key`` or ``encoders`` have the wrong
            type.

    Example:
        A plain PyTorch loop:

        >>> import torch
        >>> from lightning_mc import ContributionMeasurement
        >>> class Model(torch.nn.Module):
        ...     def forward(self, image, table):
        ...         return 3 * image.flatten(1).mean(1, keepdim=True) + table[:, :1]
        >>> measurement = ContributionMeasurement({"image": 0, "table": 1}, occlusion="zeros")
        >>> for _ in range(3):
        ...     batch = (torch.ones(8, 1, 4, 4), torch.ones(8, 2))
        ...     measurement.update(Model(), batch)
        >>> measurement.compute().shares
        {'image': 0.75, 'table': 0.25}
        >>> measurement.reset()
    """

    def __init__(
        self,
        modalities: ModalitiesSpec,
        *,
        forward_fn: ForwardFn | None = None,
        output_key: OutputKey = None,
        output_transform: OutputTransform = None,
        occlusion: FillSpec = "mean",
        normalization: Normalization = "ratio_of_sums",
        max_batch_size: int | None = None,
        seed: int = 0,
        check_redundancy: bool = False,
        ci: float | None = None,
        n_boot: int = 1000,
        max_ci_samples: int = DEFAULT_MAX_CI_SAMPLES,
        shapley: bool = False,
        perf_metric: Metric | None = None,
        target: TargetSpec | None = None,
        tolerance: float | None = None,
        encoders: EncodersSpec | None = None,
        sync_across_processes: bool = False,
    ) -> None:
        if not isinstance(sync_across_processes, bool):
            raise TypeError(f"sync_across_processes={sync_across_processes!r} must be True or False.")
        self.modalities = resolve_modalities(modalities)
        #: Whether :meth:`compute` reduces across processes (read at every :meth:`compute`; the monitor sets it).
        self.sync_across_processes = sync_across_processes
        #: The checked options (:class:`~lightning_mc.analyses.options.MeasurementOptions`), resolved once.
        self.options = MeasurementOptions(**MeasurementOptions.pick(locals()))
        #: Runs the occluded copies, with the options' :attr:`~.MeasurementOptions.engine` settings.
        self.engine = OcclusionEngine(self.modalities, self.options.engine)
        self.contribution = ContributionSums(self.options.normalization)
        # every analysis checks its own options, enabled or not
        built = [kind.from_options(self.options, self.modality_names) for kind in ANALYSES]
        #: The enabled analyses besides the contribution sums, in :data:`ANALYSES` order.
        self.analyses: list[Analysis] = [analysis for analysis in built if analysis is not None]
        #: The coalitions of whole modalities the analyses read, each run once per batch.
        self.coalitions = tuple(dict.fromkeys(c for analysis in self.analyses for c in analysis.coalitions()))
        self._prepared_for: tuple[Any, ...] | None = None
        self._num_updates = 0
        #: The sync setting given to the accumulators built so far (``None``: not given yet).
        self._sync_applied: bool | None = None

    @property
    def modality_names(self) -> tuple[str, ...]:
        """Names of the measured modalities, in order."""
        return tuple(m.name for m in self.modalities)

    @property
    def num_updates(self) -> int:
        """Batches added on this process since the last :meth:`reset`."""
        return self._num_updates

    @property
    def converged(self) -> bool:
        """Whether every analysis with a precision target has met it on this process's batches (no collective).

        ``tolerance`` only; always ``False`` without one. To decide on every process's batches, every process calls
        :meth:`converged_across` at the same points.
        """
        return self.converged_across(None)

    def converged_across(self, reduce: Reduce | None) -> bool:
        """:attr:`converged`, decided on the sums of every process that ``reduce`` (a sum over processes) adds up.

        Each analysis with an opinion calls ``reduce`` once (a collective: every process must call this together,
        after the same number of batches, or the ones that do wait for the others forever); ``None``: this process's
        batches, with no collective.
        """
        if not self._num_updates:
            return False
        opinions = [analysis.converged(reduce) for analysis in self.analyses]
        opinions = [opinion for opinion in opinions if opinion is not None]
        return bool(opinions) and all(opinions)

    def update(
        self,
        model: nn.Module,
        batch: Batch,
        num_samples: int | None = None,
        clean: Tensor | None = None,
        encoder_outputs: Recording | None = None,
    ) -> None:
        """Run ``model`` on ``batch`` and its occluded copies and add the outputs to every accumulator.

        Call it inside the precision context the model runs in (e.g. ``torch.autocast``) to measure what the model
        does under it. ``batch`` is never modified.

        Args:
            model: The model (put in eval mode for the passes; its modes are restored).
            batch: A batch on the model's device.
            num_samples: Count only the first ``num_samples`` samples of this batch (the rest repeat samples counted
                elsewhere, e.g. ``DistributedSampler``'s padding); ``None``: all.
            clean: The model's prediction on ``batch`` if it is already known (the validation step's output), as
                ``forward_fn`` and ``output_key`` would give it, before ``output_transform``: only the occluded copies
                are then run. ``None``: the clean batch runs too.
            encoder_outputs: With ``encoders`` and ``clean``: the encoders' outputs recorded in the forward call that
                gave ``clean`` (``with measurement.engine.recording_encoders(model) as encoder_outputs: ...``), so the
                clean batch never runs again. ``None``: the clean batch's encoders run once more to be recorded.
        """
        passes = self._run(model, batch, clean, encoder_outputs)
        batch_size = passes.num_samples
        keep = batch_size if num_samples is None else max(0, min(batch_size, num_samples))
        if keep < batch_size:
            passes = passes.first(keep)
        self._prepare(passes.outputs)
        self.contribution.update(passes)
        for analysis in self.analyses:
            analysis.update(passes)
        self._num_updates += 1

    def compute(self) -> ContributionResult:
        """The result of every batch added since the last :meth:`reset` (every process's: ``sync_across_processes``).

        Raises:
            ValueError: If no batch was added.
        """
        if not self._num_updates:
            raise ValueError("ContributionMeasurement.compute() was called before any update(model, batch).")
        self._set_sync(self.sync_across_processes)
        result = self.contribution.result()
        for analysis in self.analyses:
            result = analysis.write(result)
        return result

    def reset(self, check: int = 0) -> None:
        """Forget every batch added so far; the accumulators are kept and reused.

        Args:
            check: Which measurement starts (the monitor passes the trainer's ``global_step``): the random draws of
                ``"noise"`` and ``"permute"`` depend only on ``seed``, ``check`` and the batch's position in it, so a
                resumed fit draws what an uninterrupted one draws.

        The encoder cache keeps what it checked (a new fit checks again: :meth:`check_encoders_again`) and forgets
        what it computed with weights that changed since.
        """
        if self.engine.cache is not None:
            self.engine.cache.new_measurement()
            self.engine.cache.start_measurement(check, self.options.seed)
        self.engine.start_draws(check)
        self.contribution.reset()
        for analysis in self.analyses:
            analysis.reset()
        self._num_updates = 0

    def check_batch(self, model: nn.Module, batch: Batch) -> None:
        """Check that ``batch`` fits the modalities, fills and output options, without measuring (one row runs).

        The monitor calls it on the first validation batch Lightning runs (the sanity check's included), so a wrong
        key or index fails before the first training step.
        """
        self.engine.check_batch(model, batch)

    def check_encoders_again(self) -> None:
        """With ``encoders``: check the cached path against the plain one on the next batch (e.g. on a new fit)."""
        if self.engine.cache is not None:
            self.engine.cache.check_again()

    def _set_sync(self, sync: bool) -> None:
        """Whether every accumulator (and any metric inside it) syncs across processes in its ``compute()``.

        Set once per setting: walking every metric's modules at each ``compute`` costs as much as a small model's call.
        """
        if self._sync_applied is sync:
            return
        self._sync_applied = sync
        for analysis in self.analyses:
            analysis.sync = sync
        owned = [self.contribution.metric, *(metric for analysis in self.analyses for metric in analysis.metrics())]
        for metric in (module for owner in owned if owner is not None for module in owner.modules()):
            if isinstance(metric, Metric) and metric.sync_on_compute != sync:
                metric.sync_on_compute = metric._to_sync = sync
                metric._computed = None  # a value cached with the other setting

    def _run(self, model: nn.Module, batch: Batch, clean: Tensor | None, recorded: Recording | None) -> Passes:
        """The clean, one-at-a-time and coalition outputs the analyses read, in one engine run."""
        outputs = self.engine.run(model, batch, clean, recorded, self.coalitions)
        return Passes(outputs, batch, outputs.clean.shape[0])

    def _prepare(self, outputs: OccludedOutputs) -> None:
        """Build the accumulators on the first batch (they need its attributes, outputs and device).

        After a :meth:`reset` the existing ones are reused when they fit (building a metric costs as much as a small
        model's forward pass); a batch with other attributes, outputs or device gets new ones.
        """
        clean = outputs.clean
        fit = (outputs.attribute_names, clean.shape[1], clean.device)
        if fit == self._prepared_for:
            return
        if self._num_updates:
            assert self._prepared_for is not None
            raise ValueError(_unlike_batches_message(self._prepared_for, fit))
        with _float32_default():  # a bf16-true precision context sets a half default dtype: sums stay full
            for part in (self.contribution, *self.analyses):
                part.prepare(outputs)
        self._prepared_for = fit
        self._sync_applied = None  # new accumulators: give them the setting at the next compute


def _unlike_batches_message(before: tuple[Any, ...], now: tuple[Any, ...]) -> str:
    """Why a batch cannot join the measurement's sums, ``(attribute names, outputs, device)`` before and now.

    A change in the number of a modality's attributes or of the outputs is what dynamically padded sequences give
    (per-position attributes and outputs follow the batch's length): the fix is a fixed padding length, not a reset.
    """
    (names, num_outputs, device), (new_names, new_outputs, new_device) = before, now
    said = (
        f"This batch has attributes {new_names} and {new_outputs} outputs on {new_device}; the earlier batches of "
        f"this measurement had {names} and {num_outputs} on {device}. Every batch of one measurement needs the same "
        "attributes and outputs"
    )
    counts = {name: len(attributes) for name, attributes in names.items()}
    new_counts = {name: len(attributes) for name, attributes in new_names.items()}
    if device == new_device and (counts != new_counts or num_outputs != new_outputs):
        return (
            f"{said}, and their number follows the input's shape, which changed. For sequences padded per batch "
            "(dynamic padding), pad every batch to one fixed length (a tokenizer's padding='max_length' with "
            "max_length=..., or a collate_fn that pads to it), or give per-token attributes a fixed count "
            "(Tokens(max_length=...), Words(max_words=...)). Between measurements of different data, call reset()."
        )
    return f"{said}: call reset() between measurements of different data."


@contextmanager
def _float32_default() -> Iterator[None]:
    """Float32 as the default dtype inside, unless it already is a full-precision one."""
    dtype = torch.get_default_dtype()
    if dtype in (torch.float32, torch.float64):
        yield
        return
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)


__all__ = ["SYNC_DOCS", "ContributionMeasurement"]
