"""Are the bootstrap intervals calibrated? Coverage of the 95% share interval on a model with a known true share.

The model is ``2a + b`` on scalar inputs ``a, b ~ Exp(1)``. With a zero fill the output moves by ``2a`` when ``a`` is
occluded and by ``b`` when ``b`` is, so the true ratio-of-sums share of ``a`` is ``E[2a] / (E[2a] + E[b]) = 2/3``.
Each repetition draws 200 fresh samples (two batches), measures the share with ``ci=0.95`` and checks whether the
interval contains 2/3; a calibrated interval does so in about 95% of repetitions.

Run:  python examples/interval_coverage.py   (a few seconds on CPU)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_mc.functional import modality_contribution

TRUE_SHARE_A = 2 / 3
MODALITIES = {"a": 0, "b": 1}


class TwoAPlusB(nn.Module):
    """``2a + b``; with a zero fill, ``d_a = 2|a|`` and ``d_b = |b|``."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return 2 * a + b


def exponential_batches(seed: int, num_samples: int = 200) -> list[tuple[Tensor, Tensor]]:
    """``num_samples`` draws of ``(a, b) ~ Exp(1)²``, in two batches."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.empty(num_samples, 1).exponential_(generator=generator)
    b = torch.empty(num_samples, 1).exponential_(generator=generator)
    half = num_samples // 2
    return [(a[:half], b[:half]), (a[half:], b[half:])]


def covered_repetitions(repetitions: int = 100, ci: float = 0.95, n_boot: int = 400) -> int:
    """How many of ``repetitions`` seeded repetitions give an interval for the share of ``a`` that contains 2/3."""
    covered = 0
    for seed in range(repetitions):
        result = modality_contribution(
            TwoAPlusB(), exponential_batches(seed), MODALITIES, occlusion="zeros", ci=ci, n_boot=n_boot, seed=seed
        )
        assert result.share_low is not None and result.share_high is not None
        covered += result.share_low["a"] <= TRUE_SHARE_A <= result.share_high["a"]
    return covered


def main() -> None:
    repetitions = 100
    covered = covered_repetitions(repetitions)
    print(f"true share of a: {TRUE_SHARE_A:.4f}; 95% intervals from 200 samples, 400 bootstrap replicates each")
    print(f"the interval contained the true share in {covered} of {repetitions} seeded repetitions")


if __name__ == "__main__":
    main()
