"""The benchmark suites P1–P5 and the scaling sweeps. Each returns rows for the summary and detail tables."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.models import (
    NUM_OUTPUTS,
    ImageTableNet,
    LitImageTable,
    TextTableNet,
    image_table_batches,
    image_table_modalities,
    num_parameters,
    seeded,
    text_table_batches,
    text_table_modalities,
)
from benchmarks.peers import CaptumAblation, Floor, Monitor, max_abs_difference, reference_loop, shares
from benchmarks.timing import Stat, interleaved, now, ratio
from lightning_mc import ModalityContributionMonitor

SHARE_TOLERANCE = 1e-5


@dataclass
class Config:
    """Sizes and repeats; ``quick`` shrinks everything to a smoke run."""

    quick: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: Interleaved rounds per comparison; ``0``: 3 quick, 9 otherwise (``make bench-check`` runs quick sizes with 25).
    rounds: int = 0
    #: Back-to-back calls per round, the fastest kept; ``0``: 1 quick, 3 otherwise (``make bench-check``: 2).
    calls: int = 0

    @property
    def repeats(self) -> int:
        if self.rounds:
            return self.rounds
        return 3 if self.quick else 9

    @property
    def inner(self) -> int:
        if self.calls:
            return self.calls
        return 1 if self.quick else 3

    @property
    def batch_size(self) -> int:
        return 16 if self.quick else 64


@dataclass
class Row:
    """One line of the summary table: a measured ratio against its target."""

    id: str
    case: str
    measure: str
    value: Stat
    target: str
    met: bool | None
    digits: int = 2
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "note": self.note,
            "case": self.case,
            "measure": self.measure,
            **self.value.as_dict(),
            "target": self.target,
            "met": self.met,
            **self.extra,
        }


@dataclass
class Table:
    """A detail table: a title, column names and rows of already formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


# ---------------------------------------------------------------------------------------------------------- P1


def _p1_cases(config: Config) -> list[tuple[str, Callable[[], torch.nn.Module], list, list]]:
    size, device, batches = config.batch_size, config.device, 1 if config.quick else 2
    image_batches = {tables: image_table_batches(batches, size, tables, 16, device=device) for tables in (1, 3, 7)}
    text_batches = text_table_batches(batches, size, device=device)
    cases = [
        ("CNN+MLP, M=2, whole", 1, image_table_modalities(1)),
        ("CNN+MLP, M=4, whole", 3, image_table_modalities(3)),
        ("CNN+MLP, M=8, whole", 7, image_table_modalities(7)),
        ("CNN+MLP, 16 image patches", 1, image_table_modalities(1, patches=16)),
        ("CNN+MLP, 64 image patches", 1, image_table_modalities(1, patches=64)),
        ("CNN+MLP, 32 table columns", 1, image_table_modalities(1, columns=True)),
    ]
    out = [
        (name, lambda t=tables: ImageTableNet(num_tables=t, image_size=16), image_batches[tables], modalities)
        for name, tables, modalities in cases
    ]
    out.append(("Text+MLP, M=2, whole", TextTableNet, text_batches, text_table_modalities()))
    out.append(("Text+MLP, 32 tokens", TextTableNet, text_batches, text_table_modalities(tokens=True)))
    if config.quick:
        return [out[0], out[3], out[6]]
    out.append(
        (
            "2-conv 3×32×32 + MLP, M=2, whole",
            lambda: ImageTableNet(num_tables=1, image_size=32, in_channels=3, convs=2, channels=32),
            image_table_batches(batches, size, 1, 32, in_channels=3, device=device),
            image_table_modalities(1),
        )
    )
    return out


