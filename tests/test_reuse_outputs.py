"""``reuse_outputs``: the clean pass comes from what ``validation_step`` returned; only the occluded copies run.

Each equality test puts two monitors in one Trainer, on the same batches and weights: ``prefix="mc"`` recomputes the
clean outputs, ``prefix="reuse"`` takes them from ``validation_step``. Both count the model rows they run through a
counting ``forward_fn``, so the saving is checked row by row: ``K · N`` rows per batch with reuse against
``(K + 1) · N`` without, where ``K`` is the number of occluded copies the options need (one per whole modality or
attribute, the Shapley coalitions, the all-occluded copy). The numbers must agree to float32 rounding
(``helpers.assert_same_numbers``): the clean outputs of the validation step and of the monitor's stacked pass are two
computations (other batch shapes, other kernels) of the same rows.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_mc import Modality, ModalityContributionMonitor
from lightning_mc.functional import modality_contribution
from lightning_mc.masks import Columns

from helpers import (
    FLOAT32_ATOL,
    FLOAT32_RTOL,
    MODALITIES,
    NUM_CLASSES,
    CountingForward,
    TwoModalityNet,
    assert_same_numbers,
    loader,
    trainer_kwargs,
    two_modality_dataset,
)

#: 16 + 16 + 8 samples: a partial last batch.
NUM_VAL = 40
#: Odd, so DistributedSampler pads rank 1 with a repeat of sample 0 (17 + 17 rows for 33 samples).
NUM_VAL_DDP = 33


class ReturningNet(TwoModalityNet):
    """``TwoModalityNet`` whose ``validation_step`` returns its logits, in the form ``returns`` names.

    ``"tensor"``: the logits; ``"dict"``: ``{"loss": ..., "prediction": logits}``; ``"none"``: nothing;
    ``"loss_only"``: ``{"loss": ...}``; ``"short"``: the logits of all samples but the last; ``"narrow"``: the
    first two of the three logits.
    """

    def __init__(self, returns: str = "tensor") -> None:
        super().__init__()
        self.returns = returns

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        image, table, label = batch
        logits = self(image, table)
        loss = nn.functional.cross_entropy(logits, label)
        self.log("val_loss", loss)
        return {
            "tensor": logits,
            "dict": {"loss": loss, "prediction": logits},
            "none": None,
            "loss_only": {"loss": loss},
            "short": logits[:-1],
            "narrow": logits[:, :2],
        }[self.returns]


class DictNet(TwoModalityNet):
    """A model whose forward returns a dict (``output_key="logits"``); ``validation_step`` returns that dict."""

    def forward(self, image: Tensor, table: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        image_logits = self.image_branch(image)
        return {"image_logits": image_logits, "logits": image_logits + self.table_branch(table)}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        image, table, label = batch
        return nn.functional.cross_entropy(self(image, table)["logits"], label)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        image, table, _ = batch
        return self(image, table)


def prediction_of(outputs: dict[str, Tensor]) -> Tensor:
    """A ``reuse_outputs`` callable: the prediction in ``ReturningNet("dict")``'s output."""
    return outputs["prediction"]


@dataclasses.dataclass
class Case:
    """One configuration: the model, the monitors' options and the occluded copies per batch."""

    model: Callable[[], L.LightningModule]
    modalities: Any
    options: Callable[[], dict[str, Any]]
    reuse: Any
    copies: int
    logged: tuple[str, ...] = ()
    output_key: str | None = None
    per_output: bool = False


def _accuracy() -> dict[str, Any]:
    return {"perf_metric": MulticlassAccuracy(num_classes=NUM_CLASSES), "target": 2}


def _everything() -> dict[str, Any]:
    return {
        "ci": 0.9,
        "n_boot": 200,
        "shapley": True,
        "check_redundancy": True,
        "normalization": "per_sample",
        **_accuracy(),
    }


