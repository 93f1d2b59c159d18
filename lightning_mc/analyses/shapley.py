"""Exact modality Shapley values and pairwise interaction indices from coalition occlusion.

One-at-a-time occlusion (:class:`lightning_mc.ModalityContribution`) cannot tell "this modality is useless" from
"these modalities are redundant": if either of two modalities alone suffices, occluding one of them moves nothing and
both get a raw value of ~0. Here every coalition ``S`` of whole modalities is occluded at once and the cooperative
game::

    v(S) = mean over samples of Σ_c |p⁰_c − p^S_c|,   v(∅) = 0,

(``p⁰``: clean outputs, ``p^S``: outputs with every modality in ``S`` replaced by its fill) is solved exactly. With
``M`` modalities this costs ``2^M − 1`` occluded copies of each batch (plus the clean one), run batched by
:meth:`lightning_mc.core.engine.OcclusionEngine.run` (its ``coalitions``); ``M ≤ 6`` (63 copies).

Shapley value of modality ``i``::

    φ_i = Σ_{S ⊆ M∖{i}} |S|! (M − |S| − 1)! / M! · [v(S ∪ {i}) − v(S)],

so ``Σ_i φ_i = v(M)`` (efficiency) and the shares ``φ_i / Σ φ`` sum to 1. Pairwise Shapley interaction index::

    I_ij = Σ_{S ⊆ M∖{i,j}} |S|! (M − |S| − 2)! / (M − 1)! · [v(S ∪ {i,j}) − v(S ∪ {i}) − v(S ∪ {j}) + v(S)].

Sign convention (checked on the planted models in ``tests/test_shapley.py``): ``v`` measures how much the outputs
*move when modalities are removed*, not how much they are worth when present, so

* **redundancy** (either modality alone suffices) gives a **positive** interaction: occluding one moves nothing,
  occluding both moves everything, ``v({i,j}) > v({i}) + v({j})``;
* **synergy** (the modalities are only useful together, e.g. XOR) gives a **negative** interaction: occluding either
  one already destroys the joint signal, ``v({i,j}) < v({i}) + v({j})``;
* **independent additive** modalities give ``I_ij ≈ 0``.

(This is the opposite sign of the interaction of the "value when present" game ``w(S) = v(M) − v(M ∖ S)``.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_mc.analyses.options import MeasurementOptions
from lightning_mc.analyses.part import MetricAnalysis, Passes
from lightning_mc.core.result import ContributionResult, ShapleyResult

#: Most modalities for exact Shapley values: ``2^6 − 1 = 63`` occluded copies per batch.
MAX_SHAPLEY_MODALITIES = 6


def check_num_modalities(num_modalities: int) -> None:
    """Raise a ValueError unless ``1 ≤ num_modalities ≤ MAX_SHAPLEY_MODALITIES``."""
    if not 1 <= num_modalities <= MAX_SHAPLEY_MODALITIES:
        raise ValueError(
            f"Exact modality Shapley values need 1 to {MAX_SHAPLEY_MODALITIES} modalities (2^M - 1 occluded copies "
            f"per batch); got {num_modalities}. Group modalities together or use one-at-a-time "
            "lightning_mc.functional.modality_contribution."
        )


def coalitions(num_modalities: int) -> list[frozenset[int]]:
    """All non-empty coalitions of ``num_modalities`` modalities; coalition ``k − 1`` holds the set bits of ``k``.

    Example:
        >>> [sorted(c) for c in coalitions(2)]
        [[0], [1], [0, 1]]
    """
    check_num_modalities(num_modalities)
    return [frozenset(i for i in range(num_modalities) if mask >> i & 1) for mask in range(1, 2**num_modalities)]


def _game(coalition_values: Tensor) -> Tensor:
    """``v`` indexed by bitmask, ``v[0] = 0`` prepended to the ``2^M − 1`` non-empty coalition values."""
    values = coalition_values.double().flatten()
    num_modalities = round(math.log2(values.numel() + 1))
    if 2**num_modalities - 1 != values.numel():
        raise ValueError(f"Expected 2^M - 1 coalition values, got {values.numel()}.")
    check_num_modalities(num_modalities)
    return torch.cat([values.new_zeros(1), values])


def shapley_values(coalition_values: Tensor) -> Tensor:
    """Exact Shapley values ``φ`` ``(M,)`` from the ``2^M − 1`` coalition values (ordered as :func:`coalitions`).

    Example:
        >>> shapley_values(torch.tensor([0.0, 0.0, 1.0]))  # redundant pair: v({a}) = v({b}) = 0, v({a, b}) = 1
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    v = _game(coalition_values)
    num_modalities = int(math.log2(v.numel()))
    phi = v.new_zeros(num_modalities)
    for i in range(num_modalities):
        for mask in range(2**num_modalities):
            if mask >> i & 1:
                continue
            size = bin(mask).count("1")
            weight = math.factorial(size) * math.factorial(num_modalities - size - 1) / math.factorial(num_modalities)
            phi[i] += weight * (v[mask | 1 << i] - v[mask])
    return phi


