"""examples/collapse_scenarios.py: the rows docs/how-to/collapse.md quotes, on one seed each, decided as quoted.

The example trains each planted truth with a label-free stopper and a ``labels=`` one side by side, both
``action="warn"``; these tests run the rows that tell the two apart and check that a warn stop is where
``action="stop"`` ends the run, and that the probe's score is the probe of the validation images themselves.
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


def validation_split(scenario, seed: int = 0):
    """The validation split ``scenarios.run`` builds for ``seed``: the samples the probe sees."""
    generator = torch.Generator().manual_seed(100 + seed)
    templates = torch.randn(scenarios.NUM_CLASSES, scenarios.PIXELS, generator=generator)
    return scenarios.PlantedData(scenario, scenario.val_split, 400, templates, seed=2000 + seed)


def test_a_planted_collapse_stops_both_stoppers_and_the_probe_confirms_it_on_the_validation_images() -> None:
    scenario = ROWS["collapse from epoch 0"]
    warned = scenarios.run(scenario, seed=0, epochs=EPOCHS)
    for verdict in (warned.label_free, warned.with_labels):
        assert (verdict.stop, verdict.modality, verdict.uninformative) == (3, "image", [])  # warm-up 2 + patience 2
    assert warned.lowest_share["image"] < 0.05
    val = validation_split(scenario)
    assert_same_numbers(warned.with_labels.probe, linear_probe(val.images, val.labels).score)
    assert warned.with_labels.probe > 0.5  # four classes: chance 0.25
    assert warned.epochs_run == EPOCHS

    stopped = scenarios.run(scenario, seed=0, epochs=EPOCHS, action="stop")  # the same training, ended at the stop
    assert stopped.epochs_run == 4 and stopped.with_labels.stop == 3
    assert_same_numbers(stopped.with_labels.kept_accuracy, warned.with_labels.kept_accuracy)


def test_a_pure_noise_table_stops_only_the_label_free_stopper() -> None:
    scenario = ROWS["pure-noise table"]
    result = scenarios.run(scenario, seed=0, epochs=EPOCHS)
    assert (result.label_free.stop, result.label_free.modality) == (3, "table")
    assert (result.with_labels.stop, result.with_labels.uninformative) == (None, ["table"])
    val = validation_split(scenario)
    assert_same_numbers(result.with_labels.probe, linear_probe(val.tables["noise"], val.labels).score)
    assert abs(result.with_labels.probe - 0.25) < 0.07  # balanced accuracy at chance for four classes
    assert result.alone["table"] < 0.32  # the fusion head on the table alone is at chance too


def test_a_train_only_shortcut_is_missed_on_the_validation_set_and_caught_on_a_training_slice() -> None:
    missed = scenarios.run(ROWS["train-only shortcut"], seed=0, epochs=EPOCHS)
    assert missed.label_free.stop is None and missed.with_labels.stop is None
    assert missed.lowest_share["image"] > 0.2  # the validation tables hold only the hint: the image still counts
    caught = scenarios.run(ROWS["on a training slice"], seed=0, epochs=EPOCHS)
    assert (caught.with_labels.stop, caught.with_labels.modality) == (3, "image")
    assert caught.lowest_share["image"] < 0.05
