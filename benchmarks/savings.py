"""P6 and P7: the two ways below the floor of P1, ``reuse_outputs`` and ``tolerance``.

P6 times a check whose clean outputs come from the validation step (``ContributionMeasurement.update(model, batch,
clean=logits)``, what ``ModalityContributionMonitor(reuse_outputs=True)`` runs) against its own floor, the occluded
copies' forward calls alone, and against today's default check, which runs the clean copy too.

P7 times ``modality_contribution(..., tolerance=0.02)``, which stops adding batches once every share's 95%
half-width is at most 0.02, against a fixed ``limit_batches``: the smallest one that reaches the same half-width on
the same data (found by adding the batches one at a time), and the one fixed limit that suits both models.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from benchmarks.models import GatedImageTableNet, image_table_batches, image_table_modalities, seeded
from benchmarks.peers import Batch, Floor, Monitor, clean_predictions, max_abs_difference, shares
from benchmarks.suites import SHARE_TOLERANCE, Config, Row, Table, _p1_cases
from benchmarks.timing import Stat, interleaved, ratio
from lightning_mc import ContributionMeasurement
from lightning_mc.core.modality import Modality
from lightning_mc.functional import modality_contribution

#: The precision P7 asks for: every share's 95% half-width at most this (``--quick``: 0.05, on less data).
TOLERANCE, QUICK_TOLERANCE = 0.02, 0.05
#: P7's models: the gate sharpness of :class:`~benchmarks.models.GatedImageTableNet` (0: low noise, 10: high).
P7_MODELS = (("low noise (gate sharpness 0)", 0.0), ("high noise (gate sharpness 10)", 10.0))


# ---------------------------------------------------------------------------------------------------------- P6


def _masks(modalities: list[Modality], batch: Batch) -> int:
    return sum(m.attribute_masks(m.select(batch)).masks.shape[0] for m in modalities)


def _occluded_floor_mismatch(
    monitor: Monitor, model: torch.nn.Module, batch: Batch, clean: torch.Tensor, floor: Floor
) -> float:
    """Largest difference between the engine's occluded outputs (clean given) and the occluded floor's."""
    outputs = monitor.engine.run(model, batch, clean)
    engine_rows = torch.cat([o.transpose(0, 1) for o in outputs.occluded.values()])
    with torch.inference_mode():
        floor_rows = torch.cat([model(*chunk) for chunk in floor.chunks[0]]).float().softmax(-1)
    difference = (engine_rows.reshape(floor_rows.shape) - floor_rows).abs().max().item()
    if difference > 1e-4:
        raise AssertionError(f"the occluded floor does not compute what the engine does (max |Δ| = {difference:.2e})")
    return difference


def p6_reuse(config: Config) -> tuple[list[Row], Table]:
    """A check with the clean outputs given ÷ its occluded forward calls alone, and ÷ today's default check."""
    rows, details = [], []
    for name, build, batches, modalities in _p1_cases(config):
        model = seeded(build()).to(config.device)
        cleans = clean_predictions(model, batches, modalities)  # the validation step ran these already
        reuse, default = Monitor(modalities), Monitor(modalities)
        floor = Floor(model, batches, modalities, max_batch_size=None)
        occluded_floor = Floor(model, batches, modalities, max_batch_size=None, include_clean=False)
        mismatch = _occluded_floor_mismatch(reuse, model, batches[0], cleans[0], occluded_floor)
        share_difference = max_abs_difference(shares(reuse(model, batches, cleans)), shares(default(model, batches)))
        times = interleaved(
            {
                "reuse": partial(reuse, model, batches, cleans),
                "default": partial(default, model, batches),
                "occluded floor": occluded_floor,
                "floor": floor,
            },
            config.repeats,
            config.device,
            inner=config.inner,
        )
        value = ratio(times["reuse"], times["occluded floor"])
        saving = ratio(times["reuse"], times["default"])
        # the clean copy's part of the forward work: what the floor loses when the clean rows leave it
        clean_part = Stat.of([1 - occluded / whole for occluded, whole in zip(times["occluded floor"], times["floor"])])
        masks = _masks(modalities, batches[0])
        expected = 1 / (1 + masks)
        met = value.median <= 1.10 and share_difference <= SHARE_TOLERANCE
        rows.append(
            Row(
                "P6",
                name,
                "reuse ÷ occluded floor",
                value,
                "≤ 1.10",
                met,
                note=(
                    f"reuse ÷ default {saving.format()}; the clean pass was {clean_part.median:.0%} of the forward "
                    f"time (1/(1+H) = {expected:.0%}); max |Δshare| vs default {share_difference:.1e}"
                ),
                extra={
                    "masks": masks,
                    "reuse_over_default": saving.as_dict(),
                    "clean_part_of_forward": clean_part.as_dict(),
                    "clean_part_expected": expected,
                    "shares_max_abs_diff": share_difference,
                    "outputs_max_abs_diff": mismatch,
                    "occluded_floor_seconds": Stat.of(times["occluded floor"]).as_dict(),
                    "reuse_seconds": Stat.of(times["reuse"]).as_dict(),
                },
            )
        )
        details.append(
            [
                name,
                f"{1 + masks} → {masks}",
                f"{Stat.of(times['default']).median * 1e3:.1f}",
                f"{Stat.of(times['reuse']).median * 1e3:.1f}",
                f"{Stat.of(times['occluded floor']).median * 1e3:.1f}",
                value.format(),
                saving.format(),
                f"{clean_part.format(2)} ({expected:.2f})",
            ]
        )
    table = Table(
        "P6 reuse_outputs: a check with the validation step's clean outputs vs today's default (ms per check)",
        [
            "case",
            "copies per sample",
            "default (ms)",
            "reuse (ms)",
            "occluded floor (ms)",
            "reuse ÷ occluded floor",
            "reuse ÷ default",
            "clean part of the forward time (1/(1+H))",
        ],
        details,
        note=(
            "The saving of reuse_outputs is the clean copy's part of the forward work, at most 1/(1+H) of it (H masks "
            "in all): a third for two whole modalities, little once modalities are cut into many attributes."
        ),
    )
    return rows, table