COLUMNS = [Modality("image", key=0), Modality("table", key=1, attributes=Columns())]
#: 1 image copy (also the Shapley coalition {image}) + 5 column copies + the coalitions {table} and {image, table}
#: (the latter also the all-occluded copy of check_redundancy).
EVERYTHING_COPIES = 8
EVERYTHING_KEYS = ("share_low/image", "shapley/image", "all_occluded_raw", "perf_clean", "output_share/0/image")
CASES: dict[str, Case] = {
    "defaults": Case(ReturningNet, MODALITIES, dict, True, copies=2),
    "ci": Case(ReturningNet, MODALITIES, lambda: {"ci": 0.9, "n_boot": 200}, True, 2, ("share_low/image",)),
    # the 3 coalitions include the one-at-a-time copies: the clean pass is the only one saved
    "shapley": Case(ReturningNet, MODALITIES, lambda: {"shapley": True}, True, 3, ("shapley/image",)),
    "check_redundancy": Case(
        ReturningNet, MODALITIES, lambda: {"check_redundancy": True}, True, 3, ("all_occluded_raw",)
    ),
    # whole modalities: the performance drop reads the one-at-a-time copies, no extra pass
    "perf_metric": Case(ReturningNet, MODALITIES, _accuracy, True, 2, ("perf_clean", "perf_drop/image")),
    "per_output": Case(ReturningNet, MODALITIES, dict, True, 2, ("output_share/0/image",), per_output=True),
    "per_sample": Case(ReturningNet, MODALITIES, lambda: {"normalization": "per_sample"}, True, 2),
    "attributes": Case(ReturningNet, COLUMNS, dict, True, 6, ("attr/table/0", "attr/table/4")),
    "output_key": Case(DictNet, MODALITIES, dict, "logits", 2, output_key="logits"),
    "callable": Case(lambda: ReturningNet("dict"), MODALITIES, dict, prediction_of, 2),
    "everything": Case(ReturningNet, COLUMNS, _everything, True, EVERYTHING_COPIES, EVERYTHING_KEYS, per_output=True),
    "everything_output_key": Case(
        DictNet, COLUMNS, _everything, "logits", EVERYTHING_COPIES, EVERYTHING_KEYS, "logits", per_output=True
    ),
}


def logged_under(trainer: L.Trainer, prefix: str) -> dict[str, float]:
    """``trainer.callback_metrics`` under ``prefix/``, keyed by the rest of the key."""
    start = f"{prefix}/"
    return {key[len(start) :]: value.item() for key, value in trainer.callback_metrics.items() if key.startswith(start)}


@pytest.mark.parametrize("name", list(CASES))
def test_reused_outputs_give_the_recomputed_numbers_with_one_copy_fewer_per_batch(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    counters = {"mc": CountingForward(), "reuse": CountingForward()}
    monitors = {
        prefix: ModalityContributionMonitor(
            case.modalities,
            forward_fn=counters[prefix],
            output_key=case.output_key,
            output_transform="softmax",
            per_output=case.per_output,
            prefix=prefix,
            reuse_outputs=case.reuse if prefix == "reuse" else False,
            **case.options(),
        )
        for prefix in counters
    }
    torch.manual_seed(0)
    epochs = 2
    trainer = L.Trainer(callbacks=list(monitors.values()), **trainer_kwargs(tmp_path, max_epochs=epochs))
    trainer.fit(case.model(), loader(two_modality_dataset(48)), loader(two_modality_dataset(NUM_VAL, seed=1)))

    # the rows actually run: K copies of every sample with reuse, K + 1 without (the clean pass); with reuse the first
    # batch of the fit (16 samples) runs clean once more, to compare the reused prediction with the model's own
    assert counters["reuse"].rows == epochs * case.copies * NUM_VAL + 16
    assert counters["mc"].rows == epochs * (case.copies + 1) * NUM_VAL
    plain, reused = monitors["mc"], monitors["reuse"]
    assert len(plain.history) == len(reused.history) == epochs
    assert_same_numbers(reused.history, plain.history, "history")
    assert_same_numbers(reused.latest, plain.latest, "latest")
    logged_plain, logged_reused = logged_under(trainer, "mc"), logged_under(trainer, "reuse")
    assert sorted(logged_reused) == sorted(logged_plain)
    assert_same_numbers(logged_reused, logged_plain, "logged")
    # the options really ran (the agreement above is not between two empty results)
    assert {"share/image", "share/table", "raw/image", "balance", *case.logged} <= set(logged_reused)
    assert reused.latest is not None and reused.latest.num_samples == NUM_VAL
    assert all(0.0 < share < 1.0 for share in reused.latest.shares.values())
    expected_normalization = case.options().get("normalization", "ratio_of_sums")
    assert reused.latest.normalization == expected_normalization


def test_reused_outputs_are_the_validation_steps_not_recomputed(tmp_path: Path) -> None:
    """A validation step that returns other logits than the model's changes the numbers: they are really read.

    (The first batch of a fit is compared with the model's own output, so only the later batches are shifted.)
    """

    class ShiftedNet(ReturningNet):
        def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
            return super().validation_step(batch, batch_idx) + torch.tensor([2.0, 0.0, 0.0]) * (batch_idx > 0)

    monitor = ModalityContributionMonitor(MODALITIES, output_transform="softmax", reuse_outputs=True)
    torch.manual_seed(0)
    model = ShiftedNet()
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(model, loader(two_modality_dataset(48)), loader(two_modality_dataset(NUM_VAL, seed=1)))
    val = loader(two_modality_dataset(NUM_VAL, seed=1))
    recomputed = modality_contribution(model, val, MODALITIES, output_transform="softmax")
    assert monitor.latest is not None
    assert abs(monitor.latest.raw["image"] - recomputed.raw["image"]) > 1e-2


ERRORS = {
    "none": (True, TypeError, r"reuse_outputs=True needs the model's output tensor.*got NoneType"),
    "dict": (True, TypeError, r"reuse_outputs=True needs the model's output tensor.*got dict"),
    "loss_only": ("logits", ValueError, r"reuse_outputs='logits'.*dict.*\['loss'\]"),
    "short": (True, ValueError, r"reuse_outputs=True: .*shape \(15, 3\) for an input of 16 samples"),
    "narrow": (True, ValueError, r"reuse_outputs=True: .*shape \(16, 2\): 2 outputs per sample.*gives 3"),
}


@pytest.mark.parametrize("returns", list(ERRORS))
def test_an_unusable_validation_step_output_is_an_error_naming_reuse_outputs(returns: str, tmp_path: Path) -> None:
    reuse, error, message = ERRORS[returns]
    monitor = ModalityContributionMonitor(MODALITIES, reuse_outputs=reuse, run_on_validate=True)
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path))
    with pytest.raises(error, match=message):
        trainer.validate(ReturningNet(returns), loader(two_modality_dataset(NUM_VAL, seed=1)), verbose=False)


