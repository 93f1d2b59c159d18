"""The results of a measurement (contributions, Shapley values) and a monitor's history entry: plain numbers by name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypedDict

from torch import Tensor
from typing_extensions import NotRequired


class HistoryEntry(TypedDict):
    """What a monitor keeps of one check (``monitor.history[i]``): plain numbers, so it goes into a checkpoint as is.

    Read by :class:`~lightning_mc.CollapseEarlyStopping`, :class:`~lightning_mc.ModalityBalancer` and the dashboard.
    A dict at run time (``entry["shares"]``); the keys of the options are there only when the option is set.

    Attributes:
        epoch: The epoch of the validation run measured.
        global_step: The trainer's global step then.
        shares: ``name -> share``.
        raw: ``name -> raw value``.
        balance: Normalised entropy of the shares.
        num_samples: Samples measured.
        share_low: ``name -> lower bound`` of the share's interval (``ci``).
        share_high: ``name -> upper bound`` (``ci``).
        perf_clean: The performance metric on the clean outputs (``perf_metric``).
        perf_drop: ``name -> drop`` of the metric when the modality is occluded (``perf_metric``).
        share_half_width: ``name -> 95% half-width`` (``tolerance``).
        shapley: ``name -> Shapley value`` (``shapley``).
    """

    epoch: int
    global_step: int
    shares: dict[str, float]
    raw: dict[str, float]
    balance: float
    num_samples: int
    share_low: NotRequired[dict[str, float]]
    share_high: NotRequired[dict[str, float]]
    perf_clean: NotRequired[float | None]
    perf_drop: NotRequired[dict[str, float]]
    share_half_width: NotRequired[dict[str, float]]
    shapley: NotRequired[dict[str, float]]


def undefined_shares_cause(entry: Mapping[str, object]) -> str:
    """Why a check's shares are NaN, for messages: no finite output to measure, or no occlusion moved any output.

    The shares are NaN exactly when no sample was measured (every sample had a NaN or inf output, clean or occluded,
    and was skipped: ``num_samples`` counts the finite ones) or when none of the measured samples moved.

    Example:
        >>> undefined_shares_cause({"num_samples": 0})
        'the model gave NaN or inf outputs on every sample, so none was measured'
        >>> undefined_shares_cause({"num_samples": 12})
        'no occlusion moved any output'
    """
    if entry.get("num_samples") == 0:
        return "the model gave NaN or inf outputs on every sample, so none was measured"
    return "no occlusion moved any output"


@dataclass(frozen=True)
class ContributionResult:
    """Modality contributions measured on a set of samples.

    Attributes:
        shares: ``name -> share`` of each modality; the shares sum to 1, or are all NaN when no occlusion moved any
            output.
        raw: ``name -> 1ᵀdᵢ``, the mean over samples of the summed absolute output change when the modality is
            occluded (summed over its attributes).
        balance: Normalised entropy of the shares (1 = equal contributions, 0 = one modality does everything).
        attribute_raw: ``name -> {attribute -> raw value}``.
        attribute_shares: ``name -> {attribute -> share}``; a modality's attribute shares sum to its share.
        per_output_shares: ``name -> [share for each output]`` (ratio of sums per output; NaN for an output that
            no occlusion moved).
        num_samples: Number of samples measured.
        num_skipped: Number of samples skipped because an output was NaN or inf.
        normalization: How the shares were normalised.
        all_occluded_raw: ``v(all)``, the mean summed absolute output change with every modality occluded at once;
            measured only with ``check_redundancy=True`` (or ``shapley=True``), else ``None``.
        ci: Coverage of the share intervals (``ci=0.95``), or ``None`` when none were asked for.
        share_low: ``name -> lower bound`` of the share's percentile bootstrap interval (``ci`` set), else ``None``.
        share_high: ``name -> upper bound`` of that interval, else ``None``.
        shapley: Exact modality Shapley values and interactions (``shapley=True``), else ``None``.
        perf_clean: The label-aware metric on the clean outputs (``perf_metric`` set), else ``None``.
        perf_drop: ``name -> perf_clean − metric with the modality occluded`` (``perf_metric`` set), else ``None``.
            Label-aware, and separate from the label-free shares above.
        share_half_width: ``name -> 95% half-width`` of the share (delta method, ``tolerance`` set), else ``None``.
    """

    shares: dict[str, float]
    raw: dict[str, float]
    balance: float
    attribute_raw: dict[str, dict[str, float]]
    attribute_shares: dict[str, dict[str, float]]
    per_output_shares: dict[str, list[float]]
    num_samples: int
    num_skipped: int
    normalization: str
    all_occluded_raw: float | None = None
    ci: float | None = None
    share_low: dict[str, float] | None = None
    share_high: dict[str, float] | None = None
    shapley: ShapleyResult | None = None
    perf_clean: float | None = None
    perf_drop: dict[str, float] | None = None
    share_half_width: dict[str, float] | None = None

    @classmethod
    def from_values(
        cls, values: Mapping[str, Tensor], attribute_names: Mapping[str, tuple[str, ...]], normalization: str
    ) -> ContributionResult:
        """Build a result from :meth:`lightning_mc.ModalityContribution.compute`'s tensors."""
        names = list(attribute_names)
        attribute_raw = values["attribute_raw"].tolist()
        attribute_shares = values["attribute_shares"].tolist()
        per_output = values["per_output_shares"].tolist()
        raw_by_attribute: dict[str, dict[str, float]] = {}
        shares_by_attribute: dict[str, dict[str, float]] = {}
        position = 0
        for name, attributes in attribute_names.items():
            span = slice(position, position + len(attributes))
            raw_by_attribute[name] = dict(zip(attributes, attribute_raw[span]))
            shares_by_attribute[name] = dict(zip(attributes, attribute_shares[span]))
            position += len(attributes)
        return cls(
            shares=dict(zip(names, values["shares"].tolist())),
            raw=dict(zip(names, values["raw"].tolist())),
            balance=float(values["balance"]),
            attribute_raw=raw_by_attribute,
            attribute_shares=shares_by_attribute,
            per_output_shares=dict(zip(names, per_output)),
            num_samples=int(values["num_samples"]),
            num_skipped=int(values["num_skipped"]),
            normalization=normalization,
        )


