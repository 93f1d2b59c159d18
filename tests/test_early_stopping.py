"""CollapseEarlyStopping: stops on a planted collapse, and only then; warm-up, NaN, resume, DDP, the demo."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mc import CollapseEarlyStopping, ModalityContributionMonitor

from helpers import (
    ScheduledContributionNet,
    fit_scheduled,
    load_example,
    loader,
    trainer_kwargs,
    two_modality_dataset,
)

MODALITIES = {"image": 0, "table": 1}
BALANCED = (1.0, 1.0)
COLLAPSED = (0.002, 1.0)  # the image branch scaled down 500×: its share falls far below any threshold used here


def _fit(
    tmp_path: Path, schedule: list[tuple[float, float]], stopper: CollapseEarlyStopping | None, **overrides: Any
) -> tuple[L.Trainer, ModalityContributionMonitor]:
    callbacks = ([stopper] if stopper is not None else []) + overrides.pop("extra_callbacks", [])
    return fit_scheduled(tmp_path, schedule, *callbacks, **{"max_epochs": 8, **overrides})


def _first_epoch_below(monitor: ModalityContributionMonitor, name: str, threshold: float) -> int:
    return next(entry["epoch"] for entry in monitor.history if entry["shares"][name] < threshold)


def test_planted_collapse_is_stopped_exactly_patience_checks_after_the_share_falls_below(tmp_path) -> None:
    schedule = [BALANCED, BALANCED, BALANCED, COLLAPSED]
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2)
    trainer, monitor = _fit(tmp_path, schedule, stopper)

    assert monitor.history[0]["shares"]["image"] > 0.3  # the image really contributed before the collapse
    first_below = _first_epoch_below(monitor, "image", 0.05)
    assert first_below == 3
    assert stopper.stopped_epoch == first_below + stopper.patience - 1 == 4
    assert trainer.current_epoch == 5  # the epoch counter moves past the stopped epoch, as with EarlyStopping
    assert [entry["epoch"] for entry in monitor.history] == [0, 1, 2, 3, 4]
    assert stopper.collapsed_modality == "image"
    assert stopper.collapse_epoch == 4
    assert stopper.collapse_share == pytest.approx(monitor.history[4]["shares"]["image"])
    assert stopper.collapse_share < 0.05
    assert "'image' collapsed" in stopper.collapse_message
    assert "epochs 3–4" in stopper.collapse_message
    assert f"{0.05 - stopper.collapse_share:.4f} below the threshold" in stopper.collapse_message
    assert [entry["wait_count"]["image"] for entry in stopper.history] == [0, 0, 0, 1, 2]
    assert [entry["collapsed"] for entry in stopper.history] == [None, None, None, None, "image"]


def test_balanced_control_runs_every_epoch(tmp_path) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=1)
    trainer, monitor = _fit(tmp_path, [BALANCED], stopper, max_epochs=5)
    assert trainer.current_epoch == 5 and len(monitor.history) == 5
    assert min(min(entry["shares"].values()) for entry in monitor.history) > 0.05
    assert stopper.stopped_epoch is None and stopper.collapsed_modality is None and stopper.collapse_message is None
    assert all(count == 0 for count in stopper.wait_count.values())


def test_warmup_epochs_are_recorded_but_not_counted(tmp_path) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2, warmup_epochs=3)
    _, monitor = _fit(tmp_path, [COLLAPSED], stopper)
    assert monitor.history[0]["shares"]["image"] < 0.05  # collapsed from the very first check
    assert [entry["counted"] for entry in stopper.history] == [False, False, False, True, True]
    assert stopper.stopped_epoch == 4  # epochs 3 and 4 are the first two counted checks


def test_a_subset_of_modalities_is_watched(tmp_path) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=1, modalities=["table"])
    trainer, _ = _fit(tmp_path, [COLLAPSED], stopper, max_epochs=3)
    assert stopper.watched_modalities == ("table",)
    assert stopper.stopped_epoch is None and trainer.current_epoch == 3


def test_warn_action_flags_the_collapse_and_training_goes_on(tmp_path) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2, action="warn")
    with pytest.warns(UserWarning, match="'image' collapsed"):
        trainer, _ = _fit(tmp_path, [BALANCED, COLLAPSED], stopper, max_epochs=6)
    assert trainer.current_epoch == 6
    assert stopper.collapsed_modality == "image" and stopper.collapse_epoch == 2
    assert stopper.stopped_epoch is None
    assert [entry["collapsed"] for entry in stopper.history].count("image") == 1  # flagged once, not every epoch


def test_nan_shares_neither_stop_nor_reset_the_count_and_warn(tmp_path) -> None:
    silent = (0.0, 0.0)  # no occlusion moves any output: shares are NaN
    schedule = [COLLAPSED, silent, silent, silent, COLLAPSED, BALANCED]
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2)
    with pytest.warns(UserWarning, match="mc/share/image, mc/share/table NaN at epoch 1"):
        _, monitor = _fit(tmp_path, schedule, stopper)
    assert all(math.isnan(monitor.history[epoch]["shares"]["image"]) for epoch in (1, 2, 3))
    # epoch 0 counts 1, the NaN epochs 1-3 keep it at 1 (no stop, no reset), epoch 4 makes it 2: stop
    assert [entry["wait_count"]["image"] for entry in stopper.history] == [1, 1, 1, 1, 2]
    assert stopper.stopped_epoch == 4


def test_state_dict_round_trip_restores_the_count() -> None:
    stopper = CollapseEarlyStopping(min_share=0.1, patience=3)
    stopper.wait_count = {"image": 2, "table": 0}
    stopper._below_since = {"image": 5}
    stopper._last_check = (6, 70)
    stopper.history = [{"epoch": 6, "global_step": 70, "shares": {"image": 0.04}, "counted": True}]
    restored = CollapseEarlyStopping(min_share=0.1, patience=3)
    restored.load_state_dict(json.loads(json.dumps(stopper.state_dict())))  # plain, serialisable values
    assert restored.state_dict() == stopper.state_dict()
    assert restored.wait_count == {"image": 2, "table": 0} and restored._last_check == (6, 70)
    old = CollapseEarlyStopping()
    old.load_state_dict({})  # a checkpoint written before a key existed
    assert old.wait_count == {} and old.stopped_epoch is None and old.history == []


def test_resumed_fit_continues_the_count(tmp_path) -> None:
    schedule = [BALANCED, BALANCED, COLLAPSED]
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = CollapseEarlyStopping(min_share=0.05, patience=3)
    _fit(tmp_path, schedule, first, max_epochs=4, enable_checkpointing=True, extra_callbacks=[checkpoint])
    assert first.stopped_epoch is None and first.wait_count["image"] == 2  # epochs 2 and 3 counted

    resumed = CollapseEarlyStopping(min_share=0.05, patience=3)
    _, monitor = _fit(tmp_path, schedule, resumed, max_epochs=10, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [entry["epoch"] for entry in monitor.history] == [0, 1, 2, 3, 4]  # the monitor's history is restored too
    assert resumed.stopped_epoch == 4  # 2 counted before the resume + epoch 4; a fresh count would stop at 6
    assert [entry["wait_count"]["image"] for entry in resumed.history] == [0, 0, 1, 2, 3]


def test_setup_without_a_monitor_names_the_fix(tmp_path) -> None:
    trainer = L.Trainer(callbacks=[CollapseEarlyStopping()], **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(RuntimeError, match=r"has none\. Add one"):
        trainer.fit(ScheduledContributionNet([BALANCED]), loader(two_modality_dataset(16)))


def test_unknown_watched_modality_is_rejected_at_setup(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"\['audio'\] not measured by the monitor; valid names: \['image', 'table'\]"):
        _fit(tmp_path, [BALANCED], CollapseEarlyStopping(modalities="audio"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_share": 0.0}, r"min_share=0.0 must be a number in \(0, 1\)"),
        ({"min_share": 1.5}, r"min_share=1.5"),
        ({"patience": 0}, r"patience=0 must be a positive int"),
        ({"warmup_epochs": -1}, r"warmup_epochs=-1 must be a non-negative int"),
        ({"action": "halt"}, r"action='halt' must be one of 'stop', 'warn'"),
        ({"modalities": []}, r"modalities=\[\] must be None"),
        ({"modalities": ["a", "a"]}, r"more than once"),
    ],
)
def test_invalid_arguments_name_the_argument_and_what_is_valid(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CollapseEarlyStopping(**kwargs)


class _RecordDecision(L.Callback):
    """Writes each rank's view of the stopper to ``<dirpath>/rank<r>.json`` at the end of fit."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stopper = next(cb for cb in trainer.callbacks if isinstance(cb, CollapseEarlyStopping))
        monitor = next(cb for cb in trainer.callbacks if isinstance(cb, ModalityContributionMonitor))
        record = {
            "stopped_epoch": stopper.stopped_epoch,
            "collapsed_modality": stopper.collapsed_modality,
            "current_epoch": trainer.current_epoch,
            "image_shares": [entry["shares"]["image"] for entry in monitor.history],
            "num_samples": [entry["num_samples"] for entry in monitor.history],
        }
        Path(self.dirpath, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_ddp_spawn_both_ranks_stop_at_the_same_epoch(tmp_path) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2)
    _fit(
        tmp_path,
        [BALANCED, BALANCED, COLLAPSED],
        stopper,
        strategy="ddp_spawn",
        devices=2,
        extra_callbacks=[_RecordDecision(str(tmp_path))],
    )
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]  # same shares (reduced across ranks), same decision, same epoch
    assert ranks[0]["stopped_epoch"] == 3 and ranks[0]["collapsed_modality"] == "image"
    assert ranks[0]["current_epoch"] == 4
    assert ranks[0]["num_samples"] == [32] * 4  # each rank measured 16 samples; the shares cover all 32
    assert ranks[0]["image_shares"][2] < 0.05 < ranks[0]["image_shares"][1]