def p1_floor(config: Config) -> list[Row]:
    """Monitor time per check ÷ the forward passes it cannot avoid (1 clean + Σ masks per sample, same chunks)."""
    rows = []
    for name, build, batches, modalities in _p1_cases(config):
        model = seeded(build()).to(config.device)
        monitor = Monitor(modalities)
        floor = Floor(model, batches, modalities, max_batch_size=None)
        mismatch = _floor_mismatch(monitor, model, batches[0], floor)

        def engine_only(monitor: Monitor = monitor, model: torch.nn.Module = model, batches: list = batches) -> None:
            for batch in batches:
                monitor.engine.run(model, batch)

        times = interleaved(
            {"monitor": partial(monitor, model, batches), "engine": engine_only, "floor": floor},
            config.repeats,
            config.device,
            inner=config.inner,
        )
        value = ratio(times["monitor"], times["floor"])
        engine = ratio(times["engine"], times["floor"])
        floor_seconds = Stat.of(times["floor"])
        extra_ms = (Stat.of(times["monitor"]).median - floor_seconds.median) * 1e3 / len(batches)
        masks = sum(m.attribute_masks(m.select(batches[0])).masks.shape[0] for m in modalities)
        rows.append(
            Row(
                "P1",
                name,
                "monitor ÷ floor",
                value,
                "≤ 1.15",
                value.median <= 1.15,
                note=(
                    f"engine alone ÷ floor {engine.format()}; floor {floor_seconds.median * 1e3:.1f} ms/check, "
                    f"monitor {extra_ms:+.1f} ms/batch"
                ),
                extra={
                    "masks": masks,
                    "samples": sum(b[0].shape[0] for b in batches),
                    "engine_over_floor": engine.as_dict(),
                    "floor_seconds": floor_seconds.as_dict(),
                    "outputs_max_abs_diff": mismatch,
                },
            )
        )
    return rows


def _floor_mismatch(monitor: Monitor, model: torch.nn.Module, batch: Any, floor: Floor) -> float:
    """Largest difference between the engine's outputs and the floor's on the first batch (they must agree)."""
    outputs = monitor.engine.run(model, batch)
    engine_rows = torch.cat([outputs.clean.unsqueeze(0), *(o.transpose(0, 1) for o in outputs.occluded.values())])
    with torch.inference_mode():
        floor_rows = torch.cat([model(*chunk) for chunk in floor.chunks[0]]).float().softmax(-1)
    difference = (engine_rows.reshape(floor_rows.shape) - floor_rows).abs().max().item()
    if difference > 1e-4:
        raise AssertionError(f"the floor does not compute what the engine computes (max |Δ| = {difference:.2e})")
    return difference


# ---------------------------------------------------------------------------------------------------------- P2


