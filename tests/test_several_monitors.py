"""Two monitors in one Trainer, an internal and an external validation set: each logs, resumes and stops on its own."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.data import DataLoader, TensorDataset

from lightning_mc import CollapseEarlyStopping, ModalityContributionMonitor
from lightning_mc.functional import modality_contribution

from helpers import ScheduledContributionNet, TwoModalityNet, loader, trainer_kwargs, two_modality_dataset

MODALITIES = {"image": 0, "table": 1}
NAMES = tuple(MODALITIES)
EXTERNAL = "mc_external"


class TwoLoaderNet(TwoModalityNet):
    """``TwoModalityNet`` validated on several dataloaders."""

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().validation_step(batch, batch_idx)


class ScheduledTwoLoaderNet(ScheduledContributionNet):
    """``ScheduledContributionNet`` (frozen branches: the shares do not change while it trains) on several loaders."""

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        pass


def external_dataset(zero_table: bool = False) -> TensorDataset:
    """Another site: other samples, a dimmer image and a louder table (or a table column that was never recorded)."""
    image, table, label = two_modality_dataset(32, seed=2).tensors
    table = torch.zeros_like(table) if zero_table else 3.0 * table
    return TensorDataset(0.25 * image, table, label)


def monitors() -> tuple[ModalityContributionMonitor, ModalityContributionMonitor]:
    internal = ModalityContributionMonitor(MODALITIES, output_transform="softmax")
    external = ModalityContributionMonitor(MODALITIES, output_transform="softmax", dataloader_idx=1, prefix=EXTERNAL)
    return internal, external


def val_loaders(zero_table: bool = False) -> list[DataLoader]:
    return [loader(two_modality_dataset(32, seed=1)), loader(external_dataset(zero_table))]


def fit(
    tmp_path: Path,
    callbacks: list[L.Callback],
    model: L.LightningModule | None = None,
    val: list[DataLoader] | None = None,
    ckpt_path: Path | None = None,
    **overrides: Any,
) -> tuple[L.Trainer, L.LightningModule]:
    torch.manual_seed(0)
    model = TwoLoaderNet() if model is None else model
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(model, loader(two_modality_dataset(48)), val_loaders() if val is None else val, ckpt_path=ckpt_path)
    return trainer, model


def offline(model: L.LightningModule, data: DataLoader) -> dict[str, float]:
    """What the fitted model's contributions are on one loader, measured by the functional API."""
    result = modality_contribution(model, data, MODALITIES, output_transform="softmax")
    scalars = {f"share/{name}": value for name, value in result.shares.items()}
    scalars.update({f"raw/{name}": value for name, value in result.raw.items()})
    scalars["balance"] = result.balance
    return scalars


def logged(trainer: L.Trainer, prefix: str) -> dict[str, float]:
    return {
        key.removeprefix(f"{prefix}/"): value.item()
        for key, value in trainer.callback_metrics.items()
        if key.startswith(f"{prefix}/")
    }


def test_each_monitor_logs_its_own_loader_under_its_own_prefix(tmp_path) -> None:
    internal, external = monitors()
    trainer, model = fit(tmp_path, [internal, external])

    keys = {"share/image", "share/table", "raw/image", "raw/table", "balance"}
    internal_logged, external_logged = logged(trainer, "mc"), logged(trainer, EXTERNAL)
    assert set(internal_logged) == keys  # no key of the external monitor under mc/
    assert set(external_logged) == keys
    want_internal, want_external = (offline(model, data) for data in val_loaders())
    assert internal_logged == pytest.approx(want_internal, abs=1e-6)
    assert external_logged == pytest.approx(want_external, abs=1e-6)
    assert len(internal.history) == len(external.history) == 2
    assert internal.history[-1]["shares"] == pytest.approx({name: want_internal[f"share/{name}"] for name in NAMES})
    assert external.history[-1]["shares"] == pytest.approx({name: want_external[f"share/{name}"] for name in NAMES})
    # the two sites differ, so a monitor reading the other's loader would fail the comparisons above
    assert abs(want_internal["share/image"] - want_external["share/image"]) > 0.1


def test_a_resumed_fit_restores_and_continues_each_monitors_own_history(tmp_path) -> None:
    def run(max_epochs: int, ckpt_path: Path | None = None) -> tuple[tuple[ModalityContributionMonitor, ...], Any]:
        pair = monitors()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1, every_n_epochs=1)
        logger = TensorBoardLogger(tmp_path, name="tb", version=0)
        _, model = fit(
            tmp_path,
            [*pair, checkpoint],
            ckpt_path=ckpt_path,
            max_epochs=max_epochs,
            enable_checkpointing=True,
            logger=logger,
        )
        return pair, model

    (first_internal, first_external), _ = run(2)
    assert first_internal.state_key != first_external.state_key
    last = tmp_path / "ckpt" / "last.ckpt"
    stored = torch.load(last, weights_only=False)["callbacks"]
    assert stored[first_internal.state_key]["history"] == first_internal.history
    assert stored[first_external.state_key]["history"] == first_external.history
    assert first_internal.history[-1]["shares"] != first_external.history[-1]["shares"]

    (internal, external), model = run(3, ckpt_path=last)  # fresh monitors, as in a new process
    assert internal.state_key == first_internal.state_key and external.state_key == first_external.state_key
    for resumed, first in ((internal, first_internal), (external, first_external)):
        assert [entry["epoch"] for entry in resumed.history] == [0, 1, 2]
        assert resumed.history[:2] == first.history
    for resumed, data in zip((internal, external), val_loaders()):
        want = offline(model, data)  # the continued check measured the monitor's own loader
        assert resumed.history[-1]["shares"] == pytest.approx({name: want[f"share/{name}"] for name in NAMES}, abs=1e-6)


