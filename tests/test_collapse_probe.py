"""CollapseEarlyStopping(labels=...): a low share is checked by a linear probe; three verdicts, each as what it is.

The shares are planted (``helpers.ScheduledContributionNet``: frozen branches scaled per epoch) and so is what each
modality knows of the labels (``helpers.planted_dataset``): an informative modality the network ignores is a collapse
and stops the run; a pure-noise one is reported as uninformative and does not; a probe without the samples to tell
says undecided, and the stopper acts as ``undecided=`` says. The probe learns from the epoch's training rows and the
validation rows together (the loaders here are not shuffled: the reservoir holds every training row).
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
#: The image carries the label, the table is pure noise (enough rows for the probe to show the table's absence).
IMAGE_KNOWS = (planted_dataset(960, seed=0), planted_dataset(90, seed=1))
SCHEDULED_ENCODERS = {"image": "image_head", "table": "table_head"}


def probe_of(data, item: int = 0, transform=lambda values: values.flatten(1)):
    """The probe of batch item ``item`` over the training and validation rows, fitted here by hand."""
    (train_x, *_, train_y), (val_x, *_, val_y) = ((dataset.tensors[item], dataset.tensors[2]) for dataset in data)
    return linear_probe(transform(val_x), val_y, train_features=transform(train_x), train_labels=train_y)


def test_an_ignored_informative_modality_is_confirmed_by_the_probe_and_stops_the_run(tmp_path) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2, labels=2)
    trainer, monitor = fit_scheduled(tmp_path, [BALANCED, IMAGE_LOW], stopper, data=IMAGE_KNOWS, max_epochs=6)

    assert stopper.stopped_epoch == 2 and trainer.current_epoch == 3  # epochs 1 and 2 below, then stopped
    [result] = stopper.probe_results["image"]  # probed once, at the check that reached patience
    assert result.verdict == "informative" and result.epoch == 2 and result.low > result.threshold
    assert (result.metric, result.chance, result.num_train, result.num_val, result.features) == (
        "balanced accuracy",
        1 / 3,
        960,
        90,
        "input",
    )
    assert_same_numbers(result.score, probe_of(IMAGE_KNOWS).score)  # the epoch's training rows and the validation rows
    assert stopper.collapsed_modality == "image" and stopper.reports == [stopper.collapse_message]
    assert (
        "yet its input alone predicts the labels: a linear probe scores balanced accuracy" in stopper.collapse_message
    )
    assert "5-fold over 1050 samples: 960 training, 90 validation" in stopper.collapse_message
    assert "an informative modality, abandoned. Signaling Trainer to stop." in stopper.collapse_message
    assert f"it fell from {monitor.history[0]['shares']['image']:.2f} (epoch 0)" in stopper.collapse_message
    assert set(stopper.probe_results) == {"image"}  # only the modality that reached patience was probed


def test_an_ignored_pure_noise_modality_is_reported_uninformative_and_probed_again_while_low(tmp_path) -> None:
    schedule = [BALANCED, TABLE_LOW, TABLE_LOW, TABLE_LOW, BALANCED, TABLE_LOW, TABLE_LOW]
    with_labels = CollapseEarlyStopping(min_share=0.05, patience=2, labels=2)
    label_free = CollapseEarlyStopping(min_share=0.05, patience=2, action="warn")
    assert with_labels.state_key != label_free.state_key
    with pytest.warns(UserWarning, match=LABEL_FREE_LIMIT):
        trainer, _ = fit_scheduled(tmp_path, schedule, with_labels, label_free, data=IMAGE_KNOWS)

    assert with_labels.stopped_epoch is None and trainer.current_epoch == 7 and with_labels.collapsed_modality is None
    # probed at every check from the one that reached patience while it stayed low, never frozen
    assert [entry["uninformative"] for entry in with_labels.history] == [
        [],
        [],
        ["table"],
        ["table"],
        [],
        [],
        ["table"],
    ]
    assert [entry["wait_count"]["table"] for entry in with_labels.history] == [0, 1, 2, 3, 0, 1, 2]
    results = with_labels.probe_results["table"]
    assert [(result.epoch, result.verdict) for result in results] == [(e, "uninformative") for e in (2, 3, 6)]
    assert results[0].high < results[0].threshold and abs(results[0].score - 1 / 3) < 0.06
    assert_same_numbers(results[0].score, probe_of(IMAGE_KNOWS, item=1).score)
    assert with_labels.uninformative_modalities == ("table",)
    assert len(with_labels.reports) == 2  # said once per low run, not at every check
    assert with_labels.reports[0].startswith(
        "Modality 'table' is uninformative on this data, not collapsed: mc/share/table = "
    )
    assert "and its input alone does not predict the labels" in with_labels.reports[0]
    assert with_labels.reports[0].endswith(
        "within the margin of chance: it has nothing to give here. Training continues; the probe runs again at each "
        "check while the share stays low."
    )
    # label-free, the same shares are a collapse, and the message says what it cannot know
    assert label_free.collapsed_modality == "table" and label_free.collapse_epoch == 2
    assert label_free.collapse_message.endswith(f"the network ignores it; {LABEL_FREE_LIMIT}. Training continues "
                                                "(action='warn').")  # fmt: skip


#: 12 training and 12 validation rows of a pure-noise table: too few to show that it is uninformative.
FEW_ROWS = (planted_dataset(12, seed=0), planted_dataset(12, seed=1))


def test_an_undecided_probe_stops_as_without_labels_by_default_and_says_it_could_not_decide(tmp_path) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=1, labels=2)
    fit_scheduled(tmp_path, [TABLE_LOW], stopper, data=FEW_ROWS, max_epochs=2)
    [result] = stopper.probe_results["table"]
    assert result.verdict == "undecided" and result.low < result.threshold < result.high
    assert result.samples_to_decide > 24
    assert stopper.stopped_epoch == 0 and stopper.collapsed_modality == "table"
    assert "could not decide whether it predicts the labels" in stopper.collapse_message
    assert "It is flagged as without labels (undecided='stop')" in stopper.collapse_message
    assert "is uninformative" not in stopper.collapse_message and "nothing to give" not in stopper.collapse_message


def test_with_undecided_continue_an_undecided_probe_is_reported_once_and_training_goes_on(tmp_path) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=1, labels=2, undecided="continue")
    fit_scheduled(tmp_path, [TABLE_LOW], stopper, data=FEW_ROWS, max_epochs=3)
    assert stopper.stopped_epoch is None and stopper.collapsed_modality is None
    assert [result.verdict for result in stopper.probe_results["table"]] == ["undecided"] * 3
    assert [entry["undecided"] for entry in stopper.history] == [["table"]] * 3
    assert stopper.uninformative_modalities == ()
    [report] = stopper.reports
    assert report.startswith("Modality 'table' is low, and the probe is undecided: mc/share/table = ")
    assert "Training continues (undecided='continue')" in report and "uninformative" not in report


def test_too_few_rows_leave_the_probe_undecided_saying_why(tmp_path) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=1, labels=2)
    data = (planted_dataset(4, seed=0), planted_dataset(12, seed=1))  # 16 rows: fewer than 20
    fit_scheduled(tmp_path, [IMAGE_LOW], stopper, data=data, max_epochs=1)
    [result] = stopper.probe_results["image"]
    assert (result.verdict, result.reason) == ("undecided", "16 samples, fewer than 20")
    assert stopper.stopped_epoch == 0
    assert "the probe could not run: 16 samples, fewer than 20" in stopper.collapse_message


def test_a_verdict_is_revisited_as_training_rows_accumulate_and_a_later_informative_one_stops(tmp_path) -> None:
    data = (planted_dataset(320, seed=0, image=0.5), planted_dataset(24, seed=1, image=0.5))  # a weak image signal
    stopper = CollapseEarlyStopping(min_share=0.05, patience=1, labels=2, undecided="continue")
    fit_scheduled(tmp_path, [IMAGE_LOW], stopper, data=data, max_epochs=1, val_check_interval=2)
    verdicts = [(result.num_train, result.verdict) for result in stopper.probe_results["image"]]
    assert verdicts[0] == (32, "undecided") and verdicts[-1][1] == "informative"  # 2 batches of 16, then more
    assert all(verdict == "undecided" for _, verdict in verdicts[:-1])
    assert [train for train, _ in verdicts] == [32 * (check + 1) for check in range(len(verdicts))]
    assert stopper.collapsed_modality == "image" and stopper.stopped_epoch == 0


class EncodedScheduledNet(ScheduledContributionNet):
    """The scheduled net whose validation step runs the model, as a real one does: the encoders' hooks see it."""

    def validation_step(self, batch, batch_idx) -> None:
        image, table, _ = batch
        self(image, table)


