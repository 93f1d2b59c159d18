"""Label-aware view: how much a chosen performance metric drops when each modality is occluded.

The modality contribution shares are label-free: they measure how far the outputs move. Gapp et al. relate them to
performance (single-modality models' AUCs); this module gives the occlusion counterpart on the same passes. For a
torchmetrics metric ``P`` (e.g. ``BinaryAUROC()``, ``MulticlassAccuracy(num_classes=3)``) and targets ``y`` from the
batch::

    perf_clean  = P(p⁰, y)
    perf_drop_m = P(p⁰, y) − P(p^m, y)      (p^m: outputs with the whole modality m occluded by its fill)

A positive drop means the metric fell when the modality was removed (for a higher-is-better metric; for a loss the
sign flips). Predictions are the outputs after the output transform, ``(N, C)``, squeezed to ``(N,)`` when ``C = 1``
and the targets are ``(N,)`` (the shapes binary torchmetrics metrics take). Each metric is a clone of the one passed
(the user's instance is never updated), so it reduces across processes under DDP exactly as that torchmetrics metric
does.

This is separate from the label-free metric by design: it needs targets, and a modality can move the outputs a lot
(large share) without changing a thresholded metric like accuracy, or the reverse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_mc.analyses.options import MeasurementOptions
from lightning_mc.analyses.part import Analysis, Passes
from lightning_mc.core.engine import OccludedOutputs
from lightning_mc.core.modality import TargetSpec, select_target
from lightning_mc.core.result import ContributionResult


def check_perf_arguments(perf_metric: Metric | None, target: TargetSpec | None) -> None:
    """Raise a clear error unless both ``perf_metric`` and ``target`` are set (or neither)."""
    if perf_metric is None and target is None:
        return
    if perf_metric is None or target is None:
        raise ValueError(
            "perf_metric and target go together: pass a torchmetrics Metric as perf_metric and where the targets are "
            f"in the batch as target (got perf_metric={perf_metric!r}, target={target!r})."
        )
    if not isinstance(perf_metric, Metric):
        raise TypeError(f"perf_metric={perf_metric!r} must be a torchmetrics.Metric, e.g. BinaryAUROC().")
    if isinstance(target, bool) or not (isinstance(target, (str, int)) or callable(target)):
        raise TypeError(f"target={target!r} must be a dict key, a tuple index or a callable batch -> Tensor.")


def _preds(outputs: Tensor, target: Tensor) -> Tensor:
    single = outputs.ndim == 2 and outputs.shape[1] == 1 and target.ndim == 1
    return outputs.squeeze(-1) if single else outputs


class PerformanceDrop:
    """One clone of a torchmetrics metric on the clean outputs and one per occluded modality.

    Args:
        metric: The performance metric (not modified; it is cloned). Its ``compute()`` must return a scalar.
        modality_names: The modalities, in order.

    Example:
        >>> from torchmetrics.classification import BinaryAccuracy
        >>> drop = PerformanceDrop(BinaryAccuracy(), ["a", "b"])
        >>> target = torch.tensor([1, 0, 1, 0])
        >>> clean = torch.tensor([[0.9], [0.1], [0.8], [0.2]])
        >>> drop.update(target, clean, {"a": torch.full((4, 1), 0.6), "b": clean})
        >>> drop.compute()
        (1.0, {'a': 0.5, 'b': 0.0})
    """

    def __init__(self, metric: Metric, modality_names: Sequence[str]) -> None:
        self.modality_names = tuple(modality_names)
        self.clean = metric.clone()
        self.clean.reset()
        self.occluded = {name: self.clean.clone() for name in self.modality_names}

    def to(self, device: torch.device | str) -> PerformanceDrop:
        """Moves every metric to ``device``; returns ``self``."""
        self.clean = self.clean.to(device)
        self.occluded = {name: metric.to(device) for name, metric in self.occluded.items()}
        return self

    def reset(self) -> None:
        """Forgets every batch added so far."""
        self.clean.reset()
        for metric in self.occluded.values():
            metric.reset()

    def update(self, target: Tensor, clean: Tensor, occluded: Mapping[str, Tensor]) -> None:
        """Add a batch: ``target`` ``(N, ...)``, ``clean`` ``(N, C)`` and ``name -> (N, C)`` whole-modality outputs."""
        if target.shape[0] != clean.shape[0]:
            raise ValueError(
                f"The targets have {target.shape[0]} samples but the outputs {clean.shape[0]}; target must select "
                "per-sample targets along dimension 0."
            )
        if target.shape[0] == 0:  # e.g. a batch of DistributedSampler padding only: nothing to add
            return
        target = target.to(clean.device)
        self.clean.update(_preds(clean, target), target)
        for name in self.modality_names:
            self.occluded[name].update(_preds(occluded[name], target), target)

    def compute(self) -> tuple[float, dict[str, float]]:
        """``(perf_clean, {name: perf_clean − perf_occluded})``, reduced across processes by torchmetrics."""
        clean = self._scalar(self.clean)
        return clean, {name: clean - self._scalar(self.occluded[name]) for name in self.modality_names}

    @staticmethod
    def _scalar(metric: Metric) -> float:
        value = metric.compute()
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(
                f"perf_metric {type(metric).__name__} computed {value!r}; it must compute a scalar (e.g. "
                "average='macro' for a multiclass metric)."
            )
        return float(value)


class PerfDropAnalysis(Analysis):
    """The ``perf_metric`` option: the metric on the clean and on each whole-modality-occluded output.

    Args:
        metric: The performance metric (cloned).
        target: Where the targets are in each batch.
        modality_names: The measured modalities, in order.
    """

    def __init__(self, metric: Metric, target: TargetSpec, modality_names: tuple[str, ...]) -> None:
        self.target = target
        self.metric, self.modality_names = metric, modality_names
        self.drop: PerformanceDrop | None = None

    @classmethod
    def from_options(cls, options: MeasurementOptions, modality_names: tuple[str, ...]) -> PerfDropAnalysis | None:
        """Checks ``perf_metric`` and ``target`` (both or neither); built when they are set."""
        check_perf_arguments(options.perf_metric, options.target)
        if options.perf_metric is None or options.target is None:
            return None
        return cls(options.perf_metric, options.target, modality_names)

    def coalitions(self) -> tuple[frozenset[int], ...]:
        """Each whole modality alone (free for a modality measured whole: its one-at-a-time copy)."""
        return tuple(frozenset({index}) for index in range(len(self.modality_names)))

    def prepare(self, outputs: OccludedOutputs) -> None:
        """Clones the metric (once) onto the outputs' device."""
        if self.drop is None:
            self.drop = PerformanceDrop(self.metric, self.modality_names)
        self.drop = self.drop.to(outputs.clean.device)

    def update(self, passes: Passes) -> None:
        """Adds the batch's targets, clean and whole-modality outputs."""
        assert self.drop is not None  # prepared
        targets = select_target(passes.batch, self.target)[: passes.num_samples]
        whole = {name: passes.coalition(frozenset({index})) for index, name in enumerate(self.modality_names)}
        self.drop.update(targets, passes.outputs.clean, whole)

    def reset(self) -> None:
        """Resets every clone."""
        if self.drop is not None:
            self.drop.reset()

    def metrics(self) -> tuple[Metric, ...]:
        """The clones of ``perf_metric`` (none before the first batch)."""
        return () if self.drop is None else (self.drop.clean, *self.drop.occluded.values())

    def write(self, result: ContributionResult) -> ContributionResult:
        """Fills ``perf_clean`` and ``perf_drop``."""
        assert self.drop is not None
        perf_clean, perf_drop = self.drop.compute()
        return dataclasses.replace(result, perf_clean=perf_clean, perf_drop=perf_drop)