def shapley_interactions(coalition_values: Tensor) -> Tensor:
    """Pairwise Shapley interaction indices ``I`` ``(M, M)``, symmetric, with a zero diagonal.

    Positive: redundant (occluding both moves the outputs more than occluding each); negative: synergistic.

    Example:
        >>> shapley_interactions(torch.tensor([0.0, 0.0, 1.0]))
        tensor([[0., 1.],
                [1., 0.]], dtype=torch.float64)
    """
    v = _game(coalition_values)
    num_modalities = int(math.log2(v.numel()))
    interactions = v.new_zeros(num_modalities, num_modalities)
    for i in range(num_modalities):
        for j in range(i + 1, num_modalities):
            total = v.new_zeros(())
            for mask in range(2**num_modalities):
                if mask >> i & 1 or mask >> j & 1:
                    continue
                size = bin(mask).count("1")
                weight = (
                    math.factorial(size)
                    * math.factorial(num_modalities - size - 2)
                    / math.factorial(num_modalities - 1)
                )
                total += weight * (v[mask | 1 << i | 1 << j] - v[mask | 1 << i] - v[mask | 1 << j] + v[mask])
            interactions[i, j] = interactions[j, i] = total
    return interactions


def shapley_shares(values: Tensor) -> Tensor:
    """``φ_i / Σ φ`` (all NaN when ``Σ φ = v(M) = 0``, i.e. no occlusion moved any output)."""
    total = values.sum()
    if total == 0:
        return torch.full_like(values, float("nan"))
    return values / total


class ModalityShapley(Metric):
    """Accumulates coalition values ``v(S)`` over batches; computes exact Shapley values and interactions.

    The states are sums (``dist_reduce_fx="sum"``), so the metric is exact under DDP: the per-coalition sums of
    ``Σ_c |p⁰ − p^S|`` and the sample count are all-reduced before :meth:`compute`.

    Args:
        modality_names: Names of the ``M`` modalities (``1 ≤ M ≤ 6``), in the engine's order.

    Example:
        >>> metric = ModalityShapley(["a", "b"])
        >>> clean = torch.ones(4, 1)
        >>> occluded = torch.tensor([1.0, 1.0, 0.0]).reshape(1, 3, 1).expand(4, 3, 1)  # v = (0, 0, 1)
        >>> metric.update(clean, occluded)
        >>> metric.compute()["values"]
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, modality_names: Iterable[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.modality_names = tuple(modality_names)
        check_num_modalities(len(self.modality_names))
        self.num_coalitions = 2 ** len(self.modality_names) - 1
        self.add_state(
            "coalition_sums", default=torch.zeros(self.num_coalitions, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("num_samples", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_skipped", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, clean: Tensor, occluded: Tensor) -> None:
        """Add a batch: ``clean`` ``(N, C)`` and ``occluded`` ``(N, 2^M − 1, C)`` (in :func:`coalitions` order).

        Samples with a NaN or inf output are skipped and counted in ``num_skipped``.
        """
        if occluded.ndim != 3 or occluded.shape[1] != self.num_coalitions or occluded.shape[0] != clean.shape[0]:
            raise ValueError(
                f"occluded has shape {tuple(occluded.shape)}; expected ({clean.shape[0]}, {self.num_coalitions}, C)."
            )
        clean, occluded = clean.double(), occluded.double()
        finite = torch.isfinite(clean).all(-1) & torch.isfinite(occluded).all(-1).all(-1)
        moves = (clean[finite].unsqueeze(1) - occluded[finite]).abs().sum(-1)
        self.coalition_sums += moves.sum(0)
        self.num_samples += finite.sum()
        self.num_skipped += (~finite).sum()

    def compute(self) -> dict[str, Tensor]:
        """``coalition_values`` ``(2^M − 1,)``, ``values`` ``(M,)``, ``shares``, ``interactions`` ``(M, M)``."""
        count = self.num_samples.double()
        coalition_values = (
            self.coalition_sums / count if count > 0 else torch.full_like(self.coalition_sums, float("nan"))
        )
        values = shapley_values(coalition_values)
        return {
            "coalition_values": coalition_values,
            "values": values,
            "shares": shapley_shares(values),
            "interactions": shapley_interactions(coalition_values),
            "num_samples": self.num_samples,
            "num_skipped": self.num_skipped,
        }


#: The redundancy warning fires when the one-at-a-time raw values sum to less than this fraction of ``v(all)``.
REDUNDANCY_RATIO = 0.25


class AllOccludedMovement(Metric):
    """``v(all)``: the mean over samples of ``Σ_c |p⁰ − p^M|`` with every modality occluded at once.

    Sum states (``dist_reduce_fx="sum"``), so it is exact under DDP. Used by the redundancy check of
    :func:`lightning_mc.functional.modality_contribution` and the monitor (``check_redundancy=True``).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, clean: Tensor, all_occluded: Tensor) -> None:
        """Add a batch: ``clean`` and ``all_occluded`` ``(N, C)``; samples with a NaN or inf output are skipped."""
        clean, all_occluded = clean.double().reshape(clean.shape[0], -1), all_occluded.double()
        all_occluded = all_occluded.reshape(clean.shape)
        finite = torch.isfinite(clean).all(-1) & torch.isfinite(all_occluded).all(-1)
        self.total += (clean[finite] - all_occluded[finite]).abs().sum()
        self.count += finite.sum()

    def compute(self) -> Tensor:
        """``v(all)`` (NaN without a finite sample)."""
        return self.total / self.count if self.count > 0 else torch.full_like(self.total, float("nan"))