def test_with_the_monitors_encoders_the_probe_fits_their_outputs_in_training_and_validation(tmp_path) -> None:
    monitor = ModalityContributionMonitor({"image": 0, "table": 1}, occlusion="zeros", encoders=SCHEDULED_ENCODERS)
    stopper = CollapseEarlyStopping(min_share=0.05, patience=1, labels=2)
    model = EncodedScheduledNet([IMAGE_LOW])
    fit_scheduled(tmp_path, [IMAGE_LOW], stopper, data=IMAGE_KNOWS, monitor=monitor, model=model, max_epochs=2)

    [result] = stopper.probe_results["image"]
    assert result.features == "encoder output ('image_head')" and result.num_features == 3  # the head's 3 logits
    assert (result.num_train, result.num_val) == (960, 90)
    with torch.no_grad():  # the head is frozen: its outputs in training are its outputs now
        expected = probe_of(IMAGE_KNOWS, transform=lambda images: model.image_head(images.flatten(1)))
    assert_same_numbers(result.score, expected.score)
    assert stopper.stopped_epoch == 0 and "its encoder output ('image_head') alone predicts" in stopper.collapse_message


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
    assert any("not counting 'table': uninformative on this" in r.getMessage() for r in caplog.records)


def test_labels_label_kind_undecided_and_probe_margin_are_checked_at_construction() -> None:
    with pytest.raises(TypeError, match=r"labels=2\.5 must be None, a dict key, a tuple index or a callable"):
        CollapseEarlyStopping(labels=2.5)
    with pytest.raises(TypeError, match="labels=True"):
        CollapseEarlyStopping(labels=True)
    with pytest.raises(ValueError, match=r"probe_margin=0 must be a number in \(0, 1\) \(above chance\)"):
        CollapseEarlyStopping(labels=2, probe_margin=0)
    with pytest.raises(ValueError, match="label_kind='ordinal' must be one of 'auto', 'classes', 'multilabel'"):
        CollapseEarlyStopping(labels=2, label_kind="ordinal")
    with pytest.raises(ValueError, match="undecided='warn' must be one of 'stop', 'continue'"):
        CollapseEarlyStopping(labels=2, undecided="warn")
    assert CollapseEarlyStopping(labels=lambda batch: batch[2]).labels is not None