@dataclass(frozen=True)
class ShapleyResult:
    """Exact modality Shapley values measured on a set of samples.

    Attributes:
        values: ``name -> φ``; they sum to ``v(all modalities)``.
        shares: ``name -> φ / Σ φ``; they sum to 1 (all NaN when no occlusion moved any output).
        interactions: ``(name_i, name_j) -> I_ij`` for each pair ``i < j`` in modality order; positive means
            redundant, negative synergistic, ~0 independent (see the module docstring).
        coalition_values: ``"a+b" -> v({a, b})`` for every non-empty coalition (names joined by ``+``).
        num_samples: Number of samples measured.
        num_skipped: Number of samples skipped because an output was NaN or inf.
    """

    values: dict[str, float]
    shares: dict[str, float]
    interactions: dict[tuple[str, str], float]
    coalition_values: dict[str, float]
    num_samples: int
    num_skipped: int = 0

    @classmethod
    def from_values(cls, values: dict[str, Tensor], modality_names: tuple[str, ...]) -> ShapleyResult:
        """Build a result from :meth:`ModalityShapley.compute`'s tensors."""
        names = list(modality_names)
        interactions = values["interactions"].tolist()
        # coalition k - 1 holds the set bits of k, as lightning_mc.analyses.shapley.coalitions orders them
        keys = ["+".join(n for i, n in enumerate(names) if k >> i & 1) for k in range(1, 2 ** len(names))]
        return cls(
            values=dict(zip(names, values["values"].tolist())),
            shares=dict(zip(names, values["shares"].tolist())),
            interactions={
                (names[i], names[j]): interactions[i][j] for i in range(len(names)) for j in range(i + 1, len(names))
            },
            coalition_values=dict(zip(keys, values["coalition_values"].tolist())),
            num_samples=int(values["num_samples"]),
            num_skipped=int(values["num_skipped"]),
        )
