"""ModalityContributionMonitor in a real Trainer.fit."""

from typing import Any

import lightning as L
import pytest
import torch

from lightning_mc import ModalityContributionMonitor
from lightning_mc.functional import modality_contribution

from helpers import (
    MODALITIES,
    ScheduledContributionNet,
    TwoModalityNet,
    assert_same_numbers,
    loader,
    trainer_kwargs,
    two_modality_dataset,
)

KEYS = {"mc/share/image", "mc/share/table", "mc/raw/image", "mc/raw/table", "mc/balance"}


class BatchSnapshot(L.Callback):
    """Placed before the monitor: remembers each validation batch and the module's mode."""

    def __init__(self) -> None:
        self.batch: list[torch.Tensor] = []
        self.training = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.batch = [t.clone() for t in batch]
        self.training = [m.training for m in pl_module.modules()]


class BatchCheck(L.Callback):
    """Placed after the monitor: the batch and the module's mode are what they were before it."""

    def __init__(self, snapshot: BatchSnapshot) -> None:
        self.snapshot = snapshot
        self.checked = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        for before, after in zip(self.snapshot.batch, batch, strict=True):
            assert torch.equal(before, after)
        assert [m.training for m in pl_module.modules()] == self.snapshot.training
        self.checked += 1


def _fit(tmp_path, monitor: ModalityContributionMonitor, **overrides: Any) -> tuple[L.Trainer, TwoModalityNet]:
    torch.manual_seed(0)
    model = TwoModalityNet()
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(model, loader(two_modality_dataset(48, seed=0)), loader(two_modality_dataset(32, seed=1)))
    return trainer, model


def test_fit_logs_the_keys_and_they_equal_the_functional_api_on_the_final_weights(tmp_path) -> None:
    monitor = ModalityContributionMonitor(MODALITIES, output_transform="softmax")
    trainer, model = _fit(tmp_path, monitor)
    assert KEYS <= set(trainer.callback_metrics)
    offline = modality_contribution(
        model, loader(two_modality_dataset(32, seed=1)), MODALITIES, output_transform="softmax"
    )
    for name in MODALITIES:
        assert_same_numbers(
            trainer.callback_metrics[f"mc/share/{name}"].item(), offline.shares[name], f"mc/share/{name}"
        )
        assert_same_numbers(trainer.callback_metrics[f"mc/raw/{name}"].item(), offline.raw[name], f"mc/raw/{name}")
    assert_same_numbers(trainer.callback_metrics["mc/balance"].item(), offline.balance, "mc/balance")
    assert 0.1 < offline.shares["image"] < 0.9  # both modalities carry signal in this data
    assert [entry["epoch"] for entry in monitor.history] == [0, 1]
    assert monitor.history[-1]["shares"] == pytest.approx(offline.shares, abs=1e-6)
    assert monitor.history[-1]["num_samples"] == 32


@pytest.mark.parametrize("normalization", ["ratio_of_sums", "per_sample", "per_sample_output"])
def test_each_check_starts_from_zero_and_equals_the_functional_api_at_that_epoch(tmp_path, normalization) -> None:
    # the monitor resets and reuses one metric across checks: no sum of an earlier epoch may leak into a later one
    schedule = [(1.0, 1.0), (1.0, 0.25), (0.1, 1.0)]
    monitor = ModalityContributionMonitor(MODALITIES, occlusion="zeros", normalization=normalization)
    model = ScheduledContributionNet(schedule)
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_epochs=3))
    trainer.fit(model, loader(two_modality_dataset(16, seed=0)), loader(two_modality_dataset(24, seed=1)))
    assert [entry["epoch"] for entry in monitor.history] == [0, 1, 2]
    for entry, (image_scale, table_scale) in zip(monitor.history, schedule, strict=True):
        model.image_scale, model.table_scale = image_scale, table_scale
        offline = modality_contribution(
            model, loader(two_modality_dataset(24, seed=1)), MODALITIES, occlusion="zeros", normalization=normalization
        )
        assert entry["shares"] == pytest.approx(offline.shares, abs=1e-6)
        assert entry["raw"] == pytest.approx(offline.raw, abs=1e-6)
        assert entry["num_samples"] == 24
    image_shares = [entry["shares"]["image"] for entry in monitor.history]
    assert image_shares[1] > image_shares[0] > image_shares[2]  # the planted schedule, not a running mean


def test_the_sanity_check_adds_nothing(tmp_path) -> None:
    monitor = ModalityContributionMonitor(MODALITIES)
    _fit(tmp_path, monitor, num_sanity_val_steps=2, max_epochs=1)
    assert len(monitor.history) == 1
    assert monitor.history[0]["num_samples"] == 32  # the two sanity batches were not counted


def test_the_batch_and_module_modes_are_unchanged_by_the_monitor(tmp_path) -> None:
    snapshot = BatchSnapshot()
    check = BatchCheck(snapshot)
    monitor = ModalityContributionMonitor(MODALITIES, occlusion="permute")
    torch.manual_seed(0)
    trainer = L.Trainer(callbacks=[snapshot, monitor, check], **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(TwoModalityNet(), loader(two_modality_dataset(48)), loader(two_modality_dataset(32, seed=1)))
    assert check.checked == 2
    assert len(monitor.history) == 1


def test_only_every_nth_epoch_is_measured_and_on_at_most_limit_batches(tmp_path) -> None:
    monitor = ModalityContributionMonitor(MODALITIES, every_n_epochs=2, limit_batches=1)
    _fit(tmp_path, monitor, max_epochs=4)
    assert [entry["epoch"] for entry in monitor.history] == [1, 3]
    assert all(entry["num_samples"] == 16 for entry in monitor.history)


def test_fast_dev_run_is_skipped_unless_asked(tmp_path) -> None:
    skipped = ModalityContributionMonitor(MODALITIES)
    _fit(tmp_path, skipped, fast_dev_run=True)
    asked = ModalityContributionMonitor(MODALITIES, run_on_fast_dev_run=True)
    _fit(tmp_path, asked, fast_dev_run=True)
    assert skipped.history == []
    assert len(asked.history) == 1


def test_history_round_trips_through_state_dict() -> None:
    monitor = ModalityContributionMonitor(MODALITIES)
    monitor.history.append({"epoch": 3, "global_step": 12, "shares": {"image": 0.25, "table": 0.75}})
    restored = ModalityContributionMonitor(MODALITIES)
    restored.load_state_dict(monitor.state_dict())
    assert restored.history == monitor.history
    restored.load_state_dict({})  # a checkpoint written before the monitor kept state
    assert restored.history == []
    key = "ModalityContributionMonitor{'modalities': ['image', 'table'], 'prefix': 'mc', 'dataloader_idx': 0}"
    assert monitor.state_key == key  # the same key for every monitor: its modalities, prefix and loader


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_epochs": 0}, "every_n_epochs=0"),
        ({"limit_batches": 0}, "limit_batches=0"),
        ({"limit_batches": 1.5}, "limit_batches=1.5"),
        ({"dataloader_idx": -1}, "dataloader_idx=-1"),
        ({"normalization": "mean"}, "normalization='mean'"),
        ({"occlusion": "blur"}, "occlusion='blur'"),
        ({"output_transform": "relu"}, "output_transform='relu'"),
        ({"max_batch_size": 0}, "max_batch_size=0"),
        ({"per_output": "logits"}, "per_output='logits'"),
        ({"per_output": ["cat", "cat"]}, "per_output=['cat', 'cat']"),
    ],
)
def test_invalid_arguments_fail_in_init_naming_the_argument(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        ModalityContributionMonitor(MODALITIES, **kwargs)