class CountSteps(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args) -> None:
        self.steps += 1


@pytest.mark.parametrize(
    ("labels", "label_kind", "message"),
    [
        (5, "auto", r"labels=5 is out of range: the batch has 3 items \(indices 0 to 2\)"),
        (lambda batch: batch[2][:9], "auto", r"selected 9 rows \(shape \(9,\)\); the batch has 12 samples"),
        (lambda batch: batch[2].float() + 40, "auto", "integral floats from 40 to 42 may be class ids or a continuous"),
        (lambda batch: batch[0][:, 0, 0, :2], "auto", "a 2-column tensor of non-binary values"),
        (2, "survival", r"label_kind='survival': labels= must select \[time, event\] rows \(N, 2\)"),
        (lambda batch: batch[0][:, 0, 0, 0], "classes", "label_kind='classes': labels= selected continuous values"),
    ],
)
def test_every_labels_problem_fails_before_any_training_step(tmp_path, labels, label_kind, message) -> None:
    stopper = CollapseEarlyStopping(min_share=0.05, patience=1, labels=labels, label_kind=label_kind)
    steps = CountSteps()
    with pytest.raises(ValueError, match=message):
        fit_scheduled(tmp_path, [IMAGE_LOW], stopper, steps, data=FEW_ROWS, max_epochs=1)
    assert steps.steps == 0


def test_a_labels_key_missing_from_dict_batches_names_the_batch_keys(tmp_path) -> None:
    from lightning_mc.callbacks.probe_features import select_labels

    with pytest.raises(
        ValueError, match=r"labels='label' is not a key of the batch; the batch's keys: \['image', 'y'\]"
    ):
        select_labels({"image": torch.zeros(2, 3), "y": torch.zeros(2)}, "label", rows=2)


class RecordProbe(L.Callback):
    """Each ddp_spawn worker writes the probe result its stopper holds at the end of fit."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_fit_end(self, trainer, pl_module) -> None:
        stopper = next(cb for cb in trainer.callbacks if isinstance(cb, CollapseEarlyStopping))
        record = {
            "stopped_epoch": stopper.stopped_epoch,
            "probe": {
                key: value for key, value in stopper.probe_results["image"][-1].as_dict().items() if key != "seconds"
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
    # every rank's training rows and validation rows, the padding repeat not counted
    assert (probe["num_train"], probe["num_val"], probe["verdict"]) == (64, 33, "informative")
    assert_same_numbers(probe["score"], probe_of(data).score)