# ---------------------------------------------------------------------------------------------------------- P7


def batches_to_reach(
    model: torch.nn.Module, batches: list[Batch], modalities: list[Modality], tolerance: float
) -> tuple[int, float]:
    """The smallest number of leading batches whose shares' 95% half-widths are all ≤ ``tolerance``, and that width.

    Batches are added one at a time, so this is the smallest fixed ``limit_batches`` that reaches the precision.

    Raises:
        AssertionError: If all of ``batches`` do not reach it.
    """
    measurement = ContributionMeasurement(modalities, output_transform="softmax", tolerance=tolerance)
    for count, batch in enumerate(batches, start=1):
        measurement.update(model, batch)
        if measurement.converged:
            half_width = measurement.compute().share_half_width
            assert half_width is not None  # tolerance asks for it
            return count, max(half_width.values())
    raise AssertionError(f"{len(batches)} batches do not reach a half-width of {tolerance}; give P7 more data")


def p7_tolerance(config: Config) -> tuple[list[Row], Table]:
    """``tolerance=0.02`` ÷ the smallest fixed ``limit_batches`` with the same half-width, on two models.

    The data (64 batches of 64 16×16 images and tables; ``--quick``: 20 batches of 32 8×8 images, tolerance 0.05)
    hold enough samples for the high-noise model to reach the tolerance.
    """
    device = config.device
    tolerance = QUICK_TOLERANCE if config.quick else TOLERANCE
    size, num_batches, image_size = (32, 20, 8) if config.quick else (64, 64, 16)
    batches = image_table_batches(num_batches, size, 1, image_size, device=device)
    modalities = image_table_modalities(1)
    models = {label: seeded(GatedImageTableNet(sharpness, image_size)).to(device) for label, sharpness in P7_MODELS}
    needed = {label: batches_to_reach(model, batches, modalities, tolerance) for label, model in models.items()}
    one_limit = max(count for count, _ in needed.values())  # the one fixed limit_batches that suits both models
    measure: Any = partial(modality_contribution, data=batches, modalities=modalities, output_transform="softmax")
    rows, details = [], []
    for label, model in models.items():
        count, half_width = needed[label]
        result = measure(model, tolerance=tolerance)
        if result.num_samples != count * size:
            raise AssertionError(
                f"tolerance={tolerance} used {result.num_samples} samples, but {count} batches of {size} are "
                "the first to reach it"
            )
        runs = {
            "tolerance": partial(measure, model, tolerance=tolerance),
            "fixed": partial(measure, model, limit_batches=count),
        }
        if one_limit != count:
            runs["one limit"] = partial(measure, model, limit_batches=one_limit)
        times = interleaved(runs, config.repeats, device, inner=config.inner)
        value = ratio(times["tolerance"], times["fixed"])
        against_one = ratio(times["tolerance"], times["one limit"]) if "one limit" in times else Stat.of([1.0])
        seconds = {name: Stat.of(values).median for name, values in times.items()}
        rows.append(
            Row(
                "P7",
                f"{label}: {count * size} samples to ±{tolerance}",
                "tolerance ÷ fixed limit_batches",
                value,
                "≤ 1.05 (ours)",
                value.median <= 1.05,
                note=(
                    f"fixed limit_batches={count} reaches ±{half_width:.4f}; tolerance "
                    f"{seconds['tolerance'] * 1e3:.1f} ms, fixed {seconds['fixed'] * 1e3:.1f} ms; ÷ one limit for "
                    "both models (limit_batches="
                    f"{one_limit}) {against_one.format()}"
                ),
                extra={
                    "tolerance": tolerance,
                    "batch_size": size,
                    "samples": count * size,
                    "limit_batches": count,
                    "half_width": half_width,
                    "one_limit_batches": one_limit,
                    "tolerance_over_one_limit": against_one.as_dict(),
                    "seconds": seconds,
                },
            )
        )
        details.append(
            [
                label,
                f"{count * size} ({count} batches)",
                f"{half_width:.4f}",
                f"{seconds['tolerance'] * 1e3:.1f}",
                f"{seconds['fixed'] * 1e3:.1f}",
                value.format(),
                f"{one_limit * size}",
                against_one.format(),
            ]
        )
    table = Table(
        f"P7 tolerance={tolerance} vs a fixed limit_batches (GatedImageTableNet {image_size}×{image_size} + 32 "
        f"cols, M=2 whole, batches of {size})",
        [
            "model",
            "samples used with tolerance",
            "half-width reached",
            "tolerance (ms)",
            "smallest fixed limit reaching it (ms)",
            "tolerance ÷ fixed",
            "one fixed limit for both (samples)",
            "tolerance ÷ one fixed limit",
        ],
        details,
        note=(
            "The samples a precision needs depend on how much the per-sample shares vary: a fixed limit_batches that "
            "is enough for the high-noise model measures the low-noise one many times over; tolerance stops each at "
            "its own count, for the cost of a half-width check per batch (tolerance ÷ fixed)."
        ),
    )
    return rows, table
