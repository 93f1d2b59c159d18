"""Percentile bootstrap confidence intervals for the ratio-of-sums modality shares.

The share of modality ``m`` is ``s_m = Σ_n d_nm / Σ_n Σ_k d_nk`` where ``d_nm = Σ_c |p⁰_nc − p^m_nc|`` is sample
``n``'s summed absolute output change when modality ``m`` is occluded (summed over its attributes), as in
:class:`lightning_mc.ModalityContribution` with ``normalization="ratio_of_sums"``. Samples are resampled with
replacement ``n_boot`` times (a private, seeded generator; the global RNG is untouched) and the ``(1 − ci)/2`` and
``(1 + ci)/2`` quantiles of the resampled shares form the interval.

Per-sample values are kept in memory for the first ``max_samples`` samples only (``N × M`` float64 numbers); the
point shares are computed from the kept samples too, so share and interval describe the same samples. This is a
single-process tool: under DDP, gather the per-sample values first (``all_gather``) — sums alone do not suffice for a
bootstrap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from lightning_mc.engine import ForwardFn, OccludedOutputs, OcclusionEngine, OutputTransform
from lightning_mc.modality import Batch, ModalitiesSpec, resolve_modalities
from lightning_mc.occlusion import FillSpec

#: Bootstrap replicates drawn per block (bounds the ``block × N`` index tensor).
_BLOCK = 64


def per_sample_raw(outputs: OccludedOutputs) -> Tensor:
    """``d`` ``(N, M)``: each sample's summed absolute output change per modality (summed over its attributes).

    Samples with a NaN or inf output are dropped, as in :class:`lightning_mc.ModalityContribution`.
    """
    clean = outputs.clean.double()
    columns = [(clean.unsqueeze(1) - occluded.double()).abs().sum(dim=(1, 2)) for occluded in outputs.occluded.values()]
    finite = torch.isfinite(clean).all(-1)
    for occluded in outputs.occluded.values():
        finite &= torch.isfinite(occluded).flatten(1).all(-1)
    return torch.stack(columns, dim=1)[finite]


def bootstrap_share_interval(
    per_sample: Tensor, ci: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Ratio-of-sums shares and their percentile bootstrap interval.

    Args:
        per_sample: ``(N, M)`` non-negative per-sample raw values.
        ci: Coverage of the interval, in ``(0, 1)``.
        n_boot: Number of bootstrap replicates.
        seed: Seed of the private generator.

    Returns:
        ``(shares, low, high)``, each ``(M,)`` float64; NaN where the shares are undefined (nothing moved).

    Raises:
        ValueError: On an empty ``per_sample``, ``ci`` outside ``(0, 1)`` or ``n_boot < 1``.

    Example:
        >>> shares, low, high = bootstrap_share_interval(torch.tensor([[1.0, 1.0], [2.0, 0.0], [1.0, 3.0]]), n_boot=200)
        >>> shares.tolist()
        [0.5, 0.5]
        >>> bool((low <= shares).all() and (shares <= high).all())
        True
    """
    if per_sample.ndim != 2 or per_sample.shape[0] == 0:
        raise ValueError(f"per_sample must be a non-empty (N, M) tensor; got shape {tuple(per_sample.shape)}.")
    if not 0 < ci < 1:
        raise ValueError(f"ci={ci!r} must be in (0, 1).")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r} must be a positive int.")
    values = per_sample.double().cpu()
    num_samples = values.shape[0]
    totals = values.sum(0)
    shares = totals / totals.sum()
    generator = torch.Generator().manual_seed(seed)
    replicates = []
    for start in range(0, n_boot, _BLOCK):
        count = min(_BLOCK, n_boot - start)
        index = torch.randint(0, num_samples, (count, num_samples), generator=generator)
        sums = values[index].sum(1)  # (count, M)
        replicates.append(sums / sums.sum(-1, keepdim=True))
    boot = torch.cat(replicates)
    alpha = (1 - ci) / 2
    quantiles = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    low, high = torch.nanquantile(boot, quantiles, dim=0)
    return shares, low, high


@dataclass(frozen=True)
class ShareIntervals:
    """Ratio-of-sums shares with percentile bootstrap confidence intervals.

    Attributes:
        shares: ``name -> share`` on the kept samples.
        low: ``name -> lower bound``.
        high: ``name -> upper bound``.
        ci: Coverage of the intervals.
        n_boot: Number of bootstrap replicates.
        num_samples: Number of samples kept (at most ``max_samples``).
    """

    shares: dict[str, float]
    low: dict[str, float]
    high: dict[str, float]
    ci: float
    n_boot: int
    num_samples: int


def modality_share_intervals(
    model: nn.Module,
    data: Iterable[Batch],
    modalities: ModalitiesSpec,
    *,
    forward_fn: ForwardFn | None = None,
    output_transform: OutputTransform = None,
    occlusion: FillSpec = "mean",
    max_batch_size: int | None = None,
    limit_batches: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    ci: float = 0.95,
    n_boot: int = 1000,
    max_samples: int = 100_000,
) -> ShareIntervals:
    """One-at-a-time shares of ``model`` on ``data`` with percentile bootstrap confidence intervals.

    Arguments as in :func:`lightning_mc.functional.modality_contribution` (ratio-of-sums normalization), plus ``ci``,
    ``n_boot`` and ``max_samples`` (per-sample values kept; later samples are not measured). ``seed`` seeds both the
    random fills and the bootstrap.

    Raises:
        ValueError: If ``data`` holds no batch, or on invalid arguments.
    """
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples={max_samples!r} must be a positive int.")
    engine = OcclusionEngine(
        resolve_modalities(modalities),
        forward_fn=forward_fn,
        output_transform=output_transform,
        occlusion=occlusion,
        max_batch_size=max_batch_size,
        seed=seed,
    )
    if device is None:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    kept: list[Tensor] = []
    count = 0
    for index, batch in enumerate(data):
        if (limit_batches is not None and index >= limit_batches) or count >= max_samples:
            break
        values = per_sample_raw(engine.run(model, move_data_to_device(batch, device)))[: max_samples - count]
        kept.append(values.cpu())
        count += values.shape[0]
    if not kept:
        raise ValueError("data held no batch; pass a non-empty iterable of batches.")
    shares, low, high = bootstrap_share_interval(torch.cat(kept), ci=ci, n_boot=n_boot, seed=seed)
    names = [m.name for m in engine.modalities]
    return ShareIntervals(
        shares=dict(zip(names, shares.tolist())),
        low=dict(zip(names, low.tolist())),
        high=dict(zip(names, high.tolist())),
        ci=ci,
        n_boot=n_boot,
        num_samples=count,
    )
