"""Every fit is its own: a new fit starts the monitor, the stopper and the balancer fresh; a resumed one continues them.

Also: ``trainer.validate()`` is never silent (the monitor warns once that it measured nothing, naming
``run_on_validate``).
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mc import CollapseEarlyStopping, ModalityBalancer, ModalityContributionMonitor

from helpers import (
    ScheduledContributionNet,
    assert_same_numbers,
    fit_scheduled,
    loader,
    planted_dataset,
    trainer_kwargs,
    two_modality_dataset,
)

BALANCED, IMAGE_LOW = (1.0, 1.0), (0.002, 1.0)
COLLAPSE_AT_3 = [BALANCED, BALANCED, BALANCED, IMAGE_LOW]
ENCODERS = {"image": "image_head", "table": "table_head"}
DATA = (planted_dataset(64, seed=0), planted_dataset(60, seed=1))  # the image carries the label, the table is noise


def _callbacks() -> tuple[ModalityContributionMonitor, CollapseEarlyStopping, ModalityBalancer]:
    monitor = ModalityContributionMonitor({"image": 0, "table": 1}, occlusion="zeros")
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2, labels=2)
    return monitor, stopper, ModalityBalancer(ENCODERS, dropout=0.0)


def test_the_same_callbacks_on_a_new_trainer_start_a_fresh_fit(tmp_path) -> None:
    monitor, stopper, balancer = _callbacks()
    fit_scheduled(tmp_path / "first", COLLAPSE_AT_3, stopper, balancer, monitor=monitor, data=DATA, max_epochs=8)
    first_history = monitor.history
    assert stopper.stopped_epoch == 4 and [entry["epoch"] for entry in first_history] == [0, 1, 2, 3, 4]
    assert balancer.active and stopper.reports and stopper.probe_results

    trainer, _ = fit_scheduled(tmp_path / "second", [BALANCED], stopper, balancer, monitor=monitor, data=DATA,
                               max_epochs=3)  # fmt: skip
    assert [entry["epoch"] for entry in monitor.history] == [0, 1, 2]  # not [0, 1, 2, 3, 4, 0, 1, 2]
    assert [entry["epoch"] for entry in first_history] == [0, 1, 2, 3, 4]  # the first fit's list is left as it was
    assert trainer.current_epoch == 3  # the first fit's stop did not carry over
    assert stopper.stopped_epoch is None and stopper.collapsed_modality is None and stopper.collapse_message is None
    assert stopper.reports == [] and stopper.probe_results == {}
    assert [entry["epoch"] for entry in stopper.history] == [0, 1, 2] and stopper.wait_count == {"image": 0, "table": 0}
    assert not balancer.active and balancer.coefficients == {"image": 1.0, "table": 1.0}
    assert [entry["epoch"] for entry in balancer.history] == [0, 1, 2]


def test_the_same_trainer_fitting_again_starts_a_fresh_fit_too(tmp_path) -> None:
    monitor, stopper, balancer = _callbacks()
    trainer = L.Trainer(callbacks=[monitor, stopper, balancer], **trainer_kwargs(tmp_path, max_epochs=5))
    model = ScheduledContributionNet([IMAGE_LOW, IMAGE_LOW, BALANCED])
    trainer.fit(model, loader(DATA[0]), loader(DATA[1]))
    assert stopper.stopped_epoch == 1 and len(monitor.history) == 2

    trainer.should_stop = False
    trainer.fit_loop.max_epochs = 5
    trainer.fit(model, loader(planted_dataset(64, seed=2)), loader(planted_dataset(60, seed=3)))  # new data
    assert [entry["epoch"] for entry in monitor.history] == [2, 3, 4]  # the trainer's epochs go on, the history not
    assert stopper.stopped_epoch is None and [entry["epoch"] for entry in stopper.history] == [2, 3, 4]
    assert [entry["epoch"] for entry in balancer.history] == [2, 3, 4] and not balancer.active


def _without_timings(state: dict[str, Any]) -> dict[str, Any]:
    probes = {
        name: [{k: v for k, v in result.items() if k != "seconds"} for result in results]
        for name, results in state["probe_results"].items()
    }
    return {**state, "probe_results": probes}


def test_a_resumed_fit_equals_an_uninterrupted_one(tmp_path) -> None:
    straight = _callbacks()
    fit_scheduled(tmp_path / "straight", COLLAPSE_AT_3, *straight[1:], monitor=straight[0], data=DATA, max_epochs=8)
    assert straight[1].stopped_epoch == 4 and straight[2].active  # the run stops; the balancer engaged at epoch 3

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = _callbacks()
    fit_scheduled(tmp_path, COLLAPSE_AT_3, *first[1:], checkpoint, monitor=first[0], data=DATA, max_epochs=4,
                  enable_checkpointing=True)  # fmt: skip
    assert first[1].wait_count["image"] == 1 and first[1].stopped_epoch is None  # interrupted mid-collapse

    resumed = _callbacks()  # a new process
    ckpt_path = str(tmp_path / "ckpt" / "last.ckpt")
    fit_scheduled(tmp_path, COLLAPSE_AT_3, *resumed[1:], monitor=resumed[0], data=DATA, max_epochs=8,
                  ckpt_path=ckpt_path)  # fmt: skip
    monitor, stopper, balancer = resumed
    assert [entry["epoch"] for entry in monitor.history] == [0, 1, 2, 3, 4]
    assert_same_numbers(monitor.state_dict(), straight[0].state_dict(), "monitor")
    assert_same_numbers(_without_timings(stopper.state_dict()), _without_timings(straight[1].state_dict()), "stopper")
    assert_same_numbers(balancer.state_dict(), straight[2].state_dict(), "balancer")
    assert stopper.stopped_epoch == 4 and stopper.probe_results["image"][-1].informative  # probed after the resume


def test_validate_warns_once_that_it_measured_nothing_naming_run_on_validate(tmp_path) -> None:
    monitor = ModalityContributionMonitor({"image": 0, "table": 1}, occlusion="zeros")
    trainer, _ = fit_scheduled(tmp_path, [BALANCED], monitor=monitor, max_epochs=2)
    model, val = trainer.lightning_module, loader(two_modality_dataset(32, seed=1))
    with pytest.warns(UserWarning, match=r"does not measure trainer\.validate\(\) \(run_on_validate=False") as caught:
        trainer.validate(model, val)
    assert sum("run_on_validate" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        trainer.validate(model, val)
    assert not [w for w in again if "run_on_validate" in str(w.message)]  # once
    assert [entry["epoch"] for entry in monitor.history] == [0, 1]  # validate() did not touch the fit's history

    measuring = ModalityContributionMonitor({"image": 0, "table": 1}, occlusion="zeros", run_on_validate=True)
    trainer = L.Trainer(callbacks=[measuring], **trainer_kwargs(tmp_path / "measuring"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(ScheduledContributionNet([BALANCED]), val)
    assert not [w for w in caught if "run_on_validate" in str(w.message)]
    assert len(measuring.history) == 1 and measuring.history[0]["num_samples"] == 32
