"""A fit stopped and resumed from a checkpoint continues the monitor's history as if it had never stopped."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mc import ModalityContributionMonitor

from helpers import TwoModalityNet, loader, trainer_kwargs, two_modality_dataset

MODALITIES = {"image": 0, "table": 1}


def _fit(tmp_path, max_epochs: int, monitor: ModalityContributionMonitor | None, ckpt_path=None) -> L.Trainer:
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    callbacks = [checkpoint] if monitor is None else [monitor, checkpoint]
    trainer = L.Trainer(
        callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=max_epochs, enable_checkpointing=True)
    )
    trainer.fit(
        TwoModalityNet(),
        loader(two_modality_dataset(48)),
        loader(two_modality_dataset(32, seed=1)),
        ckpt_path=ckpt_path,
    )
    return trainer


def test_a_resumed_fit_continues_the_history_of_an_uninterrupted_one(tmp_path) -> None:
    uninterrupted = ModalityContributionMonitor(MODALITIES, output_transform="softmax")
    _fit(tmp_path / "straight", 4, uninterrupted)

    first = ModalityContributionMonitor(MODALITIES, output_transform="softmax")
    _fit(tmp_path / "split", 2, first)
    last = tmp_path / "split" / "ckpt" / "last.ckpt"
    stored = torch.load(last, weights_only=False)["callbacks"][first.state_key]
    assert [entry["epoch"] for entry in stored["history"]] == [0, 1]

    resumed = ModalityContributionMonitor(MODALITIES, output_transform="softmax")  # a new process: empty history
    trainer = _fit(tmp_path / "split", 4, resumed, ckpt_path=last)
    assert [entry["epoch"] for entry in resumed.history] == [0, 1, 2, 3]
    assert [entry["global_step"] for entry in resumed.history] == [3, 6, 9, 12]
    assert resumed.history[:2] == first.history
    for got, want in zip(resumed.history, uninterrupted.history):
        assert got["epoch"] == want["epoch"]
        assert got["num_samples"] == want["num_samples"] == 32
        assert got["shares"] == pytest.approx(want["shares"], abs=1e-6)
        assert got["raw"] == pytest.approx(want["raw"], abs=1e-6)
    assert trainer.callback_metrics["mc/share/image"].item() == pytest.approx(resumed.history[-1]["shares"]["image"])


def test_resuming_a_checkpoint_written_without_the_monitor_starts_an_empty_history(tmp_path) -> None:
    _fit(tmp_path, 1, None)
    monitor = ModalityContributionMonitor(MODALITIES)
    _fit(tmp_path, 2, monitor, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [entry["epoch"] for entry in monitor.history] == [1]
