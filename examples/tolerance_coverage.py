"""Does ``tolerance=`` deliver the precision it promises? Coverage of early-stopped shares against the full set.

A small frozen random network reads three modalities ``a`` (4 features), ``b`` (3) and ``c`` (2) through one tanh
layer into a softmax over 3 classes; each modality is occluded with zeros. The data set is fixed: 2000 standard-normal
samples. Each repetition shuffles the data order with its own seed, cuts it into batches of 16 and calls
``modality_contribution(..., tolerance=0.03)``, which measures batches in order until every share's 95% half-width is
at most 0.03 and stops there. A repetition is *covered* when every early-stopped share lies within the tolerance of
the share of the full set (all 2000 samples, ``tolerance=None``); a rule that keeps its promise covers about 95% of
repetitions (a little more here: the early stop draws a fifth of a finite set without replacement, a little less
because all three shares must be covered at once and the stop is a sequential decision).

The half-widths are also computed here without the library, from the model's outputs on each sample (delta method
for the ratio of sums, standard error of the mean of ratios for ``normalization="per_sample"``), after every batch of
every shuffled order. That gives, for comparison, the smallest fixed ``limit_batches`` whose half-widths are at most
the tolerance in *every* repetition: the budget a fixed fraction needs to promise the same precision.

Run:  python examples/tolerance_coverage.py   (a few seconds on CPU)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_mc.analyses.precision import MIN_SAMPLES, Z_95
from lightning_mc.functional import modality_contribution

MODALITIES = {"a": 0, "b": 1, "c": 2}
#: Features per modality and the scale of its input weights.
WIDTHS = {"a": (4, 1.0), "b": (3, 0.7), "c": (2, 0.5)}
NUM_SAMPLES = 2000
BATCH_SIZE = 16
TOLERANCE = 0.03


class FrozenNet(nn.Module):
    """``softmax(tanh(a W_a + b W_b + c W_c) W_out)`` with fixed random weights (no parameter is trained)."""

    def __init__(self, seed: int = 0, hidden: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.inputs = nn.ParameterList(
            nn.Parameter(scale * torch.randn(width, hidden, generator=generator), requires_grad=False)
            for width, scale in WIDTHS.values()
        )
        self.head = nn.Parameter(torch.randn(hidden, num_classes, generator=generator), requires_grad=False)

    def forward(self, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        hidden = sum(x @ weight for x, weight in zip((a, b, c), self.inputs))
        return (torch.tanh(hidden) @ self.head).softmax(-1)


def dataset(num_samples: int = NUM_SAMPLES, seed: int = 1234) -> tuple[Tensor, ...]:
    """The fixed data set: one standard-normal tensor ``(num_samples, width)`` per modality."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(num_samples, width, generator=generator) for width, _ in WIDTHS.values())


