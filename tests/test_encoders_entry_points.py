"""``encoders=`` changes what runs, never the numbers: every option, the monitor (bf16, reuse_outputs, tolerance) and
two processes give what the same measurement without ``encoders`` gives.

The cached and the plain path run other batchings of the same rows, so their floats are compared with
``helpers.assert_same_numbers`` (float32 rounding); under bf16 autocast with a looser, stated tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from lightning_mc import Modality, ModalityContributionMonitor
from lightning_mc.functional import modality_contribution, modality_shapley
from lightning_mc.masks import Columns

from helpers import NUM_CLASSES, TwoModalityNet, assert_same_numbers, loader, trainer_kwargs, two_modality_dataset

MODALITIES = {"image": 0, "table": 1}
ENCODERS = {"image": "image_branch", "table": "table_branch"}
#: bf16 keeps 8 bits of mantissa: two batchings of the same rows differ by a few bf16 ulps (~1e-2 relative).
BF16_RTOL, BF16_ATOL = 5e-2, 1e-3

OPTIONS: dict[str, tuple[Any, dict[str, Any]]] = {
    "defaults": (MODALITIES, {}),
    "zeros": (MODALITIES, {"occlusion": "zeros"}),
    "noise": (MODALITIES, {"occlusion": "noise"}),
    "permute": (MODALITIES, {"occlusion": "permute"}),
    "ci": (MODALITIES, {"ci": 0.9, "n_boot": 200}),
    "shapley": (MODALITIES, {"shapley": True}),
    "check_redundancy": (MODALITIES, {"check_redundancy": True}),
    "perf_metric": (MODALITIES, {"perf_metric": "accuracy"}),
    "tolerance": (MODALITIES, {"tolerance": 0.2}),
    "per_sample": (MODALITIES, {"normalization": "per_sample"}),
    "columns": ([Modality("image", key=0), Modality("table", key=1, attributes=Columns())], {}),
}


def _options(name: str) -> tuple[Any, dict[str, Any]]:
    modalities, options = OPTIONS[name]
    if options.get("perf_metric") == "accuracy":  # a fresh metric for every call
        options = {**options, "perf_metric": MulticlassAccuracy(num_classes=NUM_CLASSES), "target": 2}
    return modalities, options


@pytest.mark.parametrize("name", list(OPTIONS))
def test_functional_with_encoders_gives_the_numbers_without(name) -> None:
    torch.manual_seed(0)
    model, data = TwoModalityNet().eval(), loader(two_modality_dataset(40, seed=1))
    modalities, options = _options(name)
    expected = modality_contribution(model, data, modalities, output_transform="softmax", **options)
    modalities, options = _options(name)
    actual = modality_contribution(model, data, modalities, output_transform="softmax", encoders=ENCODERS, **options)
    assert_same_numbers(actual, expected, what=name)


def test_modality_shapley_with_encoders_gives_the_values_without() -> None:
    torch.manual_seed(0)
    model, data = TwoModalityNet().eval(), loader(two_modality_dataset(40, seed=1))
    expected = modality_shapley(model, data, MODALITIES, output_transform="softmax")
    actual = modality_shapley(model, data, MODALITIES, output_transform="softmax", encoders=ENCODERS)
    assert_same_numbers(actual, expected)


class ReturnsLogits(TwoModalityNet):
    """``validation_step`` returns the logits, for ``reuse_outputs=True``."""

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        image, table, _ = batch
        return self(image, table)


def _fit_and_log(tmp_path: Path, monitor_options: dict[str, Any], **trainer_options: Any) -> dict[str, float]:
    torch.manual_seed(0)
    monitor = ModalityContributionMonitor(MODALITIES, output_transform="softmax", **monitor_options)
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_epochs=1, **trainer_options))
    trainer.fit(
        ReturnsLogits(), loader(two_modality_dataset(48), batch_size=8), loader(two_modality_dataset(40, seed=1))
    )
    return {key: value.item() for key, value in trainer.callback_metrics.items() if key.startswith("mc/")}


@pytest.mark.parametrize(
    "options",
    [{}, {"reuse_outputs": True}, {"tolerance": 0.2, "per_output": True}, {"ci": 0.9, "n_boot": 100}],
    ids=["defaults", "reuse_outputs", "tolerance+per_output", "ci"],
)
def test_the_monitor_with_encoders_logs_the_numbers_without(tmp_path, options) -> None:
    expected = _fit_and_log(tmp_path / "plain", options)
    actual = _fit_and_log(tmp_path / "cached", {**options, "encoders": ENCODERS})
    assert sorted(actual) == sorted(expected)
    assert_same_numbers(actual, expected)


def test_the_monitor_with_encoders_under_bf16_logs_the_numbers_without(tmp_path) -> None:
    expected = _fit_and_log(tmp_path / "plain", {"reuse_outputs": True}, precision="bf16-mixed")
    actual = _fit_and_log(tmp_path / "cached", {"reuse_outputs": True, "encoders": ENCODERS}, precision="bf16-mixed")
    assert sorted(actual) == sorted(expected)
    assert_same_numbers(actual, expected, rtol=BF16_RTOL, atol=BF16_ATOL)


class WriteLogged(L.Callback):
    """Each rank writes what the monitor logged at the end of validation."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logged = {key: value.item() for key, value in trainer.callback_metrics.items() if key.startswith("mc/")}
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(logged))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), self.directory / "weights.pt")


