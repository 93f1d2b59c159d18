"""The logged view of a result: scalar keys under a prefix, and the history entry a monitor keeps per check.

Example:
    >>> from lightning_mc.core.result import ContributionResult, HistoryEntry
    >>> result = ContributionResult(
    ...     shares={"image": 0.75, "table": 0.25}, raw={"image": 0.3, "table": 0.1}, balance=0.81,
    ...     attribute_raw={}, attribute_shares={}, per_output_shares={}, num_samples=8, num_skipped=0,
    ...     normalization="ratio_of_sums",
    ... )
    >>> for key, value in result_scalars(result, prefix="mc_external").items():
    ...     print(key, value)
    mc_external/share/image 0.75
    mc_external/share/table 0.25
    mc_external/raw/image 0.3
    mc_external/raw/table 0.1
    mc_external/balance 0.81
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_mc.core.result import ContributionResult, HistoryEntry

#: Modalities with at most this many attributes get one scalar per attribute (``<prefix>/attr/<modality>/<attr>``);
#: a model with at most this many outputs gets per-output shares logged (``per_output``).
MAX_LOGGED_ATTRIBUTES = 16


def result_scalars(
    result: ContributionResult, prefix: str = "mc", output_names: Sequence[str] | None = None
) -> dict[str, float]:
    """Every scalar a monitor logs for ``result``, keyed ``<prefix>/...``.

    Args:
        result: The measurement.
        prefix: First part of every key.
        output_names: Names of the model's outputs whose per-output shares are logged
            (``<prefix>/output_share/<output>/<m>``); ``None``: none.

    Returns:
        ``share/<m>``, ``raw/<m>``, ``balance``; ``attr/<m>/<a>`` for modalities with 2 to 16 attributes; and for
        what the result holds: ``all_occluded_raw``, ``share_low/<m>`` and ``share_high/<m>``, ``perf_clean`` and
        ``perf_drop/<m>``, ``num_samples`` (with ``tolerance``), ``shapley/<m>``, ``shapley_share/<m>`` and
        ``interaction/<a>/<b>``.
    """
    logged = {f"{prefix}/share/{name}": share for name, share in result.shares.items()}
    logged.update({f"{prefix}/raw/{name}": raw for name, raw in result.raw.items()})
    logged[f"{prefix}/balance"] = result.balance
    for name, attribute_shares in result.attribute_shares.items():
        if 1 < len(attribute_shares) <= MAX_LOGGED_ATTRIBUTES:
            logged.update({f"{prefix}/attr/{name}/{attr}": share for attr, share in attribute_shares.items()})
    if output_names is not None:
        logged.update(
            {
                f"{prefix}/output_share/{output}/{name}": shares[index]
                for name, shares in result.per_output_shares.items()
                for index, output in enumerate(output_names)
            }
        )
    if result.all_occluded_raw is not None:
        logged[f"{prefix}/all_occluded_raw"] = result.all_occluded_raw
    if result.share_low is not None and result.share_high is not None:
        logged.update({f"{prefix}/share_low/{name}": value for name, value in result.share_low.items()})
        logged.update({f"{prefix}/share_high/{name}": value for name, value in result.share_high.items()})
    if result.perf_clean is not None and result.perf_drop is not None:
        logged[f"{prefix}/perf_clean"] = result.perf_clean
        logged.update({f"{prefix}/perf_drop/{name}": value for name, value in result.perf_drop.items()})
    if result.share_half_width is not None:
        logged[f"{prefix}/num_samples"] = float(result.num_samples)
    if result.shapley is not None:
        shapley = result.shapley
        logged.update({f"{prefix}/shapley/{name}": value for name, value in shapley.values.items()})
        logged.update({f"{prefix}/shapley_share/{name}": share for name, share in shapley.shares.items()})
        logged.update({f"{prefix}/interaction/{a}/{b}": value for (a, b), value in shapley.interactions.items()})
    return logged


def history_entry(result: ContributionResult, epoch: int, global_step: int) -> HistoryEntry:
    """What a monitor's ``history`` keeps of one check: plain numbers, so it goes into a checkpoint as is.

    Example:
        >>> from lightning_mc.core.result import ContributionResult, HistoryEntry
        >>> shares, raw = {"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 0.0}
        >>> result = ContributionResult(shares, raw, 0.0, {}, {}, {}, 4, 0, "ratio_of_sums")
        >>> entry = history_entry(result, epoch=2, global_step=30)
        >>> entry["epoch"], entry["shares"], entry["num_samples"]
        (2, {'a': 1.0, 'b': 0.0}, 4)
    """
    entry: HistoryEntry = {
        "epoch": epoch,
        "global_step": global_step,
        "shares": dict(result.shares),
        "raw": dict(result.raw),
        "balance": result.balance,
        "num_samples": result.num_samples,
    }
    if result.share_low is not None:
        entry.update(share_low=dict(result.share_low), share_high=dict(result.share_high or {}))
    if result.perf_drop is not None:
        entry.update(perf_clean=result.perf_clean, perf_drop=dict(result.perf_drop))
    if result.share_half_width is not None:
        entry["share_half_width"] = dict(result.share_half_width)
    if result.shapley is not None:
        entry["shapley"] = dict(result.shapley.values)
    return entry