@pytest.mark.parametrize("value", [0, "", 3.5])
def test_an_invalid_reuse_outputs_is_a_type_error_at_construction(value: Any) -> None:
    with pytest.raises(TypeError, match=rf"reuse_outputs={value!r} must be False, True"):
        ModalityContributionMonitor(MODALITIES, reuse_outputs=value)


class RecordRows(L.Callback):
    """Placed after the monitor: each rank writes the rows its monitor ran, what it logged and its history."""

    def __init__(self, directory: Path, monitor: ModalityContributionMonitor, counter: CountingForward) -> None:
        self.directory, self.monitor, self.counter = directory, monitor, counter

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = {
            "rows": self.counter.rows,
            "logged": {key: value.item() for key, value in trainer.callback_metrics.items() if key.startswith("mc/")},
            "num_samples": self.monitor.history[-1]["num_samples"],
        }
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_reusing_outputs_measure_the_single_process_numbers_without_reuse(tmp_path: Path) -> None:
    counter = CountingForward()
    monitor = ModalityContributionMonitor(
        MODALITIES, forward_fn=counter, output_transform="softmax", reuse_outputs=True, run_on_validate=True
    )
    torch.manual_seed(0)
    model = ReturningNet()
    val = two_modality_dataset(NUM_VAL_DDP, seed=1)
    trainer = L.Trainer(
        callbacks=[monitor, RecordRows(tmp_path, monitor, counter)],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2),
    )
    trainer.validate(model, loader(val), verbose=False)

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # 17 rows per rank (16 + 1; rank 1's last is the padding repeat of sample 0), 2 occluded copies each, no clean but
    # the first batch's 16 rows, once per run, to compare the reused prediction with the model's own
    assert ranks[0]["rows"] == ranks[1]["rows"] == 2 * 17 + 16
    assert ranks[0]["logged"] == ranks[1]["logged"]  # bit-equal: both log the values of the same all-reduce
    assert ranks[0]["num_samples"] == ranks[1]["num_samples"] == NUM_VAL_DDP
    single = modality_contribution(model, loader(val), MODALITIES, output_transform="softmax")
    logged = ranks[0]["logged"]
    for name in MODALITIES:
        assert_same_numbers(logged[f"mc/share/{name}"], single.shares[name], f"mc/share/{name}")
        assert_same_numbers(logged[f"mc/raw/{name}"], single.raw[name], f"mc/raw/{name}")
    assert_same_numbers(logged["mc/balance"], single.balance, "mc/balance")
    # the padded repeat, had it been counted, would have moved the raw values by ten times the tolerance above
    samples = [val[i] for i in [*range(NUM_VAL_DDP), 0]]
    padded = modality_contribution(
        model, [torch.utils.data.default_collate(samples)], MODALITIES, output_transform="softmax"
    )
    assert abs(padded.raw["image"] - single.raw["image"]) > 10 * (FLOAT32_ATOL + FLOAT32_RTOL * single.raw["image"])