def shuffled_order(seed: int, num_samples: int = NUM_SAMPLES) -> Tensor:
    """The order repetition ``seed`` measures the samples in."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))


def batches(data: tuple[Tensor, ...], order: Tensor, batch_size: int = BATCH_SIZE) -> list[tuple[Tensor, ...]]:
    """``data`` in ``order``, cut into batches of ``batch_size`` (the last may be shorter)."""
    return [tuple(x[order[i : i + batch_size]] for x in data) for i in range(0, len(order), batch_size)]


def per_sample_values(model: nn.Module, data: tuple[Tensor, ...]) -> Tensor:
    """``d`` ``(N, M)`` float64 computed by hand: ``Σ_c |p⁰_nc − p^m_nc|`` with modality ``m`` set to zeros."""
    with torch.no_grad():
        clean = model(*data).double()
        columns = []
        for index in range(len(data)):
            occluded = [torch.zeros_like(x) if j == index else x for j, x in enumerate(data)]
            columns.append((clean - model(*occluded).double()).abs().sum(1))
    return torch.stack(columns, 1)


def half_widths(values: Tensor, normalization: str = "ratio_of_sums") -> Tensor:
    """95% half-widths ``(M,)`` of the shares of the samples ``values`` ``(n, M)``, two-pass (no running sums).

    ``"ratio_of_sums"``: ``s = Σd / Σt``, ``u = d − s t``, half-width ``z · sd(u) / (√n · mean(t))``;
    ``"per_sample"``: ``r = d / t``, half-width ``z · sd(r) / √n``.
    """
    totals = values.sum(1, keepdim=True)
    if normalization == "per_sample":
        ratios = values / totals
        return Z_95 * ratios.std(0) / ratios.shape[0] ** 0.5
    shares = values.sum(0) / totals.sum()
    residuals = values - shares * totals
    return Z_95 * residuals.std(0) / residuals.shape[0] ** 0.5 / totals.mean()


def half_width_trajectories(
    values: Tensor, orders: Tensor, batch_size: int = BATCH_SIZE, normalization: str = "ratio_of_sums"
) -> Tensor:
    """``(R, B, M)``: the half-widths after each of the ``B`` batches of each of the ``R`` orders (vectorised).

    ``inf`` while fewer than ``MIN_SAMPLES`` samples were measured, as the library's rule.
    """
    ordered = values[orders]  # (R, N, M)
    totals = ordered.sum(-1, keepdim=True)
    ends = torch.arange(batch_size, values.shape[0] + batch_size, batch_size).clamp_max(values.shape[0])
    count = ends.double().view(1, -1, 1)
    if normalization == "per_sample":
        ratios = ordered / totals
        sum_r = ratios.cumsum(1)[:, ends - 1]
        sum_r2 = (ratios * ratios).cumsum(1)[:, ends - 1]
        variance = (sum_r2 - sum_r * sum_r / count) / (count - 1)
        result = Z_95 * (variance.clamp_min(0) / count).sqrt()
    else:
        sum_d = ordered.cumsum(1)[:, ends - 1]
        sum_d2 = (ordered * ordered).cumsum(1)[:, ends - 1]
        sum_dt = (ordered * totals).cumsum(1)[:, ends - 1]
        sum_t = totals.cumsum(1)[:, ends - 1]
        sum_t2 = (totals * totals).cumsum(1)[:, ends - 1]
        shares = sum_d / sum_t
        variance = (sum_d2 - 2 * shares * sum_dt + shares * shares * sum_t2) / (count - 1)
        result = Z_95 * (variance.clamp_min(0) / count).sqrt() / (sum_t / count)
    return torch.where(count < MIN_SAMPLES, torch.inf, result)


@dataclass
class CoverageReport:
    """What :func:`coverage` measured.

    Attributes:
        tolerance: The tolerance asked for.
        normalization: The share's normalization.
        full_shares: The shares of the whole data set (``tolerance=None``).
        shares: Per repetition, the early-stopped shares.
        half_widths: Per repetition, the library's ``result.share_half_width``.
        independent_half_widths: Per repetition, :func:`half_widths` of the samples that repetition measured.
        samples_used: Per repetition, ``result.num_samples``.
        first_converged_samples: Per repetition, the samples after the first batch whose hand-computed half-widths
            are all at most ``tolerance`` (where the rule should stop).
        covered: Repetitions whose every share lies within ``tolerance`` of the full-set share.
        covered_per_modality: The same, per modality.
        fixed_batches: The smallest fixed ``limit_batches`` whose half-widths are at most ``tolerance`` in every
            repetition.
        fixed_covered: Repetitions covered when each measures ``fixed_batches`` batches (no tolerance).
    """

    tolerance: float
    normalization: str
    full_shares: dict[str, float]
    shares: list[dict[str, float]]
    half_widths: list[dict[str, float]]
    independent_half_widths: list[list[float]]
    samples_used: list[int]
    first_converged_samples: list[int]
    covered: int
    covered_per_modality: dict[str, int]
    fixed_batches: int
    fixed_covered: int

    @property
    def repetitions(self) -> int:
        return len(self.samples_used)

    @property
    def mean_samples(self) -> float:
        return sum(self.samples_used) / len(self.samples_used)


def _covers(shares: dict[str, float], full: dict[str, float], tolerance: float) -> dict[str, bool]:
    return {name: abs(shares[name] - full[name]) <= tolerance for name in full}


@contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread inside, the previous count restored after.

    A tiny model gains nothing from more threads, and on a busy machine each of its thousands of small ops waits for a
    descheduled second thread: about 30 times slower, measured on 2 shared cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def coverage(
    repetitions: int = 100, tolerance: float = TOLERANCE, normalization: str = "ratio_of_sums"
) -> CoverageReport:
    """Measure the coverage of ``tolerance`` over ``repetitions`` seeded shuffles of the fixed data set."""
    with _one_thread():
        return _coverage(repetitions, tolerance, normalization)


def _coverage(repetitions: int, tolerance: float, normalization: str) -> CoverageReport:
    model, data = FrozenNet(), dataset()
    options = {"occlusion": "zeros", "normalization": normalization}
    full = modality_contribution(model, batches(data, torch.arange(NUM_SAMPLES)), MODALITIES, **options).shares
    orders = torch.stack([shuffled_order(seed) for seed in range(repetitions)])
    values = per_sample_values(model, data)
    trajectories = half_width_trajectories(values, orders, normalization=normalization)  # (R, B, M)
    converged = (trajectories <= tolerance).all(-1)  # (R, B)
    shares, widths, independent, used, first = [], [], [], [], []
    covered, per_modality = 0, dict.fromkeys(MODALITIES, 0)
    for order, reached in zip(orders, converged):
        result = modality_contribution(model, batches(data, order), MODALITIES, tolerance=tolerance, **options)
        assert result.share_half_width is not None  # tolerance is set
        shares.append(result.shares)
        widths.append(result.share_half_width)
        independent.append(half_widths(values[order[: result.num_samples]], normalization).tolist())
        used.append(result.num_samples)
        first.append(min(BATCH_SIZE * (int(reached.nonzero()[0]) + 1), NUM_SAMPLES) if reached.any() else -1)
        hits = _covers(result.shares, full, tolerance)
        covered += all(hits.values())
        for name, hit in hits.items():
            per_modality[name] += hit
    every_order = (trajectories <= tolerance).all(-1).all(0)  # (B,): reached in every repetition
    fixed_batches = int(every_order.nonzero()[0]) + 1
    fixed_covered = 0
    for order in orders:
        result = modality_contribution(model, batches(data, order), MODALITIES, limit_batches=fixed_batches, **options)
        fixed_covered += all(_covers(result.shares, full, tolerance).values())
    return CoverageReport(
        tolerance=tolerance,
        normalization=normalization,
        full_shares=full,
        shares=shares,
        half_widths=widths,
        independent_half_widths=independent,
        samples_used=used,
        first_converged_samples=first,
        covered=covered,
        covered_per_modality=per_modality,
        fixed_batches=fixed_batches,
        fixed_covered=fixed_covered,
    )


def describe(report: CoverageReport) -> str:
    """The lines :func:`main` prints for one report."""
    full = ", ".join(f"{name} {share:.4f}" for name, share in report.full_shares.items())
    per_modality = ", ".join(f"{name} {count}" for name, count in report.covered_per_modality.items())
    largest = max(max(widths.values()) for widths in report.half_widths)
    fixed_samples = min(report.fixed_batches * BATCH_SIZE, NUM_SAMPLES)
    return "\n".join(
        [
            f"normalization={report.normalization!r}, tolerance={report.tolerance}: full-set shares {full}",
            f"  tolerance: every share within {report.tolerance} of the full set in {report.covered} of "
            f"{report.repetitions} repetitions (per modality: {per_modality}); largest half-width {largest:.4f}",
            f"  tolerance: samples used mean {report.mean_samples:.1f}, min {min(report.samples_used)}, max "
            f"{max(report.samples_used)} of {NUM_SAMPLES}",
            f"  fixed limit_batches={report.fixed_batches} (the fewest with every half-width <= {report.tolerance} in "
            f"every repetition): covered in {report.fixed_covered} of {report.repetitions}; samples used mean "
            f"{fixed_samples:.1f}, min {fixed_samples}, max {fixed_samples}",
        ]
    )


def main() -> None:
    print(f"{NUM_SAMPLES} samples, batches of {BATCH_SIZE}, 100 seeded shuffles each")
    for normalization in ("ratio_of_sums", "per_sample"):
        print(describe(coverage(normalization=normalization)))


if __name__ == "__main__":
    main()
