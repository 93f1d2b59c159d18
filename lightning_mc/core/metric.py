"""The modality contribution metric of Gapp et al. (arXiv 2503.01904), as a torchmetrics ``Metric``.

This module is the only place the formula lives. For ``N`` samples with outputs ``p⁰ᵏ ∈ R^C`` and outputs
``p_{i,l}^k`` with attribute ``l`` of modality ``i`` occluded::

    d_{i,l}^k = |p⁰ᵏ − p_{i,l}^k|            (elementwise over the C outputs)
    d_i       = (1/N) Σ_k Σ_l d_{i,l}^k
    raw_i     = 1ᵀ d_i
    share_i   = raw_i / Σ_j raw_j             ("ratio_of_sums", Algorithm 1, the default)

and for attributes ``attribute_raw_{i,l} = 1ᵀ d_{i,l}``, ``attribute_share_{i,l} = share_i · attribute_raw_{i,l} /
raw_i``. The state is sums and counts only, so it reduces with a plain sum across batches and processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from lightning_mc.core.outputs import full_precision_dtype

Normalization = Literal["ratio_of_sums", "per_sample", "per_sample_output"]
NORMALIZATIONS: tuple[str, ...] = ("ratio_of_sums", "per_sample", "per_sample_output")


def absolute_differences(clean: Tensor, occluded: Tensor) -> Tensor:
    """``d_{i,l}^k``: the elementwise movement of the outputs under each occlusion.

    Args:
        clean: Outputs of the unoccluded batch, ``(N, C)``.
        occluded: Outputs with one attribute occluded at a time, ``(N, H, C)`` (``H`` attributes of all modalities).

    Returns:
        ``|clean − occluded|`` of shape ``(N, H, C)`` in float32, or float64 if either input is
        (:func:`~lightning_mc.core.outputs.full_precision_dtype`).
    """
    dtype = full_precision_dtype(clean.dtype, occluded.dtype)
    if clean.dtype != dtype or occluded.dtype != dtype:
        clean, occluded = clean.to(dtype), occluded.to(dtype)
    return (occluded - clean[:, None]).abs_()


def sum_per_modality(values: Tensor, attribute_counts: Sequence[int], dim: int) -> Tensor:
    """Sum ``values`` over the attributes of each modality along ``dim`` (``H`` entries → ``M`` entries)."""
    if all(count == 1 for count in attribute_counts):
        return values
    return torch.stack([part.sum(dim=dim) for part in values.split(list(attribute_counts), dim=dim)], dim=dim)


def per_sample_values(clean: Tensor, occluded: Mapping[str, Tensor]) -> Tensor:
    """``d`` ``(N, M)`` float64: each sample's summed absolute output change per modality (summed over attributes).

    Args:
        clean: ``(N, C)`` clean outputs.
        occluded: ``name -> (N, h_i, C)`` outputs with each attribute occluded, as from the engine.

    Samples with a NaN or inf output are dropped, as in :class:`ModalityContribution`.

    Example:
        >>> per_sample_values(torch.zeros(2, 1), {"a": torch.ones(2, 1, 1), "b": torch.zeros(2, 1, 1)}).tolist()
        [[1.0, 0.0], [1.0, 0.0]]
    """
    clean = clean.double()
    finite = torch.isfinite(clean).all(-1)
    columns = []
    for value in occluded.values():
        value = value.double()
        finite &= torch.isfinite(value).all(-1).all(-1)
        columns.append((clean.unsqueeze(1) - value).abs().sum(dim=(1, 2)))
    return torch.stack(columns, dim=1)[finite]


def share_balance(shares: Tensor) -> Tensor:
    """Normalised entropy of the shares: 1 when all modalities contribute equally, 0 when one does everything.

    NaN when the shares are undefined (NaN).

    Example:
        >>> share_balance(torch.tensor([0.5, 0.5]))
        tensor(1.)
        >>> share_balance(torch.tensor([1.0, 0.0]))
        tensor(0.)
    """
    # entr(s) = −s·log s, 0 at s = 0 (never −0) and NaN at NaN: undefined shares give a NaN balance
    return torch.special.entr(shares).sum() / math.log(shares.numel())


def check_normalization(normalization: str) -> None:
    """Raise a ``ValueError`` naming the valid choices if ``normalization`` is unknown."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r} is not one of {NORMALIZATIONS}.")


