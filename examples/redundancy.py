"""When shares mislead: two redundant modalities under one-at-a-time occlusion and under exact Shapley values.

A planted model scores a "scan" and a "report" that carry the same evidence (the report is the scan's findings plus
a little noise) and takes the max of the two branch scores, so either modality alone suffices. Occluding one of them
barely moves the output: one-at-a-time raw values are ~0 and the shares are a ratio of two tiny numbers. Occluding
both moves the output a lot. Exact modality Shapley values split that movement 50/50 and the pairwise interaction is
positive (redundant).

Run:  python examples/redundancy.py   (a few seconds on CPU)
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from lightning_mc.functional import modality_contribution, modality_shapley


class MaxOfTwoBranches(nn.Module):
    """``max(scan · w, report · w)``: either input alone gives (almost) the same score."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, num_features), requires_grad=False)

    def forward(self, scan: Tensor, report: Tensor) -> Tensor:
        return torch.maximum(scan @ self.weight, report @ self.weight).unsqueeze(1)


def make_batches(num_batches: int = 4, batch_size: int = 64, num_features: int = 8) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(num_batches):
        scan = torch.rand(batch_size, num_features, generator=generator)
        report = (scan + 0.02 * torch.randn(batch_size, num_features, generator=generator)).clamp(min=0)
        batches.append((scan, report))
    return batches


def main() -> None:
    model = MaxOfTwoBranches(8)
    batches = make_batches()
    modalities = {"scan": 0, "report": 1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        single = modality_contribution(
            model, batches, modalities, occlusion="zeros", check_redundancy=True, ci=0.95, n_boot=1000
        )
    shapley = modality_shapley(model, batches, modalities, occlusion="zeros")

    print(f"samples: {single.num_samples}, fill: zeros")
    print("one-at-a-time occlusion (modality_contribution):")
    for name in modalities:
        low, high = single.share_low[name], single.share_high[name]
        share = f"share = {single.shares[name]:.3f}  95% CI [{low:.3f}, {high:.3f}]"
        print(f"  {name:7s} raw = {single.raw[name]:.4f}   {share}")
    print(f"  all modalities occluded at once: v(all) = {single.all_occluded_raw:.4f}")
    for warning in caught:
        if "look redundant" in str(warning.message):
            print(f"  warning: {str(warning.message)[:150]}...")
    print("exact Shapley values (modality_shapley):")
    for coalition, value in shapley.coalition_values.items():
        print(f"  v({coalition}) = {value:.4f}")
    for name in modalities:
        print(f"  {name:7s} phi = {shapley.values[name]:.4f}   share = {shapley.shares[name]:.3f}")
    print(f"  sum of phi = {sum(shapley.values.values()):.4f} (= v(all))")
    interaction = shapley.interactions[("scan", "report")]
    print(f"  interaction I(scan, report) = {interaction:+.4f}  (positive: redundant, negative: synergistic)")


if __name__ == "__main__":
    main()
