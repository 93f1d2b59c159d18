"""The three entry points measure the same numbers on the same model and validation set.

1. the functional API ``modality_contribution(model, val_loader, modalities, **options)``;
2. ``ModalityContributionMonitor(modalities, **options)`` in a ``Trainer`` fit: what it logs
   (``trainer.callback_metrics``), its ``history[-1]`` and its ``latest`` result;
3. a plain-PyTorch loop over ``ContributionMeasurement(modalities, **options)``.

Each option is checked on its own and all together, and once more under ``ddp_spawn`` on two processes. The weights
measured by the functional API and the hand loop are those of the fitted model: with ``max_epochs=1`` the monitor's
only check ran after the last training step, so it saw the same weights.

The entry points are different computations of the same numbers, so every float, the seeded bootstrap intervals
included, is compared with ``helpers.assert_same_numbers`` (float32 rounding: 1e-5 relative, 1e-6 absolute); sample
counts, labels and option values must be exactly equal. Logged values are float32 tensors, so they are compared with
the float32 rounding of the expected number. A bootstrap that depended on the order of the samples would miss by its
own noise (~1e-2), far more than the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed
from torchmetrics.classification import MulticlassAccuracy

from lightning_mc import ContributionMeasurement, ContributionResult, Modality, ModalityContributionMonitor
from lightning_mc.core.modality import ModalitiesSpec
from lightning_mc.functional import modality_contribution
from lightning_mc.masks import Columns
from lightning_mc.views.scalars import result_scalars

from helpers import NUM_CLASSES, TwoModalityNet, assert_same_numbers, loader, trainer_kwargs, two_modality_dataset

MODALITIES = {"image": 0, "table": 1}
#: 40 samples in batches of 16: 16, 16 and a partial batch of 8.
NUM_VAL = 40
#: Odd, so DistributedSampler pads rank 1 with a repeat of sample 0 (17 + 17 rows for 33 samples).
NUM_VAL_DDP = 33
OUTPUT_NAMES = [str(index) for index in range(NUM_CLASSES)]
CASES = [
    "defaults",
    "ci",
    "shapley",
    "check_redundancy",
    "perf_metric",
    "per_output",
    "per_sample",
    "attributes",
    "combined",
]


def build_case(name: str) -> tuple[ModalitiesSpec, dict[str, Any], bool]:
    """``(modalities, measurement options, per_output)`` of a case; a fresh ``perf_metric`` instance on every call."""
    ci = {"ci": 0.9, "n_boot": 200}

    def accuracy() -> dict[str, Any]:
        return {"perf_metric": MulticlassAccuracy(num_classes=NUM_CLASSES), "target": 2}

    cases: dict[str, tuple[ModalitiesSpec, dict[str, Any], bool]] = {
        "defaults": (MODALITIES, {}, False),
        "ci": (MODALITIES, ci, False),
        "shapley": (MODALITIES, {"shapley": True}, False),
        "check_redundancy": (MODALITIES, {"check_redundancy": True}, False),
        "perf_metric": (MODALITIES, accuracy(), False),
        "per_output": (MODALITIES, {}, True),
        "per_sample": (MODALITIES, {"normalization": "per_sample"}, False),
        "attributes": ([Modality("image", key=0), Modality("table", key=1, attributes=Columns())], {}, False),
        "combined": (MODALITIES, {**ci, "shapley": True, **accuracy()}, True),
    }
    return cases[name]


def as_float32(value: float) -> float:
    """``value`` rounded as Lightning stores a logged float (a float32 tensor)."""
    return torch.tensor(value, dtype=torch.float32).item()


def assert_logged(logged: dict[str, float], result: ContributionResult, output_names: list[str] | None) -> None:
    """What the monitor logged is every key of ``result_scalars(result)``, with ``result``'s values."""
    expected = result_scalars(result, "mc", output_names)
    assert sorted(logged) == sorted(expected)
    for key, value in expected.items():
        assert_same_numbers(logged[key], as_float32(value), key)  # NaN = NaN
    # the per-output shares, spelled out without result_scalars
    if output_names is not None:
        for name, shares in result.per_output_shares.items():
            assert len(shares) == NUM_CLASSES
            for index, share in enumerate(shares):
                key = f"mc/output_share/{index}/{name}"
                assert_same_numbers(logged[key], as_float32(share), key)
    else:
        assert not [key for key in logged if key.startswith("mc/output_share/")]


def expected_history_entry(result: ContributionResult, epoch: int, global_step: int) -> dict[str, Any]:
    """The documented shape of a monitor's history entry, built from ``result``."""
    entry: dict[str, Any] = {
        "epoch": epoch,
        "global_step": global_step,
        "shares": result.shares,
        "raw": result.raw,
        "balance": result.balance,
        "num_samples": result.num_samples,
    }
    if result.share_low is not None:
        entry.update(share_low=result.share_low, share_high=result.share_high)
    if result.perf_drop is not None:
        entry.update(perf_clean=result.perf_clean, perf_drop=result.perf_drop)
    if result.shapley is not None:
        entry["shapley"] = result.shapley.values
    return entry


