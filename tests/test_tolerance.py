"""``tolerance``: measure batches in order until every share's 95% half-width is at most the tolerance, then stop.

The expected stopping batch is never taken from the library: the half-widths are recomputed by hand from the model's
outputs on each sample, after every batch (``examples/tolerance_coverage.py``: delta method for the ratio of sums,
standard error of the mean of ratios for ``normalization="per_sample"``), and the rule must stop at the first batch
where all of them are at most the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed
from torch import Tensor, nn
from torch.utils.data import Subset, TensorDataset

from lightning_mc import ContributionMeasurement, ModalityContributionMonitor
from lightning_mc.analyses.precision import MIN_SAMPLES
from lightning_mc.functional import modality_contribution

from helpers import (
    CountingForward,
    TwoModalityNet,
    assert_same_numbers,
    load_example,
    loader,
    trainer_kwargs,
    two_modality_dataset,
)

COVERAGE = load_example("tolerance_coverage")
MODALITIES = {"image": 0, "table": 1}
#: 25 batches of 16; with TOLERANCE the rule stops after batch 14 (computed by hand in each test).
NUM_VAL = 400
TOLERANCE = 0.025


@pytest.mark.parametrize("normalization", ["ratio_of_sums", "per_sample"])
def test_early_stopped_shares_lie_within_the_tolerance_of_the_full_set_in_at_least_90_of_100(normalization) -> None:
    report = COVERAGE.coverage(repetitions=100, tolerance=COVERAGE.TOLERANCE, normalization=normalization)
    print(COVERAGE.describe(report))
    tolerance = report.tolerance
    # the set-up is not degenerate: every share strictly inside (0, 1), per-sample values that vary
    assert all(0.1 < share < 0.9 for share in report.full_shares.values())
    values = COVERAGE.per_sample_values(COVERAGE.FrozenNet(), COVERAGE.dataset())
    assert bool((values.std(0) > 0.2 * values.mean(0)).all())
    # the promise: the full-set share within the tolerance in ≥ 90 of 100 repetitions (about 95 for a calibrated rule)
    assert report.covered >= 90, f"covered in {report.covered} of 100"
    # the stop saved samples, and every stop had the precision asked for
    assert report.mean_samples < COVERAGE.NUM_SAMPLES / 2
    assert max(report.samples_used) < COVERAGE.NUM_SAMPLES
    for widths, independent, used, first in zip(
        report.half_widths, report.independent_half_widths, report.samples_used, report.first_converged_samples
    ):
        assert all(width <= tolerance for width in widths.values())
        assert list(widths.values()) == pytest.approx(independent, rel=1e-6)  # the library's half-widths, by hand
        assert used == first  # stopped at the first batch whose half-widths are all within the tolerance
        assert used >= MIN_SAMPLES and used % COVERAGE.BATCH_SIZE == 0
    # a fixed budget that promises the same precision in every repetition measures more than the adaptive mean
    assert report.fixed_batches * COVERAGE.BATCH_SIZE >= max(report.samples_used)
    assert report.fixed_covered >= 90


def hand_values(model: nn.Module, dataset: TensorDataset) -> Tensor:
    """``d`` ``(N, 2)`` by hand for ``occlusion="zeros"`` and a softmax: ``Σ_c |p⁰ − p^m|`` per sample."""
    image, table = dataset.tensors[0], dataset.tensors[1]
    with torch.no_grad():
        clean = model(image, table).softmax(-1).double()
        no_image = model(torch.zeros_like(image), table).softmax(-1).double()
        no_table = model(image, torch.zeros_like(table)).softmax(-1).double()
    return torch.stack([(clean - no_image).abs().sum(1), (clean - no_table).abs().sum(1)], 1)


def first_converged_batch(values: Tensor, batch_size: int, tolerance: float) -> tuple[int | None, Tensor]:
    """``(b, trajectory)``: the 1-based batch after which every half-width is ≤ ``tolerance`` (``None``: never)."""
    trajectory = COVERAGE.half_width_trajectories(values, torch.arange(values.shape[0])[None], batch_size)[0]
    reached = (trajectory <= tolerance).all(-1)
    return (int(reached.nonzero()[0]) + 1 if reached.any() else None), trajectory


def tolerance_monitor(counter: CountingForward, **options: Any) -> ModalityContributionMonitor:
    """A validate-time monitor (softmax, zeros fill) that stops at :data:`TOLERANCE`; ``counter`` counts its calls.

    One forward call per measured batch here: 3 copies (clean, 2 occluded) ≤ 4 × 16 rows.
    """
    return ModalityContributionMonitor(
        MODALITIES,
        forward_fn=counter,
        output_transform="softmax",
        occlusion="zeros",
        tolerance=TOLERANCE,
        run_on_validate=True,
        **options,
    )


def test_the_monitor_stops_after_the_converging_batch_and_logs_num_samples(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TwoModalityNet()
    val = two_modality_dataset(NUM_VAL, seed=1)
    stop, trajectory = first_converged_batch(hand_values(model.eval(), val), 16, TOLERANCE)
    assert stop is not None and 4 < stop < NUM_VAL // 16  # stops in the middle: some batches are skipped
    counter = CountingForward()
    monitor = tolerance_monitor(counter)
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path))
    for run in (1, 2):  # the second run measures again from its first batch
        (logged,) = trainer.validate(model, loader(val), verbose=False)
        assert counter.calls == run * stop
        assert counter.rows == run * 3 * 16 * stop
        assert logged["mc/num_samples"] == 16 * stop
    assert [entry["num_samples"] for entry in monitor.history] == [16 * stop, 16 * stop]
    result = monitor.latest
    assert result is not None and result.num_samples == 16 * stop and result.share_half_width is not None
    assert list(result.share_half_width.values()) == pytest.approx(trajectory[stop - 1].tolist(), rel=1e-6)
    assert max(result.share_half_width.values()) <= TOLERANCE < float(trajectory[stop - 2].max())
    expected = modality_contribution(
        model, loader(val), MODALITIES, output_transform="softmax", occlusion="zeros", limit_batches=stop
    )
    for name in MODALITIES:
        assert_same_numbers(logged[f"mc/share/{name}"], expected.shares[name], f"mc/share/{name}")
        assert_same_numbers(logged[f"mc/raw/{name}"], expected.raw[name], f"mc/raw/{name}")
    assert expected.share_half_width is None  # no tolerance, no half-widths
    assert "mc/num_samples" not in result_keys_without_tolerance(model, val, tmp_path)


def result_keys_without_tolerance(model: nn.Module, val: TensorDataset, tmp_path: Path) -> set[str]:
    """The keys a monitor without ``tolerance`` logs on ``val``."""
    monitor = ModalityContributionMonitor(MODALITIES, output_transform="softmax", run_on_validate=True)
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path))
    (logged,) = trainer.validate(model, loader(val), verbose=False)
    assert "mc/share/image" in logged
    return set(logged)


def test_limit_batches_caps_a_measurement_that_has_not_converged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TwoModalityNet()
    val = two_modality_dataset(NUM_VAL, seed=1)
    limit = 4
    stop, trajectory = first_converged_batch(hand_values(model.eval(), val), 16, TOLERANCE)
    assert stop is not None and stop > limit and 16 * limit >= MIN_SAMPLES
    counter = CountingForward()
    monitor = tolerance_monitor(counter, limit_batches=limit)
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path))
    (logged,) = trainer.validate(model, loader(val), verbose=False)
    assert counter.calls == limit
    assert logged["mc/num_samples"] == 16 * limit
    assert monitor.latest is not None and monitor.latest.share_half_width is not None
    widths = list(monitor.latest.share_half_width.values())
    assert widths == pytest.approx(trajectory[limit - 1].tolist(), rel=1e-6)
    assert max(widths) > TOLERANCE
    functional = modality_contribution(
        model,
        loader(val),
        MODALITIES,
        output_transform="softmax",
        occlusion="zeros",
        tolerance=TOLERANCE,
        limit_batches=limit,
    )
    assert functional.num_samples == 16 * limit
    assert_same_numbers(functional.share_half_width, monitor.latest.share_half_width, "share_half_width")


class TwoAPlusB(nn.Module):
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return 2 * a + b


def test_fewer_than_min_samples_never_stop() -> None:
    """Batches of 16 constant samples (zero variance, half-width 0): no stop before 50 samples, then one."""
    measurement = ContributionMeasurement({"a": 0, "b": 1}, occlusion="zeros", tolerance=0.5)
    batch = (torch.ones(16, 1), torch.ones(16, 1))
    for _ in range(3):  # 48 samples
        measurement.update(TwoAPlusB(), batch)
        assert not measurement.converged
    assert measurement.compute().share_half_width == {"a": float("inf"), "b": float("inf")}
    measurement.update(TwoAPlusB(), batch)  # 64 samples
    assert measurement.converged
    result = measurement.compute()
    assert result.shares == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert result.share_half_width == pytest.approx({"a": 0.0, "b": 0.0}, abs=1e-6)


INVALID = [0, 1.5, -1, "a", True]


@pytest.mark.parametrize("tolerance", INVALID)
@pytest.mark.parametrize("entry_point", ["monitor", "measurement", "functional"])
def test_an_invalid_tolerance_is_a_value_error_naming_it(entry_point: str, tolerance: Any) -> None:
    with pytest.raises(ValueError, match=rf"tolerance={tolerance!r} must be None or a half-width in \(0, 1\)"):
        build(entry_point, tolerance=tolerance)


@pytest.mark.parametrize("entry_point", ["monitor", "measurement", "functional"])
def test_tolerance_with_per_sample_output_normalization_is_a_value_error(entry_point: str) -> None:
    with pytest.raises(ValueError, match=r"tolerance=0\.05 is available for normalization in .*'per_sample_output'"):
        build(entry_point, tolerance=0.05, normalization="per_sample_output")


def build(entry_point: str, **options: Any) -> Any:
    if entry_point == "monitor":
        return ModalityContributionMonitor(MODALITIES, **options)
    if entry_point == "measurement":
        return ContributionMeasurement(MODALITIES, **options)
    return modality_contribution(TwoModalityNet(), loader(two_modality_dataset(16)), MODALITIES, **options)


# ---- DDP: the decision is reduced, so both ranks stop after the same batch ----------------------------------------

PLANTED = {"a": 0, "b": 1}
NUM_DDP = 640
DDP_TOLERANCE = 0.03


class PlantedNet(L.LightningModule):
    """``2a + b`` on scalar inputs: with a zero fill ``d_a = 2|a|`` and ``d_b = |b|``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[2.0], [1.0]]))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b], 1) @ self.weight

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass


