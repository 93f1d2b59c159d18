"""Percentile bootstrap confidence intervals for the modality shares.

The share of modality ``m`` is ``s_m = Σ_n d_nm / Σ_n Σ_k d_nk`` where ``d_nm = Σ_c |p⁰_nc − p^m_nc|`` is sample
``n``'s summed absolute output change when modality ``m`` is occluded (summed over its attributes), as in
:class:`lightning_mc.ModalityContribution` with ``normalization="ratio_of_sums"`` (with ``"per_sample"``: the mean
over informative samples of ``d_nm / Σ_k d_nk``). Samples are resampled with replacement ``n_boot`` times (a private,
seeded generator; the global RNG is untouched) and the ``(1 − ci)/2`` and ``(1 + ci)/2`` quantiles of the resampled
shares form the interval. The rows are put in a canonical (lexicographic) order before resampling, so the interval
depends only on the set of per-sample values, not on the order the batches (or the processes) delivered them.

Memory: a bootstrap needs the per-sample values, not only sums. :class:`PerSampleRaw` keeps the first
``max_samples`` samples *per process* (``N × M`` float64 numbers: 100 000 samples × 2 modalities = 1.6 MB); later
samples are not kept. DDP: the kept values are a torchmetrics ``"cat"`` state, so ``compute()`` all-gathers every
process's rows and every rank bootstraps the same set with the same seed, giving identical intervals on every rank
and the same interval as one process on the whole data (as long as no process hit the cap).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_mc.analyses.options import MeasurementOptions
from lightning_mc.analyses.part import MetricAnalysis, Passes
from lightning_mc.core.checks import check_fraction, check_int
from lightning_mc.core.result import ContributionResult

#: Bootstrap replicates drawn per block (bounds the ``block × N`` index tensor).
_BLOCK = 64
#: Normalizations a bootstrap interval is available for.
BOOTSTRAP_NORMALIZATIONS: tuple[str, ...] = ("ratio_of_sums", "per_sample")


def check_ci_arguments(ci: float | None, n_boot: int, max_samples: int, normalization: str) -> None:
    """Validate the confidence-interval options; raise a ValueError naming the argument.

    Example:
        >>> check_ci_arguments(0.95, 1000, 100_000, "ratio_of_sums")
        >>> check_ci_arguments(0.95, 0, 100_000, "ratio_of_sums")
        Traceback (most recent call last):
        ...
        ValueError: n_boot=0 must be a positive int.
    """
    check_fraction("ci", ci, optional=True, what="a coverage", hint=", e.g. 0.95")
    check_int("n_boot", n_boot)
    check_int("max_ci_samples", max_samples)
    if ci is not None and normalization not in BOOTSTRAP_NORMALIZATIONS:
        raise ValueError(
            f"Confidence intervals (ci={ci!r}) are available for normalization in {BOOTSTRAP_NORMALIZATIONS}; got "
            f"normalization={normalization!r}."
        )


def canonical_order(values: Tensor) -> Tensor:
    """The rows of ``values`` ``(N, M)`` sorted lexicographically (first column first).

    Any order of the same rows gives the same tensor.

    Example:
        >>> canonical_order(torch.tensor([[2.0, 1.0], [1.0, 5.0], [1.0, 3.0]])).tolist()
        [[1.0, 3.0], [1.0, 5.0], [2.0, 1.0]]
    """
    order = torch.arange(values.shape[0], device=values.device)
    for column in range(values.shape[1] - 1, -1, -1):  # stable sorts, least significant key first
        order = order[torch.sort(values[order, column], stable=True).indices]
    return values[order]


def _statistic(values: Tensor, index: Tensor, normalization: str) -> Tensor:
    """Shares of the resampled rows ``values[index]`` (``index``: ``(B, N)``) → ``(B, M)``."""
    if normalization == "ratio_of_sums":
        sums = values[index].sum(1)
        return sums / sums.sum(-1, keepdim=True)
    totals = values.sum(1, keepdim=True)
    informative = totals.squeeze(1) > 0
    row_shares = torch.where(informative.unsqueeze(1), values / totals.clamp_min(1e-300), 0.0)
    return row_shares[index].sum(1) / informative.double()[index].sum(1, keepdim=True)


def bootstrap_share_interval(
    per_sample: Tensor, *, ci: float, n_boot: int, seed: int, normalization: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Shares and their percentile bootstrap interval.

    Args:
        per_sample: ``(N, M)`` non-negative per-sample raw values.
        ci: Coverage of the interval, in ``(0, 1)``.
        n_boot: Number of bootstrap replicates.
        seed: Seed of the private generator.
        normalization: ``"ratio_of_sums"`` (Algorithm 1) or ``"per_sample"`` (mean of each informative sample's
            shares), as in :class:`lightning_mc.ModalityContribution`.

    Returns:
        ``(shares, low, high)``, each ``(M,)`` float64; NaN where the shares are undefined (nothing moved). The result
        does not depend on the order of the rows.

    Raises:
        ValueError: On an empty ``per_sample``, ``ci`` outside ``(0, 1)``, ``n_boot < 1`` or another normalization.

    Example:
        >>> shares, low, high = bootstrap_share_interval(
        ...     torch.tensor([[1.0, 1.0], [2.0, 0.0], [1.0, 3.0]]),
        ...     ci=0.95, n_boot=200, seed=0, normalization="ratio_of_sums",
        ... )
        >>> shares.tolist()
        [0.5, 0.5]
        >>> bool((low <= shares).all() and (shares <= high).all())
        True
    """
    if per_sample.ndim != 2 or per_sample.shape[0] == 0:
        raise ValueError(f"per_sample must be a non-empty (N, M) tensor; got shape {tuple(per_sample.shape)}.")
    if ci is None:
        raise ValueError("ci=None: pass a coverage in (0, 1), e.g. 0.95.")
    check_ci_arguments(ci, n_boot, 1, normalization)
    if normalization not in BOOTSTRAP_NORMALIZATIONS:  # also without ci's message
        raise ValueError(f"normalization={normalization!r} must be one of {BOOTSTRAP_NORMALIZATIONS}.")
    values = canonical_order(per_sample.double().cpu())
    num_samples = values.shape[0]
    shares = _statistic(values, torch.arange(num_samples).unsqueeze(0), normalization)[0]
    generator = torch.Generator().manual_seed(seed)
    replicates = []
    for start in range(0, n_boot, _BLOCK):
        count = min(_BLOCK, n_boot - start)
        index = torch.randint(0, num_samples, (count, num_samples), generator=generator)
        replicates.append(_statistic(values, index, normalization))
    boot = torch.cat(replicates)
    alpha = (1 - ci) / 2
    quantiles = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    low, high = torch.nanquantile(boot, quantiles, dim=0)
    return shares, low, high


