"""Modality contributions of a trained model, measured offline on any iterable of batches."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torchmetrics import Metric

from lightning_mc.batches import batches_on_device
from lightning_mc.bootstrap import DEFAULT_MAX_CI_SAMPLES, PerSampleRaw, check_ci_arguments, share_intervals
from lightning_mc.engine import ForwardFn, OcclusionEngine, OutputTransform
from lightning_mc.metric import ModalityContribution, Normalization, check_normalization
from lightning_mc.modality import Batch, ModalitiesSpec, resolve_modalities
from lightning_mc.occlusion import FillSpec
from lightning_mc.perf_drop import (
    PerformanceDrop,
    TargetSpec,
    check_perf_arguments,
    select_target,
    whole_modality_outputs,
)
from lightning_mc.result import ContributionResult
from lightning_mc.shapley import (
    AllOccludedMovement,
    ModalityShapley,
    ShapleyResult,
    check_num_modalities,
    coalitions,
    redundancy_message,
)
from lightning_mc.shapley import modality_shapley as modality_shapley  # re-exported


def modality_contribution(
    model: nn.Module,
    data: Iterable[Batch],
    modalities: ModalitiesSpec,
    *,
    forward_fn: ForwardFn | None = None,
    output_transform: OutputTransform = None,
    occlusion: FillSpec = "mean",
    normalization: Normalization = "ratio_of_sums",
    max_batch_size: int | None = None,
    limit_batches: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    check_redundancy: bool = False,
    ci: float | None = None,
    n_boot: int = 1000,
    max_ci_samples: int = DEFAULT_MAX_CI_SAMPLES,
    shapley: bool = False,
    perf_metric: Metric | None = None,
    target: TargetSpec | None = None,
) -> ContributionResult:
    """Measure how much each modality contributes to ``model``'s outputs on ``data``.

    Each modality (or each of its attributes) is occluded in turn and the mean absolute change of the outputs is
    accumulated (Gapp et al., arXiv 2503.01904, Algorithm 1). No labels are needed.

    Args:
        model: The model. It runs in eval mode under ``torch.inference_mode()``; its mode is restored.
        data: Any iterable of batches (a ``DataLoader``, a list of batches).
        modalities: ``name -> dict key`` (dict batches), ``name -> index`` (tuple/list batches), or
            :class:`lightning_mc.Modality` objects (nested batches, per-modality fills, attributes).
        forward_fn: ``(model, batch) -> Tensor``. Default: ``model(*modality_tensors)``, the modality tensors as
            positional arguments in the order of ``modalities``, e.g. ``model(batch["image"], batch["table"])``.
        output_transform: Activation applied to the outputs before they are compared: ``None`` (regression, or a
            model that already returns probabilities), ``"softmax"``, ``"sigmoid"`` or a callable.
        occlusion: Default fill for modalities that do not set their own: ``"mean"`` (per-sample mean, the paper's
            image fill), ``"zeros"``, ``"noise"``, ``"permute"``, a number or a callable.
        normalization: ``"ratio_of_sums"`` (Algorithm 1, default), ``"per_sample"`` or ``"per_sample_output"``.
        max_batch_size: Most rows per forward call (``None``: 4 × the batch size).
        limit_batches: Use only the first ``limit_batches`` batches of ``data``.
        device: Where batches are moved before the model runs; default: the device of the model's first parameter.
        seed: Seed for the ``"noise"`` and ``"permute"`` fills.
        check_redundancy: Also run one extra copy of each batch with every modality occluded at once (``N`` more
            rows per batch), store ``v(all)`` in ``all_occluded_raw`` and warn when the one-at-a-time raw values sum
            to less than a quarter of it: the modalities then look redundant and the shares are not meaningful
            (use :func:`lightning_mc.shapley.modality_shapley`).
        ci: Coverage of percentile bootstrap intervals for the shares (e.g. ``0.95``; ``"ratio_of_sums"`` and
            ``"per_sample"`` normalizations), stored in ``share_low``/``share_high``. ``None`` (default): none. The
            per-sample values of the first ``max_ci_samples`` samples are kept (``N × M`` float64) and resampled
            ``n_boot`` times with a generator seeded by ``seed`` (:mod:`lightning_mc.bootstrap`).
        n_boot: Number of bootstrap replicates.
        max_ci_samples: Most samples whose per-sample values are kept for the intervals.
        shapley: Also compute exact modality Shapley values and pairwise interactions (``M ≤ 6``; ``2^M − 1`` more
            copies of each batch), stored in ``shapley`` (:mod:`lightning_mc.shapley`), with ``all_occluded_raw``.
        perf_metric: Label-aware view: a torchmetrics metric (e.g. ``BinaryAUROC()``) computed on the clean outputs
            (``perf_clean``) and with each whole modality occluded; ``perf_drop[m]`` is ``perf_clean`` minus the
            latter (:mod:`lightning_mc.perf_drop`). Needs ``target``. The metric instance itself is not updated.
        target: Where the targets are in each batch: a dict key, a tuple index or ``batch -> Tensor``.

    Returns:
        A :class:`lightning_mc.ContributionResult`.

    Raises:
        ValueError: If ``data`` holds no batch, or on invalid arguments.

    Example:
        >>> import torch
        >>> class Model(torch.nn.Module):
        ...     def forward(self, image, table):
        ...         return image.flatten(1).sum(1, keepdim=True) + 0 * table.sum(1, keepdim=True)
        >>> batches = [(torch.randn(8, 1, 4, 4), torch.randn(8, 3))]
        >>> result = modality_contribution(Model(), batches, {"image": 0, "table": 1}, occlusion="zeros")
        >>> result.shares
        {'image': 1.0, 'table': 0.0}
    """
    batches = batches_on_device(data, model, limit_batches, device)
    check_normalization(normalization)
    check_ci_arguments(ci, n_boot, max_ci_samples, normalization)
    check_perf_arguments(perf_metric, target)
    resolved = resolve_modalities(modalities)
    if shapley:
        check_num_modalities(len(resolved))
    engine = OcclusionEngine(
        resolved,
        forward_fn=forward_fn,
        output_transform=output_transform,
        occlusion=occlusion,
        max_batch_size=max_batch_size,
        seed=seed,
    )
    metric: ModalityContribution | None = None
    all_occluded = AllOccludedMovement() if check_redundancy else None
    everything = [frozenset(range(len(resolved)))]
    names = tuple(m.name for m in resolved)
    per_sample = PerSampleRaw(max_ci_samples) if ci is not None else None
    shapley_metric = ModalityShapley(names) if shapley else None
    perf = PerformanceDrop(perf_metric, names) if perf_metric is not None else None
    for batch in batches:
        outputs = engine.run(model, batch)
        if shapley_metric is not None:  # its last coalition is "everything": no separate pass for check_redundancy
            _, by_coalition = engine.run_coalitions(model, batch, coalitions(len(resolved)), include_clean=False)
            shapley_metric = shapley_metric.to(outputs.clean.device)
            shapley_metric.update(outputs.clean, by_coalition)
        elif all_occluded is not None:
            _, occluded_all = engine.run_coalitions(model, batch, everything, include_clean=False)
            all_occluded = all_occluded.to(outputs.clean.device)
            all_occluded.update(outputs.clean, occluded_all[:, 0])
        if per_sample is not None:
            per_sample.update(outputs.clean, outputs.occluded)
        if perf is not None and target is not None:
            whole = whole_modality_outputs(engine, model, batch, outputs)
            perf.to(outputs.clean.device).update(select_target(batch, target), outputs.clean, whole)
        if metric is None:
            metric = ModalityContribution(
                outputs.attribute_names, num_outputs=outputs.clean.shape[1], normalization=normalization
            ).to(outputs.clean.device)
        metric.update(outputs.clean, outputs.occluded)
    if metric is None:
        raise ValueError("data held no batch; pass a non-empty iterable of batches.")
    result = ContributionResult.from_values(metric.compute(), metric.attribute_names, normalization)
    if per_sample is not None and ci is not None:
        low, high = share_intervals(per_sample, names, ci, n_boot, seed, normalization)
        result = dataclasses.replace(result, ci=ci, share_low=low, share_high=high)
    if perf is not None:
        perf_clean, perf_drop = perf.compute()
        result = dataclasses.replace(result, perf_clean=perf_clean, perf_drop=perf_drop)
    if shapley_metric is not None:
        shapley_result = ShapleyResult.from_values(shapley_metric.compute(), names)
        v_all = shapley_result.coalition_values["+".join(names)]
        result = dataclasses.replace(result, shapley=shapley_result, all_occluded_raw=v_all)
    elif all_occluded is not None:
        result = dataclasses.replace(result, all_occluded_raw=float(all_occluded.compute()))
    if not check_redundancy:
        return result
    message = redundancy_message(result.raw, result.all_occluded_raw)
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=2)
    return result
