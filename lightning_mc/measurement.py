"""One measurement: the occluded passes of each batch and every sum they feed, turned into a ContributionResult.

:class:`ContributionMeasurement` is the single place where the options of a measurement (``check_redundancy``,
``ci``, ``shapley``, ``perf_metric``) decide which passes run and which accumulators they feed. Every entry point
drives it: :func:`lightning_mc.functional.modality_contribution` and :func:`~lightning_mc.functional.modality_shapley`
loop over batches, :class:`lightning_mc.ModalityContributionMonitor` calls it from validation hooks, and a user's own
training loop can call it the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_mc.analyses.bootstrap import (
    DEFAULT_MAX_CI_SAMPLES,
    PerSampleRaw,
    per_sample_values,
    share_intervals,
)
from lightning_mc.analyses.options import OPTION_NAMES, MeasurementOptions, document_options
from lightning_mc.analyses.perf_drop import (
    PerformanceDrop,
    TargetSpec,
    select_target,
    whole_modality_outputs,
)
from lightning_mc.analyses.precision import ShareHalfWidth
from lightning_mc.analyses.shapley import (
    AllOccludedMovement,
    ModalityShapley,
    ShapleyResult,
    coalitions,
    redundancy_message,
)
from lightning_mc.core.engine import ForwardFn, OccludedOutputs, OcclusionEngine
from lightning_mc.core.metric import ModalityContribution, Normalization
from lightning_mc.core.modality import Batch, ModalitiesSpec, resolve_modalities
from lightning_mc.core.occlusion import FillSpec
from lightning_mc.core.outputs import OutputTransform
from lightning_mc.core.result import ContributionResult


@dataclasses.dataclass
class _Passes:
    """The model outputs of one batch that the accumulators read.

    Attributes:
        outputs: Clean outputs and one-at-a-time occlusions (per attribute).
        coalitions: ``(N, K, C)``: every coalition (``shapley``) or only "all modalities" (``check_redundancy``).
        whole: ``name -> (N, C)`` with each whole modality occluded (``perf_metric``).
    """

    outputs: OccludedOutputs
    coalitions: Tensor | None = None
    whole: dict[str, Tensor] | None = None

    def first(self, count: int) -> _Passes:
        """The passes of the first ``count`` samples only."""
        outputs = self.outputs
        return _Passes(
            OccludedOutputs(
                outputs.clean[:count],
                {name: value[:count] for name, value in outputs.occluded.items()},
                outputs.attribute_names,
            ),
            None if self.coalitions is None else self.coalitions[:count],
            None if self.whole is None else {name: value[:count] for name, value in self.whole.items()},
        )


@document_options()
class ContributionMeasurement:
    """Measures modality contributions batch by batch: ``update(model, batch)``, then ``compute()``.

    Each :meth:`update` runs the model on the batch and on its occluded copies (batched, in eval mode, under
    :func:`torch.inference_mode`) and adds the outputs to torchmetrics accumulators: the contribution sums of
    :class:`~lightning_mc.ModalityContribution` and, where asked, the all-occluded movement, the Shapley coalitions,
    the per-sample values for intervals and the performance drop. :meth:`compute` reduces them across processes
    (under ``torch.distributed`` each accumulator syncs itself, so every rank gets the numbers of the union of all
    ranks' samples) and returns a :class:`~lightning_mc.ContributionResult`. :meth:`reset` starts a new measurement.

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
        output_key: str | None = None,
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
        encoders: Mapping[str, str | Sequence[str]] | None = None,
    ) -> None:
        self.modalities = resolve_modalities(modalities)
        #: The checked options (:class:`~lightning_mc.analyses.options.MeasurementOptions`).
        self.options = MeasurementOptions(**MeasurementOptions.pick(locals()))
        self.options.check_modalities(self.modality_names)
        self.engine = OcclusionEngine(self.modalities, **self.options.engine_arguments())
        self._metrics: dict[str, Any] = {}
        self._num_updates = 0
        self._warned_redundant = False

    def __getattr__(self, name: str) -> Any:  # measurement.ci, measurement.seed, ...: the options, read-only
        options = self.__dict__.get("options")  # absent while unpickling
        if name in OPTION_NAMES and options is not None:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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
        """Whether every share's 95% half-width is at most ``tolerance`` (always ``False`` without a tolerance).

        Reduced across processes (every rank gets the same answer, so every rank stops after the same batch).
        """
        if self.tolerance is None or not self._num_updates:
            return False
        return bool((self._metrics["precision"].compute() <= self.tolerance).all())

    def update(
        self, model: nn.Module, batch: Batch, num_samples: int | None = None, clean: Tensor | None = None
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
        """
        passes = self._run(model, batch, clean)
        batch_size = passes.outputs.clean.shape[0]
        keep = batch_size if num_samples is None else max(0, min(batch_size, num_samples))
        if keep < batch_size:
            passes = passes.first(keep)
        metrics = self._accumulators(passes.outputs)
        outputs = passes.outputs
        metrics["contribution"].update(outputs.clean, outputs.occluded)
        if "shapley" in metrics:
            metrics["shapley"].update(outputs.clean, passes.coalitions)
        elif "all_occluded" in metrics:
            metrics["all_occluded"].update(outputs.clean, passes.coalitions[:, 0])
        per_sample = [metrics[name] for name in ("per_sample", "precision") if name in metrics]
        if per_sample:  # the bootstrap and the tolerance read the same per-sample values: computed once
            values = per_sample_values(outputs.clean, outputs.occluded)
            for metric in per_sample:
                metric.update(values)
        if "perf" in metrics:
            targets = select_target(batch, self.target)[:keep]  # type: ignore[arg-type]
            metrics["perf"].update(targets, outputs.clean, passes.whole)
        self._num_updates += 1

    def compute(self) -> ContributionResult:
        """The result of every batch added since the last :meth:`reset` (reduced across processes).

        Raises:
            ValueError: If no batch was added.
        """
        if not self._num_updates:
            raise ValueError("ContributionMeasurement.compute() was called before any update(model, batch).")
        metrics = self._metrics
        contribution: ModalityContribution = metrics["contribution"]
        result = ContributionResult.from_values(
            contribution.compute(), contribution.attribute_names, self.normalization
        )
        if "shapley" in metrics:
            shapley = ShapleyResult.from_values(metrics["shapley"].compute(), self.modality_names)
            v_all = shapley.coalition_values["+".join(self.modality_names)]
            result = dataclasses.replace(result, shapley=shapley, all_occluded_raw=v_all)
        elif "all_occluded" in metrics:
            result = dataclasses.replace(result, all_occluded_raw=float(metrics["all_occluded"].compute()))
        if "per_sample" in metrics:
            low, high = share_intervals(
                metrics["per_sample"], self.modality_names, self.ci, self.n_boot, self.seed, self.normalization
            )
            result = dataclasses.replace(result, ci=self.ci, share_low=low, share_high=high)
        if "precision" in metrics:
            half_width = dict(zip(self.modality_names, metrics["precision"].compute().tolist()))
            result = dataclasses.replace(result, share_half_width=half_width)
        if "perf" in metrics:
            perf_clean, perf_drop = metrics["perf"].compute()
            result = dataclasses.replace(result, perf_clean=perf_clean, perf_drop=perf_drop)
        if self.check_redundancy:
            self._warn_if_redundant(result)
        return result

    def reset(self) -> None:
        """Forget every batch added so far; the accumulators are kept and reused."""
        for metric in self._metrics.values():
            metric.reset()
        self._num_updates = 0

    def _run(self, model: nn.Module, batch: Batch, clean: Tensor | None) -> _Passes:
        """The forward passes the options need, as few copies as possible."""
        engine = self.engine
        if self.shapley:
            every = coalitions(len(self.modalities))
            singletons = [2**index - 1 for index in range(len(self.modalities))]  # coalition k - 1 is bitmask k
            if all(m.attributes is None for m in self.modalities):  # the singletons are the one-at-a-time copies
                clean_rows, by_coalition = engine.run_coalitions(model, batch, every, include_clean=clean is None)
                if clean is not None:
                    clean_rows = engine.given_clean(clean, by_coalition.shape[-1], by_coalition.shape[0])
                assert clean_rows is not None
                outputs = OccludedOutputs(
                    clean_rows,
                    {m.name: by_coalition[:, [i]] for m, i in zip(self.modalities, singletons)},
                    {m.name: ("all",) for m in self.modalities},
                )
            else:
                outputs = engine.run(model, batch, clean)
                _, by_coalition = engine.run_coalitions(model, batch, every, include_clean=False)
            whole = {m.name: by_coalition[:, i] for m, i in zip(self.modalities, singletons)}
            return _Passes(outputs, by_coalition, whole)
        outputs = engine.run(model, batch, clean)
        everything = None
        if self.check_redundancy:
            _, everything = engine.run_coalitions(
                model, batch, [frozenset(range(len(self.modalities)))], include_clean=False
            )
        whole = whole_modality_outputs(engine, model, batch, outputs) if self.perf_metric is not None else None
        return _Passes(outputs, everything, whole)

    def _accumulators(self, outputs: OccludedOutputs) -> dict[str, Any]:
        """The accumulators of this measurement, built on the first batch (they need its attributes and device).

        After a :meth:`reset` the existing ones are reused when they fit (building a metric costs as much as a small
        model's forward pass); a batch with other attributes, outputs or device gets new ones.
        """
        clean = outputs.clean
        contribution = self._metrics.get("contribution")
        if (
            contribution is not None
            and contribution.attribute_names == outputs.attribute_names
            and contribution.attribute_diff.shape[1] == clean.shape[1]
            and contribution.device == clean.device
        ):
            return self._metrics
        if self._num_updates:
            raise ValueError(
                f"This batch has attributes {outputs.attribute_names} and {clean.shape[1]} outputs on {clean.device}; "
                f"the earlier batches of this measurement had {contribution.attribute_names} and "
                f"{contribution.attribute_diff.shape[1]} on {contribution.device}. Every batch of one measurement "
                "needs the same attributes and outputs: call reset() between measurements."
            )
        with _float32_default():  # a bf16-true precision context sets a half default dtype: sums stay full
            metrics: dict[str, Any] = {
                "contribution": ModalityContribution(
                    outputs.attribute_names, num_outputs=clean.shape[1], normalization=self.normalization
                )
            }
            if self.shapley:
                metrics["shapley"] = ModalityShapley(self.modality_names)
            elif self.check_redundancy:
                metrics["all_occluded"] = AllOccludedMovement()
            if self.ci is not None:
                metrics["per_sample"] = PerSampleRaw(self.max_ci_samples)
            if self.perf_metric is not None:
                metrics["perf"] = PerformanceDrop(self.perf_metric, self.modality_names)
            if self.tolerance is not None:
                metrics["precision"] = ShareHalfWidth(len(self.modalities), self.normalization)
        self._metrics = {name: metric.to(clean.device) for name, metric in metrics.items()}
        return self._metrics

    def _warn_if_redundant(self, result: ContributionResult) -> None:
        assert result.all_occluded_raw is not None  # check_redundancy measures it
        message = redundancy_message(result.raw, result.all_occluded_raw)
        if message is not None and not self._warned_redundant:
            self._warned_redundant = True
            rank_zero_warn(message, category=UserWarning)


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


__all__ = ["ContributionMeasurement"]