def test_two_processes_with_encoders_log_the_single_process_numbers_without(tmp_path) -> None:
    monitor = ModalityContributionMonitor(MODALITIES, output_transform="softmax", encoders=ENCODERS, reuse_outputs=True)
    torch.manual_seed(0)
    trainer = L.Trainer(
        callbacks=[monitor, WriteLogged(tmp_path)],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=1),
    )
    trainer.fit(ReturnsLogits(), loader(two_modality_dataset(48), batch_size=8), loader(two_modality_dataset(33, 1)))
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == pytest.approx(ranks[1], abs=1e-7)  # every rank logs the reduced numbers

    model = ReturnsLogits()
    model.load_state_dict(torch.load(tmp_path / "weights.pt"))
    single = modality_contribution(model, loader(two_modality_dataset(33, 1)), MODALITIES, output_transform="softmax")
    for name in MODALITIES:
        assert_same_numbers(ranks[0][f"mc/share/{name}"], single.shares[name], f"mc/share/{name}")
        assert_same_numbers(ranks[0][f"mc/raw/{name}"], single.raw[name], f"mc/raw/{name}")


class CountedEncoders(ReturnsLogits):
    """Counts the rows the image branch computes while validating (a replayed branch does not run)."""

    def __init__(self) -> None:
        super().__init__()
        self.validation_rows = 0
        forward = self.image_branch.forward

        def counting(image: torch.Tensor) -> torch.Tensor:
            if not self.training:
                self.validation_rows += image.shape[0]
            return forward(image)

        self.image_branch.forward = counting


@pytest.mark.usefixtures("no_spot_check")  # counts the cached path's own rows
def test_with_reuse_outputs_the_monitor_replays_what_the_validation_step_computed(tmp_path) -> None:
    """``"permute"`` replays the image branch for both copies: besides the validation step's own rows it runs only
    the check's plain path (one row of each of the 2 copies, unless the shuffle leaves that sample in place: then it
    is unchanged and not run) and, once per fit, the first batch (16 rows) to compare the reused prediction with the
    model's own; never the clean batch of a measured batch again."""
    model = CountedEncoders()
    monitor = ModalityContributionMonitor(MODALITIES, occlusion="permute", encoders=ENCODERS, reuse_outputs=True)
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(model, loader(two_modality_dataset(16), batch_size=8), loader(two_modality_dataset(40, seed=1)))
    assert 40 + 16 + 1 <= model.validation_rows <= 40 + 16 + 2
    assert monitor.history[-1]["num_samples"] == 40
