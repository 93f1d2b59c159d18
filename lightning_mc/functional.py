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

from lightning_mc.analyses.options import DEFAULT_MAX_CI_SAMPLES, MeasurementOptions, document_options
from lightning_mc.analyses.shapley import ShapleyResult
from lightning_mc.core.batches import batches_on_device
from lightning_mc.core.encoders import EncodersSpec
from lightning_mc.core.forward import ForwardFn
from lightning_mc.core.metric import Normalization
from lightning_mc.core.modality import Batch, ModalitiesSpec, TargetSpec, resolve_modalities
from lightning_mc.core.occlusion import FillSpec
from lightning_mc.core.outputs import OutputKey, OutputTransform
from lightning_mc.core.result import ContributionResult
from lightning_mc.measurement import SYNC_DOCS, ContributionMeasurement

#: The options :func:`modality_shapley` takes (the others choose analyses it does not run).
SHAPLEY_OPTIONS = ("forward_fn", "output_key", "output_transform", "occlusion", "max_batch_size", "seed", "encoders")


@document_options(docs=SYNC_DOCS, after="show_progress")
@document_options()
def modality_contribution(  # noqa: D417 (the options' docs come from MeasurementOptions)
    model: nn.Module,
    data: Iterable[Batch],
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
    limit_batches: int | None = None,
    device: torch.device | str | None = None,
    show_progress: bool = False,
    sync_across_processes: bool = False,
) -> ContributionResult:
    """Measure how much each modality contributes to ``model``'s outputs on ``data``.

    Each modality (or each of its attributes) is occluded in turn and the mean absolute change of the outputs is
    accumulated (Gapp et al., arXiv 2503.01904, Algorithm 1). No labels are needed.

    Args:
        model: The model. It runs in eval mode under ``torch.inference_mode()``; its mode is restored.
        data: Any iterable of batches (a ``DataLoader``, a list of batches).
        modalities: ``name -> dict key`` (dict batches), ``name -> index`` (tuple/list batches), or
            :class:`lightning_mc.Modality` objects (nested batches, per-modality fills, attributes).
        limit_batches: Use only the first ``limit_batches`` batches of ``data`` (with ``tolerance``: at most; the stop
            is decided on this process's batches, so processes may stop after different batches).
        device: Where batches are moved before the model runs; default: the device of the model's first parameter.
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
    options = MeasurementOptions.pick(locals())
    measurement = ContributionMeasurement(modalities, **options, sync_across_processes=sync_across_processes)
    return _measure(measurement, model, data, limit_batches, device, show_progress)


@document_options(docs=SYNC_DOCS, after="show_progress")
@document_options(SHAPLEY_OPTIONS)
def modality_shapley(  # noqa: D417 (the options' docs come from MeasurementOptions)
    model: nn.Module,
    data: Iterable[Batch],
    modalities: ModalitiesSpec,
    *,
    forward_fn: ForwardFn | None = None,
    output_key: OutputKey = None,
    output_transform: OutputTransform = None,
    occlusion: FillSpec = "mean",
    max_batch_size: int | None = None,
    seed: int = 0,
    encoders: EncodersSpec | None = None,
    limit_batches: int | None = None,
    device: torch.device | str | None = None,
    show_progress: bool = False,
    sync_across_processes: bool = False,
) -> ShapleyResult:
    """Exact modality Shapley values and pairwise interactions of ``model`` on ``data``.

    Every non-empty coalition of whole modalities is occluded at once (``2^M − 1`` copies per batch, ``M ≤ 6``), run
    in forward calls of at most ``max_batch_size`` rows (:mod:`lightning_mc.analyses.shapley` defines the game).
    Modality attributes are ignored (each modality is occluded whole, with its fill).

    Args:
        model: The model. It runs in eval mode under ``torch.inference_mode()``; its mode is restored.
        data: Any iterable of batches (a ``DataLoader``, a list of batches).
        modalities: As in :func:`modality_contribution`.
        limit_batches: Use only the first ``limit_batches`` batches of ``data``.
        device: Where batches are moved before the model runs; default: the device of the model's first parameter.
        show_progress: Show a progress bar over the batches, with the model rows run per second (tqdm).

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
    whole = [m.whole() for m in resolve_modalities(modalities)]
    options = MeasurementOptions.pick(locals())
    measurement = ContributionMeasurement(whole, **options, shapley=True, sync_across_processes=sync_across_processes)
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