def test_demo_collapse_happens_during_training_and_is_stopped_and_the_control_is_not() -> None:
    demo = load_example("collapse_demo")
    settings = {"min_share": 0.1, "patience": 2, "warmup_epochs": 2, "logdir": None, "verbose": False}
    monitor, stopper, _ = demo.run("collapse", demo.SHORTCUT, epochs=20, **settings)
    image = [entry["shares"]["image"] for entry in monitor.history]
    assert image[0] > 0.5  # the image leads at first: the collapse is learned, not built in
    assert stopper.collapsed_modality == "image" and stopper.stopped_epoch is not None
    assert stopper.stopped_epoch < 19
    assert image[-1] < 0.1 and image[-2] < 0.1 and min(image[:-2]) >= 0.1
    # labels=2: the probe of the epoch's training images (a reservoir of 1024 of the 1350) and the 447 validation
    # images confirmed the collapse, and the message says so
    [result] = stopper.probe_results["image"]
    assert result.verdict == "informative" and set(stopper.probe_results) == {"image"}
    assert (result.num_train, result.num_val, result.epoch) == (1024, 447, stopper.collapse_epoch)
    assert result.low > result.threshold and result.score > 0.4  # ten noisy digits: chance 0.10
    assert f"a linear probe scores {result.describe()}: an informative modality, abandoned." in stopper.collapse_message

    monitor, stopper, trainer = demo.run("balanced", demo.HINT, epochs=5, **settings)
    assert stopper.collapsed_modality is None and trainer.current_epoch == 5
    assert min(min(entry["shares"].values()) for entry in monitor.history[2:]) > 0.3
