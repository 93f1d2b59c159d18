"""Modality contributions of a trained model, measured offline on any iterable of batches.

Both functions are loops of :class:`lightning_mc.ContributionMeasurement` over the batches.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torchmetrics import Metric

from lightning_mc.analyses.bootstrap import DEFAULT_MAX_CI_SAMPLES
from lightning_mc.analyses.perf_drop import TargetSpec
from lightning_mc.analyses.shapley import ShapleyResult, check_num_modalities
from lightning_mc.core.batches import batches_on_device
from lightning_mc.core.engine import ForwardFn
from lightning_mc.core.metric import Normalization
from lightning_mc.core.modality import Batch, ModalitiesSpec, resolve_modalities
from lightning_mc.core.occlusion import FillSpec
from lightning_mc.core.outputs import OutputTransform
from lightning_mc.core.result import ContributionResult
from lightning_mc.measurement import ContributionMeasurement


def modality_contribution(
    model: nn.Module,
    data: Iterable[Batch],
    modalities: ModalitiesSpec,
    *,
    forward_fn: ForwardFn | None = None,
    output_key: str | None = None,
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
    tolerance: float | None = None,
    show_progress: bool = False,
) -> ContributionResult:
    """Measure how much each modality contributes to ``model``'s outputs on ``data``.

    Each modality (or each of its attributes) is occluded in turn and the mean absolute change of the outputs is
    accumulated (Gapp et al., arXiv 2503.01904, Algorithm 1). No labels are needed.

    Args:
        model: The model. It runs in eval mode under ``torch.inference_mode()``; its mode is restored.
        data: Any iterable of batches (a ``DataLoader``, a list of batches).
        modalities: ``name -> dict key`` (dict batches), ``name -> index`` (tuple/list batches), or
            :class:`lightning_mc.Modality` objects (nested batches, per-modality fills, attributes).
        forward_fn: ``(model, batch) -> output``. Default: ``model(*modality_tensors)``, the modality tensors as
            positional arguments in the order of ``modalities``, e.g. ``model(batch["image"], batch["table"])``.
        output_key: Where the prediction is in the model's output: a dict key, a Hugging Face ``ModelOutput`` field
            or an attribute, e.g. ``"logits"`` (after ``forward_fn``). ``None``: the output is the prediction tensor.
        output_transform: Activation applied to the outputs before they are compared: ``None`` (regression, or a
            model that already returns probabilities), ``"softmax"``, ``"sigmoid"`` or a callable.
        occlusion: Default fill for modalities that do not set their own: ``"mean"`` (per-sample mean, the paper's
            image fill), ``"zeros"``, ``"noise"``, ``"permute"``, a number or a callable.
        normalization: ``"ratio_of_sums"`` (Algorithm 1, default), ``"per_sample"`` or ``"per_sample_output"``.
        max_batch_size: Most rows per forward call (``None``: 4 × the batch size).
        limit_batches: Use only the first ``limit_batches`` batches of ``data``.
        device: Where batches are moved before the model runs; default: the device of the model's first parameter.
        seed: Seed for the ``"noise"`` and ``"permute"`` fills and the bootstrap.
        check_redundancy: Also run one extra copy of each batch with every modality occluded at once (``N`` more
            rows per batch), store ``v(all)`` in ``all_occluded_raw`` and warn when the one-at-a-time raw values sum
            to less than a quarter of it: the modalities then look redundant and the shares are not meaningful
            (use :func:`modality_shapley`).
        ci: Coverage of percentile bootstrap intervals for the shares (e.g. ``0.95``; ``"ratio_of_sums"`` and
            ``"per_sample"`` normalizations), stored in ``share_low``/``share_high``. ``None`` (default): none. The
            per-sample values of the first ``max_ci_samples`` samples are kept (``N × M`` float64) and resampled
            ``n_boot`` times with a generator seeded by ``seed`` (:mod:`lightning_mc.analyses.bootstrap`).
        n_boot: Number of bootstrap replicates.
        max_ci_samples: Most samples whose per-sample values are kept for the intervals.
        shapley: Also compute exact modality Shapley values and pairwise interactions (``M ≤ 6``; ``2^M − 1`` more
            copies of each batch), stored in ``shapley`` (:mod:`lightning_mc.analyses.shapley`), with
            ``all_occluded_raw``.
        perf_metric: Label-aware view: a torchmetrics metric (e.g. ``BinaryAUROC()``) computed on the clean outputs
            (``perf_clean``) and with each whole modality occluded; ``perf_drop[m]`` is ``perf_clean`` minus the
            latter (:mod:`lightning_mc.analyses.perf_drop`). Needs ``target``. The metric instance is not updated.
        target: Where the targets are in each batch: a dict key, a tuple index or ``batch -> Tensor``.
        tolerance: Measure batches in order until every share's 95% half-width is at most ``tolerance`` (at most
            ``limit_batches``), then stop: the result's ``num_samples`` says how many were needed and
            ``share_half_width`` holds the half-widths (delta method, :mod:`lightning_mc.analyses.precision`).
            ``None`` (default): every batch.
        show_progress: Show a progress bar over the batches, with the model rows run per second (tqdm).

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
    measurement = ContributionMeasurement(
        modalities,
        forward_fn=forward_fn,
        output_key=output_key,
        output_transform=output_transform,
        occlusion=occlusion,
        normalization=normalization,
        max_batch_size=max_batch_size,
        seed=seed,
        check_redundancy=check_redundancy,
        ci=ci,
        n_boot=n_boot,
        max_ci_samples=max_ci_samples,
        shapley=shapley,
        perf_metric=perf_metric,
        target=target,
        tolerance=tolerance,
    )
    return _measure(measurement, model, data, limit_batches, device, show_progress)