def p2_reference(config: Config) -> list[Row]:
    """The reference's batch-size-1 loop ÷ the monitor, on the same model, data, fills and outputs."""
    cuda = config.device.type == "cuda"
    size, device = config.batch_size, config.device
    cases = [
        (
            "small CNN+MLP (8×8 + 32 cols)",
            ImageTableNet(num_tables=1, image_size=8),
            image_table_batches(1 if config.quick else 4, size, 1, 8, device=device),
            "≥ 12×",
            12.0,
        ),
        (
            "compute-bound 2-conv (3×32×32)",
            ImageTableNet(num_tables=1, image_size=32, in_channels=3, convs=2, channels=32),
            image_table_batches(1 if config.quick else 2, size, 1, 32, in_channels=3, device=device),
            "≥ 50× (GPU)" if cuda else "≥ 1.3× (CPU)",
            50.0 if cuda else 1.3,
        ),
    ]
    rows = []
    modalities = image_table_modalities(1)
    for name, model, batches, target, threshold in cases:
        model = seeded(model).to(device)
        monitor = Monitor(modalities)
        ours, theirs = monitor(model, batches), reference_loop(model, batches, modalities)
        share_difference = max_abs_difference(shares(ours), shares(theirs))
        times = interleaved(
            {
                "reference": partial(reference_loop, model, batches, modalities),
                "monitor": partial(monitor, model, batches),
            },
            max(3, config.repeats // 2 + 1),
            device,
            inner=config.inner,
        )
        value = ratio(times["reference"], times["monitor"])
        rows.append(
            Row(
                "P2",
                name,
                "bs=1 loop ÷ monitor",
                value,
                target,
                value.median >= threshold and share_difference <= SHARE_TOLERANCE,
                digits=1,
                note=(
                    f"max |Δshare| {share_difference:.1e}; {sum(b[0].shape[0] for b in batches)} samples, "
                    f"monitor {Stat.of(times['monitor']).median * 1e3:.0f} ms; {torch.get_num_threads()} thread(s)"
                ),
                extra={"shares_max_abs_diff": share_difference, "params": num_parameters(model)},
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------------------- P3


def p3_captum(config: Config) -> list[Row]:
    """Monitor ÷ Captum FeatureAblation (one group per modality, fastest perturbations_per_eval), C = 5 outputs."""
    device = config.device
    batches = image_table_batches(1 if config.quick else 4, config.batch_size, 2, 8, device=device)
    modalities = image_table_modalities(2, image_fill="zeros")  # Captum's baseline 0 is the zeros fill
    names = [m.name for m in modalities]
    model = seeded(ImageTableNet(num_tables=2, image_size=8)).to(device)
    monitor = Monitor(modalities)
    # tune Captum fairly: every perturbations_per_eval from 1 to the number of groups, keep its fastest
    candidates = {ppe: CaptumAblation(model, NUM_OUTPUTS, ppe) for ppe in range(1, len(modalities) + 1)}
    tuning = interleaved(
        {ppe: (lambda c=captum: c(batches, names)) for ppe, captum in candidates.items()}, 3, device, warmup=1
    )
    best = min(tuning, key=lambda ppe: Stat.of(tuning[ppe]).median)
    captum = candidates[best]
    share_difference = max_abs_difference(shares(monitor(model, batches)), shares(captum(batches, names)))
    raw_difference = max_abs_difference(monitor(model, batches), captum(batches, names))
    times = interleaved(
        {"monitor": lambda: monitor(model, batches), "captum": lambda: captum(batches, names)},
        config.repeats,
        device,
        inner=config.inner,
    )
    value = ratio(times["monitor"], times["captum"])
    return [
        Row(
            "P3",
            f"M=3, C={NUM_OUTPUTS}, Captum perturbations_per_eval={best}",
            "monitor ÷ Captum",
            value,
            "≤ 0.25",
            value.median <= 0.25 and share_difference <= SHARE_TOLERANCE,
            note=f"max |Δshare| {share_difference:.1e}, max |Δraw| {raw_difference:.1e}",
            extra={
                "shares_max_abs_diff": share_difference,
                "raw_max_abs_diff": raw_difference,
                "captum_seconds_by_perturbations_per_eval": {k: Stat.of(v).median for k, v in tuning.items()},
            },
        )
    ]


# ---------------------------------------------------------------------------------------------------------- P4


def _loaders(config: Config, train: int, val: int) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)

    def dataset(n: int) -> TensorDataset:
        image = torch.randn(n, 1, 8, 8, generator=generator)
        table = torch.randn(n, 32, generator=generator)
        return TensorDataset(image, table, torch.randint(0, NUM_OUTPUTS, (n,), generator=generator))

    size = config.batch_size
    return DataLoader(dataset(train), batch_size=size, shuffle=True), DataLoader(dataset(val), batch_size=size)


class _TimedMonitor(ModalityContributionMonitor):
    """The monitor with a stopwatch around the hooks that do its work (measuring, computing, logging)."""

    seconds = 0.0

    def _timed(self, hook: str, *args: Any, **kwargs: Any) -> None:
        start = now()
        getattr(super(), hook)(*args, **kwargs)
        self.seconds += now() - start

    def on_validation_epoch_start(self, *args: Any, **kwargs: Any) -> None:
        self._timed("on_validation_epoch_start", *args, **kwargs)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._timed("on_validation_batch_end", *args, **kwargs)

    def on_validation_epoch_end(self, *args: Any, **kwargs: Any) -> None:
        self._timed("on_validation_epoch_end", *args, **kwargs)


def _fit_seconds(
    config: Config, loaders: tuple[DataLoader, DataLoader], monitored: bool, epochs: int
) -> tuple[float, float]:
    """Seconds of one ``Trainer.fit``, and the seconds spent inside the monitor's hooks (0 without it)."""
    callbacks = []
    if monitored:
        callbacks.append(
            _TimedMonitor(image_table_modalities(1), output_transform="softmax", every_n_epochs=1, limit_batches=0.1)
        )
    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            default_root_dir=root,
            max_epochs=epochs,
            accelerator="gpu" if config.device.type == "cuda" else "cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=callbacks,
        )
        model = LitImageTable(num_tables=1, image_size=8)
        start = now()
        trainer.fit(model, *loaders)
        if config.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = now() - start
    if monitored and len(callbacks[0].history) != epochs:
        raise AssertionError(f"the monitor measured {len(callbacks[0].history)} of {epochs} epochs")
    return seconds, callbacks[0].seconds if monitored else 0.0


def p4_training(config: Config) -> tuple[list[Row], Table]:
    """Trainer.fit with the monitor every epoch on 10% of the validation data ÷ the same fit without it."""
    train, val = (512, 256) if config.quick else (4096, 1024)
    loaders = _loaders(config, train, val)
    epochs, repeats = 2, 2 if config.quick else 11
    _fit_seconds(config, loaders, monitored=True, epochs=1)  # warm-up (imports, first-call costs)
    times: dict[bool, list[float]] = {True: [], False: []}
    in_hooks: list[float] = []
    for round_ in range(repeats):
        for monitored in (True, False) if round_ % 2 == 0 else (False, True):
            seconds, hooks = _fit_seconds(config, loaders, monitored, epochs)
            times[monitored].append(seconds)
            if monitored:
                in_hooks.append(hooks)
    value = ratio(times[True], times[False])
    # a steadier view of the same cost: the time spent inside the monitor's hooks, over the fit without it
    hooks_share = Stat.of([hooks / seconds for hooks, seconds in zip(in_hooks, times[False])])
    row = Row(
        "P4",
        f"fit {epochs} epochs, {train} train / {val} val samples, monitor on 10% of val",
        "fit with ÷ without",
        value,
        "≤ 1.05",
        value.median <= 1.05,
        digits=3,
        note=(
            f"time inside the monitor's hooks ÷ fit without: {hooks_share.format(3)}; fit without "
            f"{Stat.of(times[False]).median:.2f} s; {torch.get_num_threads()} thread(s)"
        ),
        extra={"fit_seconds_without": Stat.of(times[False]).as_dict(), "hooks_over_fit": hooks_share.as_dict()},
    )
    return [row], _cost_per_check(config, val)


def _cost_per_check(config: Config, val: int) -> Table:
    """Seconds per check (10% of the validation set, M=2 whole) and its ratio to a plain validation epoch."""
    size, device = config.batch_size, config.device
    val_batches = image_table_batches(val // size, size, 1, 8, device=device)
    checked = val_batches[: max(1, round(0.1 * len(val_batches)))]
    monitor = Monitor(image_table_modalities(1))
    rows = []
    widths = (32, 256) if config.quick else (32, 256, 1024)
    for hidden in widths:
        model = seeded(ImageTableNet(num_tables=1, image_size=8, channels=hidden // 4, hidden=hidden)).to(device)

        def validation_epoch(model: torch.nn.Module = model) -> None:
            with torch.inference_mode():
                for batch in val_batches:
                    model(*batch)

        times = interleaved(
            {"check": lambda model=model: monitor(model, checked), "val": validation_epoch},
            max(3, config.repeats // 2),
            device,
        )
        check = Stat.of(times["check"])
        rows.append(
            [
                f"{num_parameters(model):,}",
                f"{len(checked) * size}",
                check.format(4, " s"),
                Stat.of(times["val"]).format(4, " s"),
                ratio(times["check"], times["val"]).format(2),
            ]
        )
    return Table(
        "P4 cost per check vs model size (M=2 whole modalities, 10% of the validation set)",
        ["parameters", "samples checked", "check (s)", "plain val epoch (s)", "check ÷ val epoch"],
        rows,
    )


# ---------------------------------------------------------------------------------------------------------- P5


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak tensor memory allocated by ``fn`` above what was live before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the torch profiler's memory events (every allocation and free of
    the CPU tensor allocator, in time order), summed; the peak of that running sum. Deterministic, unlike RSS.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        if event.device_type().name == "CPU":
            live += event.nbytes()
            peak = max(peak, live)
    return peak


def p5_memory(config: Config) -> tuple[list[Row], Table, Table]:
    """Peak memory against ``max_batch_size`` and against the number of masks at a fixed budget."""
    device, size = config.device, config.batch_size
    batch = image_table_batches(1, size, 1, 16, device=device)
    model = seeded(ImageTableNet(num_tables=1, image_size=16)).to(device)

    def plain() -> None:
        with torch.inference_mode():
            model(*batch[0])

    mib = 2**20
    plain_peak = peak_bytes(plain, device)
    modalities = image_table_modalities(1, patches=64)
    total_rows = size * (1 + 64 + 1)
    budget_rows, budget_peaks = [], []
    budgets = [size, 4 * size, 16 * size, total_rows]
    for budget in budgets:
        monitor = Monitor(modalities, max_batch_size=budget)
        peak = peak_bytes(lambda m=monitor: m(model, batch), device)
        budget_peaks.append(peak)
        budget_rows.append([f"{budget}", f"{peak / mib:.2f}", f"{peak / plain_peak:.1f}"])
    mask_rows, mask_peaks = [], []
    budget = 4 * size
    for patches in (None, 4, 16, 64):
        monitor = Monitor(image_table_modalities(1, patches=patches), max_batch_size=budget)
        peak = peak_bytes(lambda m=monitor: m(model, batch), device)
        mask_peaks.append(peak)
        mask_rows.append([f"{1 if patches is None else patches} (+1 table)", f"{peak / mib:.2f}"])
    # 1 image mask gives 3 copies (3·N rows), fewer than the budget; 4 masks and more fill every chunk
    filled = mask_peaks[1:]
    growth = max(filled) / min(filled)
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler CPU allocator events"
    row = Row(
        "P5",
        f"peak at max_batch_size={budget}, 4 → 64 image masks",
        "max ÷ min peak",
        Stat.of([growth]),
        "flat (≤ 1.10)",
        growth <= 1.10,
        note=(
            f"{mask_peaks[1] / mib:.2f} → {mask_peaks[-1] / mib:.2f} MiB; peak ∝ max_batch_size "
            f"({budget_peaks[0] / mib:.2f} MiB at {budgets[0]} rows, {budget_peaks[-1] / mib:.2f} MiB at {budgets[-1]})"
        ),
        extra={"method": how, "peaks_mib": [p / mib for p in mask_peaks]},
    )
    by_budget = Table(
        f"P5 peak memory vs max_batch_size (batch of {size}, 64 patches + 1 table = {total_rows} rows; {how})",
        ["max_batch_size (rows)", "peak (MiB)", "÷ plain forward of the batch"],
        budget_rows,
        note=f"plain forward of the batch: {plain_peak / mib:.2f} MiB",
    )
    by_masks = Table(
        f"P5 peak memory vs number of image masks (max_batch_size={budget}; {how})",
        ["image masks", "peak (MiB)"],
        mask_rows,
    )
    return [row], by_budget, by_masks


# ------------------------------------------------------------------------------------------------------ scaling


def scaling(config: Config) -> Table:
    """Time per check as samples, masks and modalities grow (one sweep at a time, points interleaved)."""
    device, size = config.device, config.batch_size
    repeats = 3 if config.quick else 5
    points: list[tuple[str, str, Callable[[], object], int]] = []

    def point(
        axis: str, label: str, tables: int, num_batches: int, modalities: Sequence[Any], budget: int | None = None
    ) -> None:
        model = seeded(ImageTableNet(num_tables=tables, image_size=16)).to(device)
        batches = image_table_batches(num_batches, size, tables, 16, device=device)
        monitor = Monitor(modalities, max_batch_size=budget)
        masks = sum(m.attribute_masks(m.select(batches[0])).masks.shape[0] for m in modalities)
        points.append((axis, label, lambda: monitor(model, batches), num_batches * size * (1 + masks)))

    for num_batches in (1, 2, 4) if config.quick else (1, 2, 4, 8):
        point("samples", f"{num_batches * size}", 1, num_batches, image_table_modalities(1))
    for patches in (None, 4, 16, 64):
        point("image masks", f"{1 if patches is None else patches}", 1, 1, image_table_modalities(1, patches=patches))
    for tables in (1, 3, 7):
        point("modalities", f"{tables + 1}", tables, 1, image_table_modalities(tables))
    for budget in (size, 4 * size, 16 * size, 66 * size):
        point("max_batch_size (64 masks)", f"{budget}", 1, 1, image_table_modalities(1, patches=64), budget)
    rows = []
    for axis in ("samples", "image masks", "modalities", "max_batch_size (64 masks)"):
        selected = [p for p in points if p[0] == axis]
        times = interleaved({p[1]: p[2] for p in selected}, repeats, device, inner=config.inner)
        first, first_rows = selected[0][1], selected[0][3]
        for _, label, _, forward_rows in selected:
            seconds = Stat.of(times[label])
            per_row = seconds.median / forward_rows * 1e6
            relative = ratio(times[label], times[first]).format(2)
            rows.append(
                [
                    axis,
                    label,
                    f"{forward_rows / first_rows:g}",
                    f"{seconds.median * 1e3:.1f}",
                    relative,
                    f"{per_row:.1f}",
                ]
            )
    return Table(
        f"Scaling: time per check (CNN+MLP 16×16 + tables, batches of {size}, default max_batch_size)",
        ["axis", "value", "rows ÷ first", "check (ms)", "time ÷ first [p25–p75]", "µs per row"],
        rows,
        note=(
            "Cost ∝ samples × (1 + Σ masks). Knobs: `limit_batches` cuts samples (linear), `every_n_epochs` cuts "
            "checks, `max_batch_size` trades peak memory (∝ budget, P5) for fewer, larger forward calls: past a few "
            "hundred rows on CPU it buys little time, so keep it small where memory is tight."
        ),
    )