def assert_options_took_effect(
    result: ContributionResult, modalities: ModalitiesSpec, options: dict[str, Any], num_samples: int
) -> None:
    """The result holds what the options ask for and nothing else, so agreeing results are not vacuous."""
    names = ["image", "table"]
    assert list(result.shares) == names
    assert result.num_samples == num_samples
    assert result.num_skipped == 0
    assert result.normalization == options.get("normalization", "ratio_of_sums")
    assert sum(result.shares.values()) == pytest.approx(1.0, abs=1e-6)  # float32 sums
    assert all(0.0 < share < 1.0 for share in result.shares.values())  # both branches of the net move the outputs
    has_columns = not isinstance(modalities, dict)
    assert list(result.attribute_shares["table"]) == ([str(j) for j in range(5)] if has_columns else ["all"])
    assert sum(result.attribute_shares["table"].values()) == pytest.approx(result.shares["table"], rel=1e-6)
    if "ci" in options:
        assert result.ci == options["ci"]
        assert result.share_low is not None and result.share_high is not None
        for name in names:
            assert result.share_low[name] < result.shares[name] < result.share_high[name]
    else:
        assert result.ci is None and result.share_low is None and result.share_high is None
    shapley = options.get("shapley", False)
    assert (result.shapley is not None) == shapley
    assert (result.all_occluded_raw is not None) == (shapley or options.get("check_redundancy", False))
    if result.shapley is not None:
        assert sum(result.shapley.values.values()) == pytest.approx(result.all_occluded_raw, rel=1e-6)
        assert list(result.shapley.interactions) == [("image", "table")]
    if "perf_metric" in options:
        assert result.perf_clean is not None and 0.0 < result.perf_clean <= 1.0
        assert result.perf_drop is not None and list(result.perf_drop) == names
    else:
        assert result.perf_clean is None and result.perf_drop is None


@pytest.mark.parametrize("case", CASES)
def test_functional_monitor_and_hand_loop_give_the_same_numbers(case: str, tmp_path: Path) -> None:
    modalities, options, per_output = build_case(case)
    torch.manual_seed(0)
    model = TwoModalityNet()
    val_data = two_modality_dataset(NUM_VAL, seed=1)
    monitor = ModalityContributionMonitor(modalities, output_transform="softmax", per_output=per_output, **options)
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(model, loader(two_modality_dataset(48), batch_size=16), loader(val_data, batch_size=16))
    logged = {key: value.item() for key, value in trainer.callback_metrics.items() if key.startswith("mc/")}

    # the fitted weights, measured offline: functional API, then a hand-written loop over the measurement object
    _, options, _ = build_case(case)
    functional = modality_contribution(
        model, loader(val_data, batch_size=16), modalities, output_transform="softmax", **options
    )
    _, options, _ = build_case(case)
    measurement = ContributionMeasurement(modalities, output_transform="softmax", **options)
    for batch in loader(val_data, batch_size=16):
        measurement.update(model, batch)
    by_hand = measurement.compute()

    assert_options_took_effect(functional, modalities, options, NUM_VAL)
    assert_same_numbers(by_hand, functional, "hand loop")
    assert monitor.latest is not None
    assert_same_numbers(monitor.latest, functional, "monitor.latest")
    assert len(monitor.history) == 1
    expected = expected_history_entry(functional, 0, trainer.global_step)
    assert_same_numbers(monitor.history[-1], expected, "monitor.history[-1]")
    assert_logged(logged, functional, OUTPUT_NAMES if per_output else None)


class RecordAtValidationEnd(L.Callback):
    """Placed after the monitor: each rank writes what it logged and its history entry; rank 0 saves the weights."""

    def __init__(self, directory: Path, monitor: ModalityContributionMonitor) -> None:
        self.directory = directory
        self.monitor = monitor
        self.records: list[dict[str, Any]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logged = {key: value.item() for key, value in trainer.callback_metrics.items() if key.startswith("mc/")}
        self.records.append({"logged": logged, "history": self.monitor.history[-1], "global_step": trainer.global_step})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank = trainer.global_rank
        (self.directory / f"rank{rank}.json").write_text(json.dumps(self.records))
        if rank == 0:
            torch.save(pl_module.state_dict(), self.directory / "weights.pt")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_with_every_option_log_the_single_process_numbers(tmp_path: Path) -> None:
    modalities, options, per_output = build_case("combined")
    monitor = ModalityContributionMonitor(modalities, output_transform="softmax", per_output=per_output, **options)
    recorder = RecordAtValidationEnd(tmp_path, monitor)
    torch.manual_seed(0)
    trainer = L.Trainer(
        callbacks=[monitor, recorder], **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=1)
    )
    # 17 rows per rank in batches of 16 + 1; rank 1's second batch is DistributedSampler's repeat of sample 0 alone,
    # so the monitor adds a batch with no real sample (num_samples=0) there
    val_data = two_modality_dataset(NUM_VAL_DDP, seed=1)
    trainer.fit(TwoModalityNet(), loader(two_modality_dataset(48), batch_size=16), loader(val_data))

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 1
    first, second = ranks[0][0], ranks[1][0]
    # every rank logged the same keys with the same values, and kept the same history entry
    assert sorted(first["logged"]) == sorted(second["logged"])
    # bit-equal: every rank logs the values of the same all-reduce, not a computation of its own
    assert first["logged"] == second["logged"]
    assert first["history"] == second["history"]
    assert first["global_step"] == second["global_step"]

    model = TwoModalityNet()
    model.load_state_dict(torch.load(tmp_path / "weights.pt"))
    _, options, _ = build_case("combined")
    single = modality_contribution(model, loader(val_data), modalities, output_transform="softmax", **options)
    assert_options_took_effect(single, modalities, options, NUM_VAL_DDP)
    # Each rank runs other batches (16 + 1 rows) than the single process (16 + 16 + 1), so the per-sample values may
    # differ in the last float32 bits. A bootstrap that depended on the order the ranks delivered their samples in
    # would miss by the bootstrap's own noise (~1e-2), far more than the tolerance.
    expected = expected_history_entry(single, 0, first["global_step"])
    assert_same_numbers(first["history"], expected, "rank 0 history")
    assert_logged(first["logged"], single, OUTPUT_NAMES)
