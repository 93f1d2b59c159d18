"""examples/collapse_scenarios.py: the rows docs/how-to/collapse.md quotes, on one seed each, decided as quoted.

The example trains each planted truth with a label-free stopper and a ``labels=`` one side by side, both
``action="warn"``; these tests run the rows that tell the two apart and check that a warn stop is where
``action="stop"`` ends the run, and that the probe's score is the probe of the training and validation images
themselves. The small-set rows: on 40 validation samples beside 1000 training ones a collapse is still confirmed and a
pure-noise table still shown uninformative, for class, multi-label and survival labels.
"""

from __future__ import annotations

import pytest
import torch

from lightning_mc.analyses.probe import linear_probe

from helpers import assert_same_numbers, load_example

scenarios = load_example("collapse_scenarios")
ROWS = {scenario.name.strip(): scenario for scenario in scenarios.SCENARIOS}
EPOCHS = 8
#: the flags of the stoppers' action="warn" are warnings; what they flagged is asserted below
pytestmark = pytest.mark.filterwarnings("ignore:Modality '(image|table)' collapsed:UserWarning")


def splits(scenario, seed: int = 0, num_train: int = 800, num_val: int = 400):
    """The training and validation splits ``scenarios.run`` builds for ``seed``: the samples the probe sees."""
    generator = torch.Generator().manual_seed(100 + seed)
    templates = torch.randn(scenarios.NUM_CLASSES, scenarios.PIXELS, generator=generator)
    train = scenarios.PlantedData(scenario, "train", num_train, templates, seed=1000 + seed)
    return train, scenarios.PlantedData(scenario, scenario.val_split, num_val, templates, seed=2000 + seed)


def test_a_planted_collapse_stops_both_stoppers_and_the_probe_confirms_it_on_the_validation_images() -> None:
    scenario = ROWS["collapse from epoch 0"]
    warned = scenarios.run(scenario, seed=0, epochs=EPOCHS)
    for verdict in (warned.label_free, warned.with_labels):
        assert (verdict.stop, verdict.modality, verdict.uninformative) == (3, "image", [])  # warm-up 2 + patience 2
    assert warned.lowest_share["image"] < 0.05
    train, val = splits(scenario)
    expected = linear_probe(val.images, val.labels, train_features=train.images, train_labels=train.labels)
    assert_same_numbers(warned.with_labels.probe, expected.score)  # the epoch's training rows and the validation rows
    assert warned.with_labels.probe > 0.5 and warned.with_labels.verdict == "informative"  # four classes: chance 0.25
    assert warned.epochs_run == EPOCHS

    stopped = scenarios.run(scenario, seed=0, epochs=EPOCHS, action="stop")  # the same training, ended at the stop
    assert stopped.epochs_run == 4 and stopped.with_labels.stop == 3
    assert_same_numbers(stopped.with_labels.kept_accuracy, warned.with_labels.kept_accuracy)


def test_a_pure_noise_table_stops_only_the_label_free_stopper() -> None:
    scenario = ROWS["pure-noise table"]
    result = scenarios.run(scenario, seed=0, epochs=EPOCHS)
    assert (result.label_free.stop, result.label_free.modality) == (3, "table")
    assert (result.with_labels.stop, result.with_labels.uninformative) == (None, ["table"])
    train, val = splits(scenario)
    expected = linear_probe(
        val.tables["noise"], val.labels, train_features=train.tables["noise"], train_labels=train.labels
    )
    assert_same_numbers(result.with_labels.probe, expected.score)
    assert abs(result.with_labels.probe - 0.25) < 0.03 and result.with_labels.verdict == "uninformative"
    assert result.alone["table"] < 0.32  # the fusion head on the table alone is at chance too


def test_a_train_only_shortcut_is_missed_on_the_validation_set_and_caught_on_a_training_slice() -> None:
    missed = scenarios.run(ROWS["train-only shortcut"], seed=0, epochs=EPOCHS)
    assert missed.label_free.stop is None and missed.with_labels.stop is None
    assert missed.lowest_share["image"] > 0.2  # the validation tables hold only the hint: the image still counts
    caught = scenarios.run(ROWS["on a training slice"], seed=0, epochs=EPOCHS)
    assert (caught.with_labels.stop, caught.with_labels.modality) == (3, "image")
    assert caught.lowest_share["image"] < 0.05


@pytest.mark.parametrize("name", ["collapse from epoch 0", "multi-label collapse", "survival collapse"])
def test_on_40_validation_samples_a_collapse_is_confirmed_for_every_label_kind(name) -> None:
    scenario = {scenario.name: scenario for scenario in scenarios.SMALL_SET_SCENARIOS}[name]
    result = scenarios.run(scenario, seed=0, epochs=6, num_train=scenarios.SMALL_SET_TRAIN, num_val=40)
    verdict = result.with_labels
    assert (verdict.modality, verdict.verdict) == ("image", "informative") and verdict.stop in (3, 4, 5)
    assert verdict.honest and result.lowest_share["image"] < scenarios.STOPPER["min_share"]


def test_on_40_validation_samples_a_pure_noise_table_is_shown_uninformative_and_not_stopped_on() -> None:
    result = scenarios.run(ROWS["pure-noise table"], seed=0, epochs=5, num_train=scenarios.SMALL_SET_TRAIN, num_val=40)
    assert (result.label_free.stop, result.label_free.modality) == (3, "table")
    verdict = result.with_labels
    assert (verdict.stop, verdict.uninformative, verdict.verdict) == (None, ["table"], "uninformative")
    assert verdict.honest
