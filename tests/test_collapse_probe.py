"""CollapseEarlyStopping(labels=...): a low share is confirmed by a linear probe before the stopper stops.

The shares are planted (``helpers.ScheduledContributionNet``: frozen branches scaled per epoch) and so is what each
modality knows of the labels (``helpers.planted_dataset``): an informative modality the network ignores is a collapse
and stops the run; a pure-noise one is reported as uninformative and does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_mc import CollapseEarlyStopping, ModalityBalancer, ModalityContributionMonitor
from lightning_mc.analyses.probe import linear_probe
from lightning_mc.callbacks.early_stopping import LABEL_FREE_LIMIT

from helpers import ScheduledContributionNet, assert_same_numbers, fit_scheduled, planted_dataset

BALANCED = (1.0, 1.0)
IMAGE_LOW = (0.002, 1.0)  # the image branch scaled down 500×: the image share falls far below 0.05
TABLE_LOW = (1.0, 0.002)
#: The image carries the label, the table is pure noise.
IMAGE_KNOWS = (planted_dataset(96, seed=0), planted_dataset(90, seed=1))
SCHEDULED_ENCODERS = {"image": "image_head", "table": "table_head"}


def test_an_ignored_informative_modality_is_confirmed_by_the_probe_and_stops_the_run(tmp_path) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2, labels=2)
    trainer, monitor = fit_scheduled(tmp_path, [BALANCED, IMAGE_LOW], stopper, data=IMAGE_KNOWS, max_epochs=6)

    assert stopper.stopped_epoch == 2 and trainer.current_epoch == 3  # epochs 1 and 2 below, then stopped
    result = stopper.probe_results["image"]
    assert result.informative and result.score > 0.9  # the planted row of the image gives the label away
    assert (result.metric, result.chance, result.num_samples, result.features) == (
        "balanced accuracy",
        1 / 3,
        90,
        "input",
    )
    images, _, labels = IMAGE_KNOWS[1].tensors
    assert_same_numbers(result.score, linear_probe(images.flatten(1), labels).score)  # the rows the monitor measured
    assert stopper.collapsed_modality == "image" and stopper.reports == [stopper.collapse_message]
    assert (
        "yet its input alone predicts the labels, a linear probe scores balanced accuracy" in stopper.collapse_message
    )
    assert "an informative modality, abandoned. Signaling Trainer to stop." in stopper.collapse_message
    assert f"it fell from {monitor.history[0]['shares']['image']:.2f} (epoch 0)" in stopper.collapse_message
    assert set(stopper.probe_results) == {"image"}  # only the flagged modality was probed, only once


def test_an_ignored_pure_noise_modality_is_reported_uninformative_and_not_stopped_on(tmp_path) -> None:
    schedule = [BALANCED, TABLE_LOW, TABLE_LOW, TABLE_LOW, BALANCED, TABLE_LOW, TABLE_LOW]
    with_labels = CollapseEarlyStopping(min_share=0.05, patience=2, labels=2)
    label_free = CollapseEarlyStopping(min_share=0.05, patience=2, action="warn")
    assert with_labels.state_key != label_free.state_key
    with pytest.warns(UserWarning, match=LABEL_FREE_LIMIT):
        trainer, _ = fit_scheduled(tmp_path, schedule, with_labels, label_free, data=IMAGE_KNOWS)

    assert with_labels.stopped_epoch is None and trainer.current_epoch == 7 and with_labels.collapsed_modality is None
    # probed when its low share reached patience, at epoch 2; not again while it stayed low; again after it recovered
    assert [entry["uninformative"] for entry in with_labels.history] == [[], [], ["table"], [], [], [], ["table"]]
    assert [entry["wait_count"]["table"] for entry in with_labels.history] == [0, 1, 2, 3, 0, 1, 2]
    result = with_labels.probe_results["table"]
    assert result.decided and not result.informative and abs(result.score - 1 / 3) < 0.12
    assert with_labels.uninformative_modalities == ("table",)
    assert len(with_labels.reports) == 2
    assert with_labels.reports[0].startswith(
        "Modality 'table' is uninformative on this validation set, not collapsed: mc/share/table = "
    )
    assert "and its input alone does not predict the labels" in with_labels.reports[0]
    assert with_labels.reports[0].endswith("it has nothing to give here. Training continues.")
    # label-free, the same shares are a collapse, and the message says what it cannot know
    assert label_free.collapsed_modality == "table" and label_free.collapse_epoch == 2
    assert label_free.collapse_message.endswith(f"the network ignores it; {LABEL_FREE_LIMIT}. Training continues "
                                                "(action='warn').")  # fmt: skip


class EncodedScheduledNet(ScheduledContributionNet):
    """The scheduled net whose validation step runs the model, as a real one does: the encoders' hooks see it."""

    def validation_step(self, batch, batch_idx) -> None:
        image, table, _ = batch
        self(image, table)


