"""P10: where medical users are: small 3-D validation sets, and small models (``encoders=`` never dearer than without).

Each measurement is what the monitor runs per check (``reset``, ``update`` per batch, ``compute``) on a
:class:`~lightning_mc.ContributionMeasurement` that has measured before in the same fit: the safety check of
``encoders=`` runs once per fit, on its first measurement, so the later ones are what a fit pays per check. The note
gives the first measurement of a fit too (the check, and the timing of one batch's clean pass and copies).

- A 3-D CNN (3 conv layers of 16 channels) on 24³ volumes and an MLP for 10 table columns, batches of 8, for 24,
  96 and 384 validation samples: a measurement ÷ a plain validation pass over the same samples, whole modalities and
  the table column by column, zeros fill, with and without ``encoders``; a measurement with ``encoders`` ÷ its hand
  floor (:mod:`benchmarks.hand_floor`: the same shares in plain torch, each encoder run only where a copy changes its
  input; checked equal to the library's within :data:`~benchmarks.suites.SHARE_TOLERANCE`); and the bytes one batch's
  copies allocate with the CT rows of the table copies and the CT copy's zeros rows not built (one expanded row each)
  ÷ built.
- A tiny late-fusion MLP (2 modalities of 32 features, 4 batches of 64): a measurement with ``encoders`` ÷ one
  without (the cache's own work exceeds what it saves there: the plain path is chosen from one batch's
  timing), and a measurement without ÷ its floor (the forward passes alone, 1 clean + 1 per modality).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from benchmarks.encoders import VolumeTableNet
from benchmarks.hand_floor import HandFloor
from benchmarks.peers import Floor
from benchmarks.suites import SHARE_TOLERANCE, Config, Row, Table, peak_bytes
from benchmarks.timing import Stat, interleaved, ratio
from lightning_mc import ContributionMeasurement, Modality
from lightning_mc.masks import Columns

SIDE, CHANNELS, COLUMNS, BATCH = 24, 16, 10, 8
SIZES = (24, 96, 384)
#: Targets of a measurement with encoders ÷ a plain validation pass, from the smallest size on.
TARGETS = {"whole, zeros": 1.2, "table per column, zeros": 1.3}
TINY_TARGET, FLOOR_TARGET = 1.0, 1.15
#: Target of a measurement with encoders ÷ its hand floor (issue 36: the library within 15 % of it).
HAND_FLOOR_TARGET = 1.15


def _volume_batches(samples: int, device: torch.device) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "ct": torch.randn(BATCH, 1, SIDE, SIDE, SIDE, generator=generator).to(device),
            "table": torch.randn(BATCH, COLUMNS, generator=generator).to(device),
        }
        for _ in range(samples // BATCH)
    ]


def _volume_forward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(batch["ct"], batch["table"])


def measure(measurement: ContributionMeasurement, model: nn.Module, batches: list[Any], first: bool = False) -> None:
    """One check as the monitor runs it; ``first``: the first of a fit (the safety check and the path timing)."""
    if first:
        measurement.check_encoders_again()
    measurement.reset()
    for batch in batches:
        measurement.update(model, batch)
    measurement.compute()


def hand_floor_gap(
    measurement: ContributionMeasurement, model: nn.Module, batches: list[Any], floor: HandFloor
) -> float:
    """The largest difference between the library's shares (and per-column shares) and the hand floor's."""
    measurement.reset()
    for batch in batches:
        measurement.update(model, batch)
    result = measurement.compute()
    hand = floor.shares()
    gaps = [abs(result.shares[name] - hand[name]) for name in hand]
    if floor.per_column:  # the table's attribute shares, in column order
        gaps += [abs(a - b) for a, b in zip(result.attribute_shares["table"].values(), floor.column_shares())]
    return max(gaps)


def _plain_pass(forward: Callable[..., Any], model: nn.Module, batches: list[Any]) -> None:
    with torch.inference_mode():
        for batch in batches:
            forward(model, batch)


def p10_small_sets(config: Config) -> tuple[list[Row], Table]:
    """A measurement ÷ a plain validation pass on small 3-D validation sets, with and without ``encoders``."""
    sizes = (8, 16) if config.quick else SIZES
    torch.manual_seed(0)
    model = VolumeTableNet(channels=CHANNELS, columns=COLUMNS).to(config.device).eval()
    encoders = {"ct": "ct", "table": "table"}
    rows, details = [], []
    for case, per_column in (("whole, zeros", False), ("table per column, zeros", True)):
        modalities = [
            Modality("ct", key="ct", occlusion="zeros"),
            Modality("table", key="table", occlusion="zeros", attributes=Columns() if per_column else None),
        ]
        options = {"forward_fn": _volume_forward, "output_transform": "softmax"}
        plain = ContributionMeasurement(modalities, **options)
        cached = ContributionMeasurement(modalities, encoders=encoders, **options)
        # the first of a fit has its own measurement: its check_encoders_again() restarts the encoder cache's check
        # and path choice, which on a shared measurement the "with" row would pay in the rounds that follow it
        first_of_fit = ContributionMeasurement(modalities, encoders=encoders, **options)
        for samples in sizes:
            batches = _volume_batches(samples, config.device)
            measure(cached, model, batches, first=True)  # the fit's first measurement: the check, the path timing
            floor = HandFloor(model, batches, per_column)
            gap = hand_floor_gap(cached, model, batches, floor)
            print(f"  P10 {case}, {samples} samples: hand floor's shares vs the library's: max gap {gap:.1e}")
            assert gap <= SHARE_TOLERANCE, f"the hand floor's shares differ from the library's by {gap:.1e}"
            repeats = max(3, config.repeats // (2 if samples > 100 else 1))
            times = interleaved(
                {
                    "plain pass": partial(_plain_pass, _volume_forward, model, batches),
                    "without": partial(measure, plain, model, batches),
                    "with": partial(measure, cached, model, batches),
                    "with, first of a fit": partial(measure, first_of_fit, model, batches, first=True),
                    "hand floor": floor,
                },
                repeats,
                config.device,
                inner=1 if samples > 100 else config.inner,
            )
            with_ = ratio(times["with"], times["plain pass"])
            without = ratio(times["without"], times["plain pass"])
            first = ratio(times["with, first of a fit"], times["plain pass"])
            over_floor = ratio(times["with"], times["hand floor"])
            floor_cost = ratio(times["hand floor"], times["plain pass"])
            target = TARGETS[case]
            rows.append(
                Row(
                    "P10",
                    f"3-D CNN 24³ + 10 columns, {case}, {samples} samples",
                    "measurement with encoders ÷ plain validation pass",
                    with_,
                    f"≤ {target}",
                    with_.median <= target,
                    note=f"without encoders {without.format()}; first of a fit (the check) {first.format()}",
                    extra={"without_over_plain": without.as_dict(), "first_over_plain": first.as_dict()},
                )
            )
            rows.append(
                Row(
                    "P10",
                    f"3-D CNN 24³ + 10 columns, {case}, {samples} samples",
                    "measurement with encoders ÷ hand floor",
                    over_floor,
                    f"≤ {HAND_FLOOR_TARGET}",
                    over_floor.median <= HAND_FLOOR_TARGET,
                    note=(
                        f"hand floor ÷ plain validation pass {floor_cost.format()}; the hand floor's shares equal the "
                        f"library's within {gap:.1e}"
                    ),
                    extra={"hand_floor_over_plain": floor_cost.as_dict(), "shares_max_abs_diff": gap},
                )
            )
            details.append(
                [
                    case,
                    f"{samples}",
                    with_.format(),
                    without.format(),
                    first.format(),
                    over_floor.format(),
                    floor_cost.format(),
                ]
            )
    rows.append(_replayed_memory(config, model, cached))
    table = Table(
        f"P10 small 3-D validation sets: a measurement ÷ a plain validation pass (3-D CNN of {CHANNELS} channels on "
        f"{SIDE}³ + MLP on "
        f"{COLUMNS} columns, batches of {BATCH}, {torch.get_num_threads()} threads)",
        [
            "case",
            "samples",
            "with encoders",
            "without encoders",
            "with encoders, first of a fit",
            "with encoders ÷ hand floor",
            "hand floor",
        ],
        details,
        note=(
            "The safety check of encoders= runs on the first measurement of a fit (one row of each copy through both "
            "paths); later measurements replay the CT encoder for every table copy without building the CT rows. "
            "The hand floor (benchmarks/hand_floor.py) is the same measurement in plain torch: the clean pass keeping "
            "both encodings, the CT encoder on a zeros volume once per measurement, the table encoder on the occluded "
            "rows only, one head call for all copies; its column is hand floor ÷ plain validation pass."
        ),
    )
    return [*rows, *tiny_mlp(config)], table


def _replayed_memory(config: Config, model: nn.Module, cached: ContributionMeasurement) -> Row:
    """Bytes one batch's copies (table per column) allocate with the CT rows of the copies not built ÷ built."""
    batch = _volume_batches(BATCH, config.device)[0]
    cache = cached.engine.cache
    assert cache is not None
    peaks, allocated = {}, {}
    for stand_ins in (True, False):
        cache.stand_ins = stand_ins
        cached.engine.run(model, batch)  # warm
        peaks[stand_ins] = peak_bytes(lambda: cached.engine.run(model, batch), config.device)
        allocated[stand_ins] = allocated_bytes(lambda: cached.engine.run(model, batch), config.device)
    cache.stand_ins = True
    mib = 2**20
    return Row(
        "P10",
        f"3-D CNN 24³ + 10 columns, table per column, one batch of {BATCH}",
        "bytes allocated, replayed CT not copied ÷ copied",
        Stat.of([allocated[True] / allocated[False]]),
        "< 1",
        allocated[True] < allocated[False],
        note=(
            f"{allocated[True] / mib:.2f} MiB ÷ {allocated[False] / mib:.2f} MiB allocated in all: the {COLUMNS} table "
            f"copies' {COLUMNS * BATCH} CT rows and the CT copy's {BATCH} zeros rows "
            f"({(COLUMNS + 1) * BATCH * SIDE**3 * 4 / mib:.2f} MiB) are one expanded row each; "
            f"peak {peaks[True] / mib:.2f} ÷ {peaks[False] / mib:.2f} MiB (the clean pass's CT activations)"
        ),
        extra={
            "allocated_mib": {"not_copied": allocated[True] / mib, "copied": allocated[False] / mib},
            "peak_mib": {"not_copied": peaks[True] / mib, "copied": peaks[False] / mib},
        },
    )


