"""How precisely the shares are known so far: delta-method 95% half-widths from sums, for ``tolerance=``.

A measurement with ``tolerance`` stops adding batches once every share's half-width is at most ``tolerance``. The
half-widths must be cheap (checked after every batch; under DDP one collective every few batches), exact under DDP
and order-free, so they come from additive sums of the per-sample values ``d_nm = Σ_c |p⁰_nc − p^m_nc|`` (summed
over the modality's attributes) and ``t_n = Σ_m d_nm``:

* ``"ratio_of_sums"``: the share ``s_m = Σ_n d_nm / Σ_n t_n`` is a ratio of means. Its first-order (delta-method)
  expansion is ``s_m − s_m* ≈ mean_n(d_nm − s_m t_n) / mean_n(t_n)``, so
  ``Var(s_m) ≈ Var_n(d_nm − s_m t_n) / (N · mean(t)²)``, where the variance of ``u_n = d_nm − s_m t_n`` is
  ``(Σd² − 2 s Σ d t + s² Σ t²) / (N − 1)`` (the mean of ``u`` is 0 by construction). Sums kept: ``N``, ``Σ d_m``,
  ``Σ d_m²``, ``Σ d_m t``, ``Σ t``, ``Σ t²``.
* ``"per_sample"``: the share is the mean of each informative sample's ratio ``r_nm = d_nm / t_n`` (``t_n > 0``);
  its standard error is the sample standard deviation of ``r_m`` over ``√N``. Sums kept: ``N``, ``Σ r_m``, ``Σ r_m²``.

The half-width is ``z₀.₉₇₅ · standard error`` (``z = 1.96``). Below :data:`MIN_SAMPLES` samples it is ``inf``: the
normal approximation (and the sample variance) are unreliable on a handful of samples, and stopping there would
undercover. ``examples/interval_coverage.py`` and ``tests/test_tolerance.py`` check the coverage the rule gives.

Example:
    >>> import torch
    >>> from lightning_mc.analyses.precision import ShareHalfWidth
    >>> metric = ShareHalfWidth(num_modalities=2, normalization="ratio_of_sums")
    >>> d = torch.rand(400, 2, generator=torch.Generator().manual_seed(0))
    >>> metric.update(d)
    >>> half_width = metric.compute()
    >>> bool((half_width > 0).all() and (half_width < 0.05).all())
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed
from torch import Tensor
from torchmetrics import Metric

from lightning_mc.analyses.options import MeasurementOptions
from lightning_mc.analyses.part import MetricAnalysis, Passes, Reduce
from lightning_mc.core.checks import check_fraction
from lightning_mc.core.result import ContributionResult
from lightning_mc.core.warn_once import WarnOnce

#: ``z`` of a two-sided 95% normal interval.
Z_95 = 1.959963984540054
#: Fewer samples than this give an infinite half-width: no early stop on a handful of samples.
MIN_SAMPLES = 50
#: Normalizations a tolerance is available for.
TOLERANCE_NORMALIZATIONS: tuple[str, ...] = ("ratio_of_sums", "per_sample")


def check_tolerance(tolerance: float | None, normalization: str) -> None:
    """Raise a ValueError unless ``tolerance`` is ``None`` or a number in ``(0, 1)`` for a supported normalization.

    Example:
        >>> check_tolerance(0.02, "ratio_of_sums")
    """
    if tolerance is None:
        return
    check_fraction("tolerance", tolerance, optional=True, what="a half-width", hint=", e.g. 0.02")
    if normalization not in TOLERANCE_NORMALIZATIONS:
        raise ValueError(
            f"tolerance={tolerance!r} is available for normalization in {TOLERANCE_NORMALIZATIONS}; got "
            f"normalization={normalization!r}."
        )


class ShareHalfWidth(Metric):
    """Delta-method 95% half-widths of the shares, from sums (``dist_reduce_fx="sum"``: exact under DDP).

    Args:
        num_modalities: ``M``.
        normalization: ``"ratio_of_sums"`` or ``"per_sample"`` (see the module docstring).
        kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, num_modalities: int, normalization: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_tolerance(0.5, normalization)
        self.normalization = normalization
        self.num_modalities = num_modalities
        # one vector of every sum (N, Σd_m, Σd_m², and for ratio_of_sums Σd_m·t, Σt, Σt²): one state update a batch
        size = 1 + 2 * num_modalities + (num_modalities + 2 if normalization == "ratio_of_sums" else 0)
        self.add_state("totals", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        """Add per-sample values ``d`` ``(N, M)`` (:func:`~lightning_mc.core.metric.per_sample_values`)."""
        values = values.double()
        totals = values.sum(1, keepdim=True)
        if self.normalization == "per_sample":  # d is replaced by each informative sample's ratios
            informative = totals[:, 0] > 0
            values = values[informative] / totals[informative]
            columns = [torch.ones_like(values[:, :1]), values, values * values]
        else:
            columns = [torch.ones_like(totals), values, values * values, values * totals, totals, totals * totals]
        self.totals += torch.cat(columns, dim=1).sum(0)

    def compute(self) -> Tensor:
        """The half-widths ``(M,)`` float64; ``inf`` below :data:`MIN_SAMPLES` samples or when nothing moved."""
        return self.half_widths(self.sums())

    def sums(self) -> Tensor:
        """This process's sums as one float64 vector: what a single ``all_reduce(SUM)`` reduces across processes.

        :meth:`half_widths` of the summed vectors is :meth:`compute` on the union of the processes' samples, at the
        cost of one collective instead of torchmetrics' all-gather of its state.
        """
        return self.totals.clone()

    def half_widths(self, sums: Tensor) -> Tensor:
        """The half-widths ``(M,)`` of the samples whose :meth:`sums` (summed over processes, or not) are ``sums``."""
        num_modalities = self.num_modalities
        count = float(sums[0])
        sum_d, sum_d2 = sums[1 : 1 + num_modalities], sums[1 + num_modalities : 1 + 2 * num_modalities]
        if count < max(MIN_SAMPLES, 2):
            return torch.full_like(sum_d, math.inf)
        if self.normalization == "per_sample":
            mean = sum_d / count
            variance = (sum_d2 - count * mean * mean).clamp_min(0) / (count - 1)
            return Z_95 * (variance / count).sqrt()
        sum_dt = sums[1 + 2 * num_modalities : 1 + 3 * num_modalities]
        sum_t, sum_t2 = sums[-2], sums[-1]
        if sum_t <= 0:
            return torch.full_like(sum_d, math.inf)
        shares = sum_d / sum_t
        residual = sum_d2 - 2 * shares * sum_dt + shares * shares * sum_t2
        variance = residual.clamp_min(0) / (count - 1)
        mean_total = sum_t / count
        return Z_95 * (variance / count).sqrt() / mean_total


class SharePrecision(MetricAnalysis):
    """The ``tolerance`` option: half-widths of the shares after every batch; converged once all are small enough.

    Args:
        modality_names: The measured modalities, in order.
        tolerance: The half-width asked for.
        normalization: The shares' normalization.
    """

    def __init__(self, modality_names: tuple[str, ...], tolerance: float, normalization: str) -> None:
        self.modality_names, self.tolerance = modality_names, tolerance
        self.metric = ShareHalfWidth(len(modality_names), normalization)
        self._warn = WarnOnce()

    @classmethod
    def from_options(cls, options: MeasurementOptions, modality_names: tuple[str, ...]) -> SharePrecision | None:
        """Checks ``tolerance``; built when it is set."""
        check_tolerance(options.tolerance, options.normalization)
        if options.tolerance is None:
            return None
        return cls(modality_names, options.tolerance, options.normalization)

    def update(self, passes: Passes) -> None:
        """Adds the batch's per-sample values to the sums."""
        self.metric.update(passes.per_sample)

    def write(self, result: ContributionResult) -> ContributionResult:
        """Fills ``share_half_width``."""
        sums = self.metric.sums()
        if self.metric.sync_on_compute and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)  # one collective (torchmetrics would all-gather each of the 6 states)
        widths = self.metric.half_widths(sums)
        share_half_width = dict(zip(self.modality_names, widths.tolist()))
        message = self.unmet(share_half_width, int(sums[0]), result.shares)
        if message is not None:
            self._warn("unmet", message)
        return dataclasses.replace(result, share_half_width=share_half_width)

    def unmet(self, half_widths: dict[str, float], samples: int, shares: dict[str, float]) -> str | None:
        """The warning of a measurement that ended before every half-width reached ``tolerance`` (``None``: reached).

        Half-widths shrink as ``1/√samples``, so ``samples · (widest / tolerance)²`` samples would about reach it.
        Nothing is said when no occlusion moved any output (the shares are undefined, and warned about).

        Example:
            >>> precision = SharePrecision(("a", "b"), 0.02, "ratio_of_sums")
            >>> message = precision.unmet({"a": 0.04, "b": 0.03}, 100, {"a": 0.5, "b": 0.5})
            >>> message[message.index("about") :][:23]
            'about 400 samples would'
        """
        widest = max(half_widths.values())
        # the first of the widest: two modalities' half-widths are equal (one share is 1 minus the other) up to
        # float noise, which must not pick the name
        name = next(name for name, width in half_widths.items() if width >= widest * (1 - 1e-9))
        if widest <= self.tolerance or any(share != share for share in shares.values()):
            return None
        if math.isinf(widest):
            reached = f"fewer than {MIN_SAMPLES} samples were measured ({samples}), too few for a half-width"
            needed = f"at least {MIN_SAMPLES} samples are needed before one is computed"
        else:
            reached = f"the widest 95% half-width of the shares is {widest:.3g} ({name!r}) after {samples} samples"
            needed = (
                f"about {math.ceil(samples * (widest / self.tolerance) ** 2)} samples would reach it (a half-width "
                "shrinks as 1/√samples)"
            )
        return (
            f"tolerance={self.tolerance!r} was not reached: {reached}; {needed}. Measure more samples (a larger "
            "limit_batches or a larger validation set), or pass a larger tolerance; result.share_half_width holds "
            "the half-widths."
        )

    def converged(self, reduce: Reduce | None = None) -> bool:
        """Whether every half-width is at most ``tolerance``: of this process's samples, or of every process's.

        Args:
            reduce: Sums a tensor across processes (one collective, which every process must call); ``None``: this
                process's samples only, with no collective.
        """
        sums = self.metric.sums()
        if reduce is not None:
            sums = reduce(sums)
        return bool((self.metric.half_widths(sums) <= self.tolerance).all())