class ModalityContribution(Metric):
    r"""Accumulates how far a model's outputs move when each modality (or attribute) is occluded.

    ``update`` takes the clean outputs and the outputs under each occlusion; ``compute`` returns each modality's
    raw contribution ``1ᵀdᵢ`` (mean over samples of the summed absolute output change) and its share of the total.

    Three normalisations are available. ``"ratio_of_sums"`` (default) is Algorithm 1 of Gapp et al.:
    ``share_i = raw_i / Σ_j raw_j``. ``"per_sample"`` averages each sample's shares, and ``"per_sample_output"``
    averages the shares of each (sample, output) pair, as the paper's reference task scripts do; samples or pairs
    whose total movement is 0 carry no information and are skipped.

    Samples with a non-finite output (NaN/inf in the clean or any occluded output) are skipped and counted in
    ``num_skipped``, with a warning at ``compute``. When nothing moved at all the shares are undefined: they are
    NaN, with a warning, and the raw values (all 0) are still reported.

    Args:
        attributes: The modalities, as a sequence of names (each modality occluded as a whole), or a mapping
            ``name -> attribute names`` (one occlusion per attribute).
        num_outputs: ``C``, the number of model outputs; inferred from the first ``update`` when ``None``. In DDP
            every process must then see at least one batch.
        normalization: ``"ratio_of_sums"``, ``"per_sample"`` or ``"per_sample_output"``.
        kwargs: Passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).

    Raises:
        ValueError: If ``normalization`` is unknown, fewer than two modalities or a modality without attributes are
            given.

    Example:
        >>> metric = ModalityContribution(["image", "table"])
        >>> clean = torch.tensor([[0.8, 0.2]])
        >>> occluded = {"image": torch.tensor([[[0.4, 0.6]]]), "table": torch.tensor([[[0.7, 0.3]]])}
        >>> metric.update(clean, occluded)
        >>> values = metric.compute()
        >>> values["shares"]
        tensor([0.8000, 0.2000])
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    attribute_diff: Tensor
    sample_share_sum: Tensor
    informative_samples: Tensor
    output_share_sum: Tensor
    informative_pairs: Tensor
    num_samples: Tensor
    num_skipped: Tensor

    def __init__(
        self,
        attributes: Sequence[str] | Mapping[str, Sequence[str]],
        num_outputs: int | None = None,
        normalization: Normalization = "ratio_of_sums",
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(attributes, Mapping):
            self.attribute_names = {name: tuple(names) for name, names in attributes.items()}
        else:
            self.attribute_names = {name: ("all",) for name in attributes}
        self.modality_names = tuple(self.attribute_names)
        if len(self.modality_names) < 2:
            raise ValueError(f"attributes needs at least 2 modalities, got {list(self.modality_names)}.")
        empty = [name for name, names in self.attribute_names.items() if not names]
        if empty:
            raise ValueError(f"attributes: modalities {empty} have no attributes; give each at least one name.")
        check_normalization(normalization)
        if num_outputs is not None and (not isinstance(num_outputs, int) or num_outputs < 1):
            raise ValueError(f"num_outputs={num_outputs!r} must be a positive int or None (inferred).")
        self.normalization = normalization
        self.attribute_counts = tuple(len(names) for names in self.attribute_names.values())
        num_modalities, num_attributes = len(self.modality_names), sum(self.attribute_counts)

        self.add_state("attribute_diff", torch.zeros(num_attributes, num_outputs or 0), dist_reduce_fx="sum")
        self.add_state("num_samples", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("num_skipped", torch.tensor(0.0), dist_reduce_fx="sum")
        # the per-sample normalisations need their own sums; the default needs none (fewer states: cheaper reset/sync)
        if normalization == "per_sample":
            self.add_state("sample_share_sum", torch.zeros(num_modalities), dist_reduce_fx="sum")
            self.add_state("informative_samples", torch.tensor(0.0), dist_reduce_fx="sum")
        elif normalization == "per_sample_output":
            self.add_state("output_share_sum", torch.zeros(num_modalities), dist_reduce_fx="sum")
            self.add_state("informative_pairs", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, clean: Tensor, occluded: Mapping[str, Tensor]) -> None:
        """Accumulate one batch.

        Args:
            clean: Outputs of the unoccluded batch, ``(N, C)`` (already passed through the output activation).
            occluded: For each modality, the outputs with each of its attributes occluded, ``(N, h_i, C)``.

        Raises:
            ValueError: If modalities are missing or shapes do not match.
        """
        stacked = self._stack_occluded(clean, occluded)
        if self.attribute_diff.shape[1] == 0:
            self.attribute_diff = torch.zeros(
                sum(self.attribute_counts), clean.shape[1], device=self.device, dtype=self.attribute_diff.dtype
            )
        elif self.attribute_diff.shape[1] != clean.shape[1]:
            raise ValueError(
                f"clean has {clean.shape[1]} outputs but earlier batches had {self.attribute_diff.shape[1]}; the "
                "number of outputs must stay the same."
            )
        diffs = absolute_differences(clean, stacked)
        if diffs.dtype == torch.float64 and self.attribute_diff.dtype != torch.float64:
            self._sum_in_float64()
        if diffs.dtype != self.attribute_diff.dtype:
            diffs = diffs.to(self.attribute_diff.dtype)
        # a difference is finite exactly when both outputs are (inf − inf is NaN), so one pass finds the bad samples;
        # they contribute 0 (torch.where, not boolean indexing: no copy of the batch). On CPU reading the flag is
        # free and spares the per-sample test and the masking when every value is finite; on a GPU it would sync, so
        # mask there always. The states are added to in place (no Metric.__setattr__ per state per batch).
        every_finite = diffs.device.type == "cpu" and bool(diffs.isfinite().all())
        if every_finite:
            self.attribute_diff.add_(diffs.sum(dim=0))
            self.num_samples.add_(diffs.shape[0])
        else:
            finite = diffs.flatten(1).isfinite().all(dim=1)
            diffs = torch.where(finite[:, None, None], diffs, 0.0)
            self.attribute_diff.add_(diffs.sum(dim=0))
            num_finite = finite.sum()
            self.num_samples.add_(num_finite)
            self.num_skipped.add_(finite.shape[0] - num_finite)
        # only the chosen normalisation reads these states: the default skips the per-sample work entirely
        if self.normalization == "per_sample":
            self._update_sample_shares(diffs)
        elif self.normalization == "per_sample_output":
            self._update_output_shares(diffs)

    def reset(self) -> None:
        """Zero the sums: in place while they keep their defaults' shape and dtype, else as ``Metric.reset``.

        torchmetrics' ``Metric.reset`` builds a new tensor per state, which costs a measurement as much as a small
        model's forward call; every default here is zeros, so zeroing the tensors in place gives the same state.
        """
        states = [getattr(self, name) for name in self._defaults]
        inference = torch.is_inference_mode_enabled()
        if not all(
            state.shape == default.shape and state.dtype == default.dtype and (inference or not state.is_inference())
            for state, default in zip(states, self._defaults.values())
        ):
            super().reset()
            return
        for state in states:
            state.zero_()
        self._update_count = 0
        self._forward_cache = None
        self._computed = None
        self._cache = None
        self._is_synced = False

    def _sum_in_float64(self) -> None:
        """Keep float64 outputs' differences in float64 sums (a float32 sum would lose what float64 resolves).

        The states are created in the default dtype; a reset gives them back, and the next float64 batch promotes them
        again. Counts stay as they are.
        """
        for name in ("attribute_diff", "sample_share_sum", "output_share_sum"):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name).double())

    def _update_sample_shares(self, diffs: Tensor) -> None:
        sample_totals = sum_per_modality(diffs, self.attribute_counts, dim=1).sum(dim=2)  # (N, M)
        sample_denominator = sample_totals.sum(dim=1, keepdim=True)
        informative = sample_denominator > 0  # samples that moved at all; skipped ones (all 0) never are
        sample_shares = torch.where(informative, sample_totals / sample_denominator.clamp_min(1e-38), 0.0)
        self.sample_share_sum += sample_shares.sum(dim=0)
        self.informative_samples += informative.sum()

    def _update_output_shares(self, diffs: Tensor) -> None:
        per_modality = sum_per_modality(diffs, self.attribute_counts, dim=1)  # (N, M, C)
        pair_denominator = per_modality.sum(dim=1, keepdim=True)  # (N, 1, C)
        informative_pair = pair_denominator > 0
        pair_shares = torch.where(informative_pair, per_modality / pair_denominator.clamp_min(1e-38), 0.0)
        self.output_share_sum += pair_shares.sum(dim=(0, 2))
        self.informative_pairs += informative_pair.sum()

    def _stack_occluded(self, clean: Tensor, occluded: Mapping[str, Tensor]) -> Tensor:
        missing = [name for name in self.modality_names if name not in occluded]
        unknown = [name for name in occluded if name not in self.attribute_names]
        if missing or unknown:
            raise ValueError(
                f"occluded must have exactly the modalities {list(self.modality_names)}; missing {missing}, "
                f"unknown {unknown}."
            )
        if clean.ndim != 2:
            raise ValueError(f"clean must have shape (N, C), got {tuple(clean.shape)}.")
        for name, count in zip(self.modality_names, self.attribute_counts):
            expected = (clean.shape[0], count, clean.shape[1])
            if tuple(occluded[name].shape) != expected:
                raise ValueError(
                    f"occluded[{name!r}] has shape {tuple(occluded[name].shape)}, expected (N, attributes, C) = "
                    f"{expected}."
                )
        return torch.cat([occluded[name] for name in self.modality_names], dim=1)

    def compute(self) -> dict[str, Tensor]:
        """Derive raw values and shares from the accumulated sums.

        Returns:
            A dict of tensors: ``raw`` (M,), ``shares`` (M,), ``balance`` (scalar), ``attribute_raw`` (H,),
            ``attribute_shares`` (H,), ``per_output_shares`` (M, C), ``num_samples`` and ``num_skipped``
            (scalars). ``H`` runs over the attributes of all modalities in order.
        """
        num_samples, num_skipped = torch.stack([self.num_samples, self.num_skipped]).tolist()  # one host read
        if num_skipped > 0:
            rank_zero_warn(
                f"ModalityContribution skipped {int(num_skipped)} sample(s) whose model outputs were NaN or inf "
                f"(clean or occluded); the values use the {int(num_samples)} finite sample(s).",
                UserWarning,
            )
        if num_samples > 0:
            attribute_raw = self.attribute_diff.sum(dim=1) / num_samples
        else:
            attribute_raw = torch.full((self.attribute_diff.shape[0],), float("nan"), device=self.device)
        raw = sum_per_modality(attribute_raw, self.attribute_counts, dim=0)
        shares = self._shares(raw, num_samples)
        if all(count == 1 for count in self.attribute_counts):  # whole modalities: each attribute is its modality
            modality_raw, modality_shares = raw, shares
        else:  # each attribute next to its modality's values
            repeats = torch.tensor(self.attribute_counts, device=raw.device)
            modality_raw, modality_shares = raw.repeat_interleave(repeats), shares.repeat_interleave(repeats)
        within_modality = torch.where(attribute_raw == 0, 0.0, attribute_raw / modality_raw)
        attribute_shares = within_modality * modality_shares
        per_modality_output = sum_per_modality(self.attribute_diff, self.attribute_counts, dim=0)  # (M, C)
        per_output_shares = per_modality_output / per_modality_output.sum(dim=0, keepdim=True)
        return {
            "raw": raw,
            "shares": shares,
            "balance": share_balance(shares),
            "attribute_raw": attribute_raw,
            "attribute_shares": attribute_shares,
            "per_output_shares": per_output_shares,
            "num_samples": self.num_samples.clone(),
            "num_skipped": self.num_skipped.clone(),
        }

    def _shares(self, raw: Tensor, num_samples: float) -> Tensor:
        nan = torch.full_like(raw, float("nan"))
        if num_samples == 0:
            rank_zero_warn("ModalityContribution.compute() was called without any finite sample: shares are NaN.")
            return nan
        if self.normalization == "ratio_of_sums":
            numerator, denominator = raw, raw.sum()
        elif self.normalization == "per_sample":
            numerator, denominator = self.sample_share_sum, self.informative_samples
        else:
            numerator, denominator = self.output_share_sum, self.informative_pairs
        if denominator == 0:
            rank_zero_warn(
                "Occluding any single modality left every model output unchanged, so modality shares are undefined "
                f"(NaN); the raw values ({dict(zip(self.modality_names, raw.tolist()))}) are all 0. Either the "
                "model ignores its inputs or the modalities are redundant (each compensates for the other).",
                UserWarning,
            )
            return nan
        return numerator / denominator