def allocated_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes of every tensor allocation ``fn`` makes on ``device`` (torch profiler allocator events), freed or not."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    kind = device.type.upper()
    return sum(
        event.nbytes()
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type().name == kind and event.nbytes() > 0
    )


class TinyLateFusion(nn.Module):
    """Two modalities of 32 features, a linear encoder each, a linear head."""

    def __init__(self, features: int = 32) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(features, 32), nn.ReLU())
        self.b = nn.Sequential(nn.Linear(features, 32), nn.ReLU())
        self.head = nn.Linear(64, 5)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.head(torch.cat([self.a(a), self.b(b)], dim=1))


def tiny_mlp(config: Config) -> list[Row]:
    """The tiny MLP: a measurement with ``encoders`` ÷ without, and without ÷ its floor."""
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(64, 32, generator=generator).to(config.device),
            torch.randn(64, 32, generator=generator).to(config.device),
        )
        for _ in range(4)
    ]
    torch.manual_seed(0)
    model = TinyLateFusion().to(config.device).eval()
    modalities = [Modality("a", key=0), Modality("b", key=1)]
    plain = ContributionMeasurement(modalities, output_transform="softmax")
    cached = ContributionMeasurement(modalities, output_transform="softmax", encoders={"a": "a", "b": "b"})
    measure(cached, model, batches, first=True)
    floor = Floor(model, batches, modalities, max_batch_size=None)
    times = interleaved(
        {
            "without": partial(measure, plain, model, batches),
            "with": partial(measure, cached, model, batches),
            "floor": floor,
        },
        config.repeats * 2,
        config.device,
        inner=config.inner,
    )
    with_ = ratio(times["with"], times["without"])
    ours = ratio(times["without"], times["floor"])
    chose = "plain" if cached.engine.cache is not None and cached.engine.cache.choice.plain else "cached"
    return [
        Row(
            "P10",
            "tiny MLP (2 × 32 features, 4 batches of 64), mean fill",
            "measurement with encoders ÷ without",
            with_,
            f"≤ {TINY_TARGET}",
            with_.median <= TINY_TARGET,
            note=f"one batch's timing chose the {chose} path",
            extra={"path": chose},
        ),
        Row(
            "P10",
            "tiny MLP (2 × 32 features, 4 batches of 64), mean fill",
            "measurement ÷ floor",
            ours,
            f"≤ {FLOOR_TARGET}",
            ours.median <= FLOOR_TARGET,
            note="floor: the 1 clean + 2 occluded copies' forward calls alone, on inputs built beforehand",
        ),
    ]
