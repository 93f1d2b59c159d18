"""Keeping the pre-collapse model: collapse_start_epoch, and the checkpoint ModelCheckpoint keeps is from before it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from lightning_mc import CollapseEarlyStopping, ModalityContributionMonitor
from lightning_mc.functional import modality_contribution

from helpers import NUM_CLASSES, PlantedModule, ScheduledContributionNet, loader, trainer_kwargs, two_modality_dataset

MODALITIES = {"image": 0, "table": 1}
BALANCED = (1.0, 1.0)
COLLAPSED = (0.002, 1.0)


class PlantedCollapseNet(PlantedModule):
    """Fixed linear branches scaled per epoch by a schedule; the scales are buffers, so a checkpoint holds them.

    The shares at an epoch follow the schedule (see ``helpers.ScheduledContributionNet``); a trained bias makes the
    weights of every epoch differ, so restoring a checkpoint restores one epoch's model and no other.
    """

    def __init__(self, schedule: list[tuple[float, float]]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.schedule = schedule
        self.register_buffer("scales", torch.tensor(schedule[0]))
        self.image_head = nn.Linear(64, NUM_CLASSES)
        self.table_head = nn.Linear(5, NUM_CLASSES)
        self.bias = nn.Parameter(torch.zeros(NUM_CLASSES))
        for parameter in (*self.image_head.parameters(), *self.table_head.parameters()):
            parameter.requires_grad_(False)

    def on_train_epoch_start(self) -> None:
        self.scales.copy_(torch.tensor(self.schedule[min(self.current_epoch, len(self.schedule) - 1)]))

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return self.scales[0] * self.image_head(image.flatten(1)) + self.scales[1] * self.table_head(table) + self.bias


def _fit(tmp_path: Path, model: L.LightningModule, stopper: CollapseEarlyStopping, *extra: L.Callback, **overrides):
    monitor = ModalityContributionMonitor(MODALITIES, occlusion="zeros")
    trainer = L.Trainer(
        callbacks=[monitor, stopper, *extra], **trainer_kwargs(tmp_path, **{"max_epochs": 8, **overrides})
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(model, loader(two_modality_dataset(32, seed=0)), loader(two_modality_dataset(32, seed=1)))
    return trainer, monitor


def _image_share(model: L.LightningModule) -> float:
    result = modality_contribution(
        model.eval(), loader(two_modality_dataset(32, seed=1)), MODALITIES, occlusion="zeros"
    )
    return result.shares["image"]


def test_the_best_balanced_checkpoint_is_from_before_the_collapse_and_restores_that_model(tmp_path) -> None:
    # the image share rises to balance, declines, and collapses from epoch 4 on (the stopper flags it at epoch 5)
    schedule = [(4.0, 1.0), (2.0, 1.0), (1.0, 1.0), (0.5, 1.0), COLLAPSED]
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2)
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="mc/balance", mode="max", filename="{epoch}")
    every = ModelCheckpoint(dirpath=tmp_path / "every", save_top_k=-1, filename="{epoch}")
    trainer, monitor = _fit(tmp_path, PlantedCollapseNet(schedule), stopper, best, every, enable_checkpointing=True)

    assert stopper.collapse_start_epoch == 4 and stopper.collapse_epoch == stopper.stopped_epoch == 5
    balances = [entry["balance"] for entry in monitor.history]
    best_epoch = torch.load(best.best_model_path, weights_only=False)["epoch"]
    assert best_epoch == max(range(len(balances)), key=balances.__getitem__)  # the highest mc/balance
    assert best_epoch < stopper.collapse_start_epoch
    restored = PlantedCollapseNet.load_from_checkpoint(best.best_model_path)
    share = _image_share(restored)  # measured again, offline, on the restored model
    assert share == pytest.approx(monitor.history[best_epoch]["shares"]["image"], abs=1e-5)
    assert share > 0.3 and _image_share(trainer.lightning_module) < 0.05  # the final model is the collapsed one

    # the other recipe: keep every epoch, restore the last one before the collapse began
    before = PlantedCollapseNet.load_from_checkpoint(
        tmp_path / "every" / f"epoch={stopper.collapse_start_epoch - 1}.ckpt"
    )
    share = _image_share(before)
    assert share == pytest.approx(monitor.history[stopper.collapse_start_epoch - 1]["shares"]["image"], abs=1e-5)
    assert share >= stopper.min_share


def test_collapse_start_is_the_first_check_of_the_run_that_was_flagged_not_an_earlier_dip(tmp_path) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2)
    _fit(tmp_path, ScheduledContributionNet([BALANCED, COLLAPSED, BALANCED, COLLAPSED]), stopper)
    assert [entry["shares"]["image"] < 0.05 for entry in stopper.history] == [False, True, False, True, True]
    assert stopper.collapse_start_epoch == 3 and stopper.collapse_epoch == 4
    assert "epochs 3–4" in stopper.collapse_message


def test_collapse_start_epoch_is_checkpointed_and_restored(tmp_path) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2, warmup_epochs=1, action="warn")
    with pytest.warns(UserWarning, match="collapsed"):
        _fit(tmp_path, ScheduledContributionNet([COLLAPSED, BALANCED, COLLAPSED]), stopper, max_epochs=5)
    assert stopper.collapse_start_epoch == 2 and stopper.collapse_epoch == 3  # epoch 0 was below, but in warm-up
    state = stopper.state_dict()
    assert state["collapse_start_epoch"] == 2

    restored = CollapseEarlyStopping(min_share=0.05, patience=2, warmup_epochs=1, action="warn")
    restored.load_state_dict(state)
    assert restored.collapse_start_epoch == 2 and restored.state_dict() == state
    restored.load_state_dict({})  # a checkpoint without the stopper
    assert restored.collapse_start_epoch is None and restored.collapse_epoch is None


def test_no_collapse_means_no_collapse_start(tmp_path) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2)
    _fit(tmp_path, ScheduledContributionNet([BALANCED]), stopper, max_epochs=3)
    assert stopper.collapse_start_epoch is None and stopper.state_dict()["collapse_start_epoch"] is None
