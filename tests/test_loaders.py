"""Which validation batches the monitor measures: loaders, limits and frequencies as the docstring documents."""

import warnings
from typing import Any

import lightning as L
import pytest
import torch

from lightning_mc import ModalityContributionMonitor
from lightning_mc.functional import modality_contribution

from helpers import TwoModalityNet, assert_same_numbers, loader, trainer_kwargs, two_modality_dataset

MODALITIES = {"image": 0, "table": 1}
EMPTY_MESSAGE = "ModalityContributionMonitor measured no batch of validation dataloader"


class TwoLoaderNet(TwoModalityNet):
    """Validation with several dataloaders needs ``dataloader_idx`` in ``validation_step``."""

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().validation_step(batch, batch_idx)


def _fit(tmp_path, monitor, val, model=None, **overrides: Any) -> tuple[L.Trainer, L.LightningModule]:
    torch.manual_seed(0)
    model = model or TwoLoaderNet()
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(model, loader(two_modality_dataset(64), batch_size=16), val)
    return trainer, model


@pytest.mark.parametrize("container", ["list", "dict"])
def test_dataloader_idx_picks_one_loader_of_a_list_or_dict(tmp_path, container: str) -> None:
    first, second = two_modality_dataset(16, seed=1), two_modality_dataset(24, seed=2)
    val = [loader(first, 8), loader(second, 8)]
    if container == "dict":
        val = {"first": val[0], "second": val[1]}
    monitor = ModalityContributionMonitor(MODALITIES, output_transform="softmax", dataloader_idx=1)
    trainer, model = _fit(tmp_path, monitor, val, max_epochs=1)
    offline = modality_contribution(model, loader(second, 8), MODALITIES, output_transform="softmax")
    assert monitor.history[-1]["num_samples"] == 24
    for name in MODALITIES:
        assert_same_numbers(
            trainer.callback_metrics[f"mc/share/{name}"].item(), offline.shares[name], f"mc/share/{name}"
        )
        assert_same_numbers(trainer.callback_metrics[f"mc/raw/{name}"].item(), offline.raw[name], f"mc/raw/{name}")


def test_a_single_loader_is_dataloader_0(tmp_path) -> None:
    monitor = ModalityContributionMonitor(MODALITIES)
    _fit(tmp_path, monitor, loader(two_modality_dataset(20, seed=1), 8), model=TwoModalityNet(), max_epochs=1)
    assert monitor.history[-1]["num_samples"] == 20


def test_limit_val_batches_and_limit_batches_combine(tmp_path) -> None:
    val = loader(two_modality_dataset(48, seed=1), 8)  # 6 batches
    trainer_limit = ModalityContributionMonitor(MODALITIES)
    _fit(tmp_path, trainer_limit, val, limit_val_batches=4, max_epochs=1)
    both = ModalityContributionMonitor(MODALITIES, limit_batches=0.5)  # half of the 4 batches the trainer runs
    _fit(tmp_path, both, val, limit_val_batches=4, max_epochs=1)
    count = ModalityContributionMonitor(MODALITIES, limit_batches=3)
    _fit(tmp_path, count, val, max_epochs=1)
    assert trainer_limit.history[-1]["num_samples"] == 32
    assert both.history[-1]["num_samples"] == 16
    assert count.history[-1]["num_samples"] == 24


def test_check_val_every_n_epoch_and_every_n_epochs_must_both_select_an_epoch(tmp_path) -> None:
    val = loader(two_modality_dataset(16, seed=1), 8)
    trainer_only = ModalityContributionMonitor(MODALITIES)
    _fit(tmp_path, trainer_only, val, check_val_every_n_epoch=2, max_epochs=4)
    both = ModalityContributionMonitor(MODALITIES, every_n_epochs=2)
    _fit(tmp_path, both, val, check_val_every_n_epoch=2, max_epochs=4)
    disjoint = ModalityContributionMonitor(MODALITIES, every_n_epochs=3)  # epoch 2 is measured only if validated
    _fit(tmp_path, disjoint, val, check_val_every_n_epoch=2, max_epochs=4)
    assert [entry["epoch"] for entry in trainer_only.history] == [1, 3]
    assert [entry["epoch"] for entry in both.history] == [1, 3]
    assert disjoint.history == []


def test_val_check_interval_below_one_measures_every_validation_run_of_a_selected_epoch(tmp_path) -> None:
    val = loader(two_modality_dataset(16, seed=1), 8)
    monitor = ModalityContributionMonitor(MODALITIES)
    _fit(tmp_path, monitor, val, val_check_interval=0.5, max_epochs=2)  # 4 training batches per epoch
    assert [(entry["epoch"], entry["global_step"]) for entry in monitor.history] == [(0, 2), (0, 4), (1, 6), (1, 8)]
    assert all(entry["num_samples"] == 16 for entry in monitor.history)
    second = ModalityContributionMonitor(MODALITIES, every_n_epochs=2)
    _fit(tmp_path, second, val, val_check_interval=0.5, max_epochs=2)
    assert [(entry["epoch"], entry["global_step"]) for entry in second.history] == [(1, 6), (1, 8)]


def _empty_fit(tmp_path, monitor, val, model) -> tuple[L.Trainer, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = _fit(tmp_path, monitor, val, model=model, max_epochs=3)
    return trainer, [str(w.message) for w in caught if EMPTY_MESSAGE in str(w.message)]


def test_an_empty_loader_logs_nothing_and_warns_once(tmp_path) -> None:
    empty = loader(two_modality_dataset(0, seed=1), 8)
    only = ModalityContributionMonitor(MODALITIES)  # Lightning skips the validation run altogether
    trainer, messages = _empty_fit(tmp_path, only, empty, TwoModalityNet())
    assert messages == [
        f"{EMPTY_MESSAGE} 0 (the loader is empty or limit_batches excluded every batch); nothing is logged."
    ]
    assert not any(key.startswith("mc/") for key in trainer.callback_metrics)
    assert only.history == []

    beside = ModalityContributionMonitor(MODALITIES, dataloader_idx=1)  # the other loader still runs
    trainer, messages = _empty_fit(
        tmp_path, beside, [loader(two_modality_dataset(16, seed=1), 8), empty], TwoLoaderNet()
    )
    assert len(messages) == 1
    assert "dataloader 1" in messages[0]
    assert not any(key.startswith("mc/") for key in trainer.callback_metrics)
    assert beside.history == []