def skewed_dataset() -> TensorDataset:
    """Even samples (rank 0's under DistributedSampler) nearly constant, odd ones (rank 1's) ``Exp(1)``.

    Alone, rank 0 would converge after its 4th batch and rank 1 not within its 20; together they converge in between.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.empty(NUM_DDP, 1).exponential_(generator=generator)
    b = torch.empty(NUM_DDP, 1).exponential_(generator=generator)
    a[0::2] = 1 + 0.05 * torch.randn(NUM_DDP // 2, 1, generator=generator)
    b[0::2] = 1 + 0.05 * torch.randn(NUM_DDP // 2, 1, generator=generator)
    return TensorDataset(a, b)


class RecordStop(L.Callback):
    """Placed after the monitor: each rank writes how many batches its monitor measured, what it logged and more."""

    def __init__(self, directory: Path, monitor: ModalityContributionMonitor, counter: CountingForward) -> None:
        self.directory, self.monitor, self.counter = directory, monitor, counter

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        latest = self.monitor.latest
        assert latest is not None
        record = {
            "batches": self.counter.calls,
            "rows": self.counter.rows,
            "logged": {key: value.item() for key, value in trainer.callback_metrics.items() if key.startswith("mc/")},
            "shares": latest.shares,
            "raw": latest.raw,
            "half_width": latest.share_half_width,
            "num_samples": latest.num_samples,
        }
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_stop_after_the_same_batch_and_measure_the_union_of_their_samples(tmp_path: Path) -> None:
    data = skewed_dataset()
    a, b = data.tensors
    values = torch.cat([2 * a.abs(), b.abs()], 1).double()
    union_stop, union_trajectory = first_converged_batch(values, 32, DDP_TOLERANCE)  # rank0 ∪ rank1 batch by batch
    rank0_stop, _ = first_converged_batch(values[0::2], 16, DDP_TOLERANCE)
    rank1_stop, _ = first_converged_batch(values[1::2], 16, DDP_TOLERANCE)
    # a rank deciding on its own samples would stop elsewhere: rank 0 earlier, rank 1 never
    assert union_stop is not None and rank0_stop is not None and rank1_stop is None
    assert rank0_stop < union_stop < NUM_DDP // 32
    counter = CountingForward()
    monitor = ModalityContributionMonitor(
        PLANTED, forward_fn=counter, occlusion="zeros", tolerance=DDP_TOLERANCE, run_on_validate=True
    )
    trainer = L.Trainer(
        callbacks=[monitor, RecordStop(tmp_path, monitor, counter)],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2),
    )
    trainer.validate(PlantedNet(), loader(data), verbose=False)

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == union_stop
    assert ranks[0]["rows"] == ranks[1]["rows"] == 3 * 16 * union_stop  # clean + 2 copies, one call per batch
    assert ranks[0]["logged"] == ranks[1]["logged"]
    assert ranks[0]["half_width"] == ranks[1]["half_width"]
    measured = 32 * union_stop
    assert ranks[0]["num_samples"] == measured and ranks[0]["logged"]["mc/num_samples"] == measured
    # one process on exactly the samples the two ranks measured (rank 0's 0, 2, 4, ... and rank 1's 1, 3, 5, ...)
    single = modality_contribution(PlantedNet(), loader(Subset(data, range(measured))), PLANTED, occlusion="zeros")
    assert single.num_samples == measured
    for name in PLANTED:
        assert_same_numbers(ranks[0]["shares"][name], single.shares[name], f"shares[{name}]")
        assert_same_numbers(ranks[0]["raw"][name], single.raw[name], f"raw[{name}]")
        assert_same_numbers(ranks[0]["logged"][f"mc/share/{name}"], single.shares[name], f"mc/share/{name}")
    expected_widths = COVERAGE.half_widths(values[:measured]).tolist()
    assert list(ranks[0]["half_width"].values()) == pytest.approx(expected_widths, rel=1e-6)
    assert max(expected_widths) <= DDP_TOLERANCE < float(union_trajectory[union_stop - 2].max())