def modality_shapley(
    model: nn.Module,
    data: Iterable[Batch],
    modalities: ModalitiesSpec,
    *,
    forward_fn: ForwardFn | None = None,
    output_key: str | None = None,
    output_transform: OutputTransform = None,
    occlusion: FillSpec = "mean",
    max_batch_size: int | None = None,
    limit_batches: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    show_progress: bool = False,
) -> ShapleyResult:
    """Exact modality Shapley values and pairwise interactions of ``model`` on ``data``.

    Every non-empty coalition of whole modalities is occluded at once (``2^M − 1`` copies per batch, ``M ≤ 6``), run
    in forward calls of at most ``max_batch_size`` rows (:mod:`lightning_mc.analyses.shapley` defines the game).
    Arguments as in :func:`modality_contribution`; modality attributes are ignored (each modality is occluded whole,
    with its fill).

    Returns:
        A :class:`lightning_mc.ShapleyResult`.

    Raises:
        ValueError: With more than 6 modalities, an empty ``data`` or invalid arguments.

    Example:
        >>> class Model(torch.nn.Module):  # either input alone suffices
        ...     def forward(self, a, b):
        ...         return torch.maximum(a.sum(1, keepdim=True), b.sum(1, keepdim=True))
        >>> x = torch.rand(8, 3)
        >>> result = modality_shapley(Model(), [(x, x.clone())], {"a": 0, "b": 1}, occlusion="zeros")
        >>> result.shares
        {'a': 0.5, 'b': 0.5}
        >>> result.interactions[("a", "b")] > 0  # positive: redundant
        True
    """
    resolved = resolve_modalities(modalities)
    check_num_modalities(len(resolved))
    measurement = ContributionMeasurement(
        [m.whole() for m in resolved],
        forward_fn=forward_fn,
        output_key=output_key,
        output_transform=output_transform,
        occlusion=occlusion,
        max_batch_size=max_batch_size,
        seed=seed,
        shapley=True,
    )
    with warnings.catch_warnings():  # the one-at-a-time shares, undefined for redundant modalities, are not asked for
        warnings.filterwarnings("ignore", message="Occluding any single modality left every model output unchanged")
        result = _measure(measurement, model, data, limit_batches, device, show_progress, "modality shapley")
    assert result.shapley is not None  # shapley=True
    return result.shapley


def _measure(
    measurement: ContributionMeasurement,
    model: nn.Module,
    data: Iterable[Batch],
    limit_batches: int | None,
    device: torch.device | str | None,
    show_progress: bool,
    description: str = "modality contribution",
) -> ContributionResult:
    """Add the batches of ``data`` (at most ``limit_batches``; fewer once converged) and compute the measurement."""
    if not isinstance(show_progress, bool):
        raise TypeError(f"show_progress={show_progress!r} ({type(show_progress).__name__}) must be True or False.")
    batches = batches_on_device(data, model, limit_batches, device)
    if show_progress:
        batches = _with_progress(batches, measurement, _num_batches(data, limit_batches), description)
    for batch in batches:
        measurement.update(model, batch)
        if measurement.converged:
            break
    if not measurement.num_updates:
        raise ValueError("data held no batch; pass a non-empty iterable of batches.")
    return measurement.compute()


def _num_batches(data: Iterable[Batch], limit_batches: int | None) -> int | None:
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        return limit_batches
    return total if limit_batches is None else min(total, limit_batches)


def _with_progress(
    batches: Iterable[Batch], measurement: ContributionMeasurement, total: int | None, description: str
) -> Iterable[Batch]:
    """``batches``, with a tqdm bar that shows the model rows (clean and occluded copies) run per second."""
    from tqdm.auto import tqdm  # tqdm comes with Lightning; imported only when a bar is asked for

    engine = measurement.engine
    start_rows, start = engine.rows_forwarded, time.perf_counter()
    with tqdm(batches, total=total, unit="batch", desc=description) as bar:
        for batch in bar:
            yield batch
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(rows_per_s=f"{(engine.rows_forwarded - start_rows) / elapsed:.0f}")