class PerSampleRaw(Metric):
    """Keeps each sample's per-modality raw values ``d`` ``(N, M)`` for a bootstrap, memory-bounded.

    A torchmetrics ``"cat"`` state: under DDP ``compute()`` all-gathers the rows of every process, so every rank gets
    the same set. At most ``max_samples`` samples are kept per process (the first ones); ``num_dropped`` counts the
    rest (a sum state).

    Args:
        max_samples: Most samples kept per process.

    Example:
        >>> from lightning_mc.core.metric import per_sample_values
        >>> metric = PerSampleRaw(max_samples=3)
        >>> metric.update(per_sample_values(torch.zeros(2, 1), {"a": torch.ones(2, 1, 1), "b": torch.zeros(2, 1, 1)}))
        >>> metric.update(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
        >>> metric.compute().tolist(), int(metric.num_dropped)
        ([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]], 1)
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, max_samples: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_int("max_samples", max_samples)
        self.max_samples = max_samples
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("num_dropped", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        """Add per-sample values ``d`` ``(N, M)`` (:func:`~lightning_mc.core.metric.per_sample_values`).

        Rows past the cap are dropped and counted.
        """
        room = max(0, self.max_samples - sum(kept.shape[0] for kept in self.values))
        self.values.append(values[:room])
        self.num_dropped += values.shape[0] - min(room, values.shape[0])

    def compute(self) -> Tensor:
        """All kept rows ``(N, M)`` float64 (of every process under DDP), in canonical order."""
        if isinstance(self.values, Tensor):  # after a DDP sync the list is already concatenated
            return canonical_order(self.values)
        if not self.values:
            raise ValueError("PerSampleRaw.compute() was called before any update.")
        return canonical_order(dim_zero_cat(self.values))


def share_intervals(
    metric: PerSampleRaw, names: Iterable[str], ci: float, n_boot: int, seed: int, normalization: str
) -> tuple[dict[str, float], dict[str, float]]:
    """``(low, high)``: ``name -> bound`` from a :class:`PerSampleRaw` (reduced across processes first).

    NaN bounds when no sample was kept or nothing moved.
    """
    names = list(names)
    values = metric.compute()
    if values.shape[0] == 0:
        nan = dict.fromkeys(names, float("nan"))
        return nan, dict(nan)
    _, low, high = bootstrap_share_interval(values, ci=ci, n_boot=n_boot, seed=seed, normalization=normalization)
    return dict(zip(names, low.tolist())), dict(zip(names, high.tolist()))


class ShareIntervals(MetricAnalysis):
    """The ``ci`` option: keeps the per-sample values and writes the shares' bootstrap intervals.

    Args:
        modality_names: The measured modalities, in order.
        ci: Coverage of the intervals.
        n_boot: Bootstrap replicates.
        max_samples: Most samples kept per process.
        seed: Seed of the resampling.
        normalization: The shares' normalization.
    """

    def __init__(
        self, modality_names: tuple[str, ...], ci: float, n_boot: int, max_samples: int, seed: int, normalization: str
    ) -> None:
        self.modality_names, self.ci, self.n_boot, self.seed = modality_names, ci, n_boot, seed
        self.normalization = normalization
        self.metric = PerSampleRaw(max_samples)

    @classmethod
    def from_options(cls, options: MeasurementOptions, modality_names: tuple[str, ...]) -> ShareIntervals | None:
        """Checks ``ci``, ``n_boot`` and ``max_ci_samples``; built when ``ci`` is set."""
        check_ci_arguments(options.ci, options.n_boot, options.max_ci_samples, options.normalization)
        if options.ci is None:
            return None
        return cls(
            modality_names, options.ci, options.n_boot, options.max_ci_samples, options.seed, options.normalization
        )

    def update(self, passes: Passes) -> None:
        """Keeps the batch's per-sample values."""
        self.metric.update(passes.per_sample)

    def write(self, result: ContributionResult) -> ContributionResult:
        """Fills ``ci``, ``share_low`` and ``share_high``."""
        low, high = share_intervals(
            self.metric, self.modality_names, self.ci, self.n_boot, self.seed, self.normalization
        )
        return dataclasses.replace(result, ci=self.ci, share_low=low, share_high=high)