def test_with_the_monitors_encoders_the_probe_fits_their_outputs(tmp_path) -> None:
    monitor = ModalityContributionMonitor({"image": 0, "table": 1}, occlusion="zeros", encoders=SCHEDULED_ENCODERS)
    stopper = CollapseEarlyStopping(min_share=0.05, patience=1, labels=2)
    model = EncodedScheduledNet([IMAGE_LOW])
    fit_scheduled(tmp_path, [IMAGE_LOW], stopper, data=IMAGE_KNOWS, monitor=monitor, model=model, max_epochs=2)

    result = stopper.probe_results["image"]
    assert result.features == "encoder output ('image_head')" and result.num_features == 3  # the head's 3 logits
    images, _, labels = IMAGE_KNOWS[1].tensors
    with torch.no_grad():
        encoded = model.image_head(images.flatten(1))
    assert_same_numbers(result.score, linear_probe(encoded, labels).score)
    assert stopper.stopped_epoch == 0 and "its encoder output ('image_head') alone predicts" in stopper.collapse_message


def test_a_probe_that_cannot_decide_leaves_the_stopper_label_free(tmp_path) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=1, labels=2)
    data = (IMAGE_KNOWS[0], planted_dataset(12, seed=1))  # 12 validation samples: too few to decide
    fit_scheduled(tmp_path, [IMAGE_LOW], stopper, data=data, max_epochs=2)
    assert stopper.stopped_epoch == 0 and not stopper.probe_results["image"].decided
    assert "the probe could not decide (12 samples, fewer than 20), so it is flagged as without labels" in (
        stopper.collapse_message
    )


def test_the_balancer_leaves_out_a_modality_the_probe_found_uninformative(tmp_path) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=1, labels=2, action="warn")
    balancer = ModalityBalancer(SCHEDULED_ENCODERS, dropout=0.0)  # after the stopper: reads this check's verdict
    fit_scheduled(tmp_path / "probed", [TABLE_LOW], stopper, balancer, data=IMAGE_KNOWS, max_epochs=3)
    assert stopper.uninformative_modalities == ("table",) and balancer.uninformative_modalities == ("table",)
    assert [entry["active"] for entry in balancer.history] == [False, False, False]
    assert [entry["uninformative"] for entry in balancer.history] == [["table"]] * 3
    assert balancer.coefficients == {"image": 1.0, "table": 1.0}

    alone = ModalityBalancer(SCHEDULED_ENCODERS, dropout=0.0)  # the same shares without a verdict: it engages
    fit_scheduled(tmp_path / "alone", [TABLE_LOW], alone, data=IMAGE_KNOWS, max_epochs=3)
    assert [entry["active"] for entry in alone.history] == [True, True, True] and alone.coefficients["image"] < 0.01


def test_a_verdict_that_comes_later_releases_an_engaged_balancer(tmp_path, caplog) -> None:
    balancer = ModalityBalancer(SCHEDULED_ENCODERS, dropout=0.0)  # before the stopper: the verdict of a check
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2, labels=2, action="warn")  # arrives at the next one
    with caplog.at_level("INFO"):
        fit_scheduled(tmp_path, [TABLE_LOW], balancer, stopper, data=IMAGE_KNOWS, max_epochs=3)
    assert [entry["active"] for entry in balancer.history] == [True, True, False]  # the verdict is from epoch 1
    assert balancer.history[-1]["event"] == "released"
    assert any("not counting 'table': uninformative on this validation set" in r.getMessage() for r in caplog.records)


def test_labels_and_probe_margin_are_checked_at_construction() -> None:
    with pytest.raises(TypeError, match=r"labels=2\.5 must be None, a dict key, a tuple index or a callable"):
        CollapseEarlyStopping(labels=2.5)
    with pytest.raises(TypeError, match="labels=True"):
        CollapseEarlyStopping(labels=True)
    with pytest.raises(ValueError, match=r"probe_margin=0 must be a number in \(0, 1\) \(above chance\)"):
        CollapseEarlyStopping(labels=2, probe_margin=0)
    assert CollapseEarlyStopping(labels=lambda batch: batch[2]).labels is not None


def test_labels_that_are_not_classes_are_refused_at_the_probe(tmp_path) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=1, labels=lambda batch: batch[0][:, 0, 0, 0])
    with pytest.raises(ValueError, match="labels= selected continuous values"):
        fit_scheduled(tmp_path, [IMAGE_LOW], stopper, data=IMAGE_KNOWS, max_epochs=1)


class RecordProbe(L.Callback):
    """Each ddp_spawn worker writes the probe result its stopper holds at the end of fit."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_fit_end(self, trainer, pl_module) -> None:
        stopper = next(cb for cb in trainer.callbacks if isinstance(cb, CollapseEarlyStopping))
        record = {
            "stopped_epoch": stopper.stopped_epoch,
            "probe": {
                key: value for key, value in stopper.probe_results["image"].as_dict().items() if key != "seconds"
            },
        }
        Path(self.directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_ddp_spawn_ranks_fit_the_probe_on_every_rank_rows_and_agree_with_one_process(tmp_path) -> None:
    data = (planted_dataset(64, seed=0), planted_dataset(33, seed=1))  # 33: DistributedSampler pads rank 1 by one
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2, labels=2)
    schedule = [BALANCED, IMAGE_LOW]
    fit_scheduled(tmp_path, schedule, stopper, RecordProbe(str(tmp_path)), data=data, max_epochs=4,
                  strategy="ddp_spawn", devices=2)  # fmt: skip
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["stopped_epoch"] == 2
    probe = ranks[0]["probe"]
    assert probe["num_samples"] == 33 and probe["informative"]  # the padding repeat is not counted
    images, _, labels = data[1].tensors
    assert_same_numbers(probe["score"], linear_probe(images.flatten(1), labels).score)  # the dataset's order