def test_a_stopper_bound_to_the_external_monitor_stops_on_the_external_collapse(tmp_path) -> None:
    internal, external = monitors()
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2, monitor=external)
    internal_watch = CollapseEarlyStopping(min_share=0.05, patience=2, monitor=internal, action="warn")
    assert stopper.state_key != internal_watch.state_key
    trainer, _ = fit(
        tmp_path,
        [internal, external, stopper, internal_watch],
        model=ScheduledTwoLoaderNet([(1.0, 1.0)]),
        val=val_loaders(zero_table=True),  # the external site never recorded the table: occluding it changes nothing
        max_epochs=6,
    )

    assert [entry["shares"]["table"] for entry in external.history] == [0.0, 0.0]
    assert all(entry["shares"]["table"] > 0.2 for entry in internal.history)  # the internal site does not collapse
    assert stopper.collapsed_modality == "table"
    assert stopper.collapse_epoch == stopper.stopped_epoch == 1
    assert stopper.collapse_share == 0.0
    assert "mc_external/share/table = 0.0000" in stopper.collapse_message
    assert [entry["shares"] for entry in stopper.history] == [
        {name: entry["shares"][name] for name in NAMES} for entry in external.history
    ]
    assert trainer.should_stop and len(internal.history) == len(external.history) == 2  # stopped at epoch 1 of 6
    assert internal_watch.collapsed_modality is None and internal_watch.wait_count == {"image": 0, "table": 0}


def test_a_stopper_without_monitor_in_a_trainer_with_two_monitors_asks_for_one(tmp_path) -> None:
    internal, external = monitors()
    with pytest.raises(
        RuntimeError, match=re.escape("pass the one to read as CollapseEarlyStopping(monitor=...)")
    ) as err:
        fit(tmp_path, [internal, external, CollapseEarlyStopping()])
    assert repr(internal) in str(err.value) and repr(external) in str(err.value)
    assert internal.history == [] and external.history == []


def test_two_monitors_with_one_prefix_fail_at_setup_naming_both_and_the_fix(tmp_path) -> None:
    first = ModalityContributionMonitor(MODALITIES)
    second = ModalityContributionMonitor(MODALITIES, dataloader_idx=1)  # prefix "mc" too
    with pytest.raises(ValueError, match="Two monitors log under prefix='mc'") as err:
        fit(tmp_path, [first, second])
    message = str(err.value)
    assert repr(first) in message and repr(second) in message
    assert repr(first) != repr(second)
    assert "Give each monitor its own prefix, e.g. prefix='mc_external'" in message


@pytest.mark.parametrize("prefix", ["", "a/b"])
def test_an_invalid_prefix_fails_at_construction_naming_prefix(prefix: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"prefix={prefix!r} must be a non-empty string")):
        ModalityContributionMonitor(MODALITIES, prefix=prefix)


def test_the_dashboard_has_a_section_figure_and_summary_per_monitor(tmp_path) -> None:
    internal, external = monitors()
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2, monitor=external, action="warn")
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    with pytest.warns(UserWarning, match="Modality 'table' collapsed"):
        fit(tmp_path, [internal, external, stopper], val=val_loaders(zero_table=True), max_epochs=3, logger=logger)
    size = {event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0, event_accumulator.TENSORS: 0}
    events = event_accumulator.EventAccumulator(logger.log_dir, size_guidance=size).Reload()

    configs = events.Tensors("custom_scalars__config__")
    assert len(configs) == 1  # one layout per run, holding every monitor's category
    layout = layout_pb2.Layout()
    layout.ParseFromString(configs[0].tensor_proto.string_val[0])
    categories = {
        category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
        for category in layout.category
    }
    assert categories == {
        "Modality contribution": {
            "shares (mc/share/*)": ["mc/share/.*"],
            "raw output change (mc/raw/*)": ["mc/raw/.*"],
            "balance (mc/balance)": ["mc/balance"],
        },
        "Modality contribution (mc_external)": {
            "shares (mc_external/share/*)": ["mc_external/share/.*"],
            "raw output change (mc_external/raw/*)": ["mc_external/raw/.*"],
            "balance (mc_external/balance)": ["mc_external/balance"],
        },
    }

    tags = events.Tags()
    for monitor in (internal, external):
        prefix = monitor.prefix
        for name in NAMES:
            values = [event.value for event in events.Scalars(f"{prefix}/share/{name}")]
            assert values == pytest.approx([entry["shares"][name] for entry in monitor.history], abs=1e-6)
        figures = events.Images(f"{prefix}/shares_stacked")
        assert len(figures) == len(monitor.history) + 1 == 4  # one per check and the final one
        assert figures[-1].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"{prefix}/summary/text_summary" in tags["tensors"]
    summaries = {
        monitor.prefix: events.Tensors(f"{monitor.prefix}/summary/text_summary")[0].tensor_proto.string_val[0].decode()
        for monitor in (internal, external)
    }
    for monitor in (internal, external):
        assert f"| image | {monitor.history[-1]['shares']['image']:.4f} |" in summaries[monitor.prefix]
    assert "| table | 0.0000 |" in summaries[EXTERNAL] and "| table | 0.0000 |" not in summaries["mc"]
    # the stopper watches the external monitor: its collapse marks the external summary only
    assert "**Collapse flagged**: modality `table` at epoch 1" in summaries[EXTERNAL]
    assert "No CollapseEarlyStopping was attached" in summaries["mc"]