def redundancy_message(raw: dict[str, float], all_occluded: float, ratio: float = REDUNDANCY_RATIO) -> str | None:
    """The redundancy warning, or ``None``.

    Fires when ``v(all) > 0`` and the one-at-a-time raw values sum to less than ``ratio · v(all)``: occluding
    modalities one at a time barely moves the outputs but occluding all of them moves them a lot, so each modality's
    evidence is also carried by another one and the shares (ratios of near-zero numbers) are not meaningful. For
    independent additive modalities the raw values sum to ``v(all)``; with synergy they sum to more.
    """
    total = sum(raw.values())
    if not all_occluded > 0 or not math.isfinite(all_occluded) or total >= ratio * all_occluded:
        return None
    return (
        f"The modalities look redundant: occluding them one at a time moves the outputs by {total:.4g} in all "
        f"(raw values {', '.join(f'{k}={v:.3g}' for k, v in raw.items())}), but occluding all of them at once moves "
        f"them by {all_occluded:.4g}. Each modality's evidence is also carried by another, so the one-at-a-time "
        "shares are not meaningful. Use lightning_mc.functional.modality_shapley for exact Shapley values and "
        "pairwise interactions (positive = redundant)."
    )


class ShapleyAnalysis(MetricAnalysis):
    """The ``shapley`` option: every coalition's movement summed; writes the Shapley values and ``v(all)``.

    Args:
        modality_names: The measured modalities, in order (at most 6).
    """

    def __init__(self, modality_names: tuple[str, ...]) -> None:
        self.modality_names = modality_names
        self.metric = ModalityShapley(modality_names)

    @classmethod
    def from_options(cls, options: MeasurementOptions, modality_names: tuple[str, ...]) -> ShapleyAnalysis | None:
        """Built when ``shapley`` is set (checks that there are at most 6 modalities)."""
        if not options.shapley:
            return None
        check_num_modalities(len(modality_names))
        return cls(modality_names)

    def coalitions(self) -> tuple[frozenset[int], ...]:
        """Every non-empty coalition, in :func:`coalitions` order."""
        return tuple(coalitions(len(self.modality_names)))

    def update(self, passes: Passes) -> None:
        """Adds every coalition's movement."""
        values = torch.stack([passes.coalition(members) for members in self.coalitions()], dim=1)
        self.metric.update(passes.outputs.clean, values)

    def write(self, result: ContributionResult) -> ContributionResult:
        """Fills ``shapley`` and ``all_occluded_raw`` (``v`` of the coalition of every modality)."""
        shapley = ShapleyResult.from_values(self.metric.compute(), self.modality_names)
        v_all = shapley.coalition_values["+".join(self.modality_names)]
        return dataclasses.replace(result, shapley=shapley, all_occluded_raw=v_all)


__all__ = [
    "AllOccludedMovement",
    "ModalityShapley",
    "ShapleyAnalysis",
    "ShapleyResult",
    "coalitions",
    "redundancy_message",
    "shapley_interactions",
    "shapley_shares",
    "shapley_values",
]
