"""The TensorBoard dashboard, read back from the event files; CSV and no-logger runs are unaffected."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_mc import CollapseEarlyStopping, ModalityContributionMonitor
from lightning_mc.views.tensorboard import save_shares_figure

from helpers import ScheduledContributionNet, loader, trainer_kwargs, two_modality_dataset

MODALITIES = {"image": 0, "table": 1}
SCHEDULE = [(1.0, 1.0), (1.0, 1.0), (0.002, 1.0)]  # the image collapses at epoch 2


def _fit(tmp_path: Path, logger: Any, with_stopper: bool = True) -> tuple[ModalityContributionMonitor, L.Trainer]:
    monitor = ModalityContributionMonitor(MODALITIES, occlusion="zeros")
    callbacks: list[L.Callback] = [monitor]
    if with_stopper:
        callbacks.append(CollapseEarlyStopping(min_share=0.05, patience=2))
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=6, logger=logger))
    trainer.fit(
        ScheduledContributionNet(SCHEDULE),
        loader(two_modality_dataset(32, seed=0)),
        loader(two_modality_dataset(32, seed=1)),
    )
    return monitor, trainer


def _events(log_dir: str) -> event_accumulator.EventAccumulator:
    size = {event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0, event_accumulator.TENSORS: 0}
    return event_accumulator.EventAccumulator(log_dir, size_guidance=size).Reload()


def test_event_files_hold_the_scalars_the_layout_the_figure_and_the_summary(tmp_path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    monitor, _ = _fit(tmp_path, logger)
    events = _events(logger.log_dir)
    tags = events.Tags()

    assert len(monitor.history) == 4  # stopped at epoch 3
    for name in MODALITIES:
        logged = [event.value for event in events.Scalars(f"mc/share/{name}")]
        assert logged == pytest.approx([entry["shares"][name] for entry in monitor.history], abs=1e-6)
    assert {"mc/raw/image", "mc/raw/table", "mc/balance"} <= set(tags["scalars"])

    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    assert len(events.Tensors("custom_scalars__config__")) == 1  # registered once
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts == {
        "shares (mc/share/*)": ["mc/share/.*"],
        "raw output change (mc/raw/*)": ["mc/raw/.*"],
        "balance (mc/balance)": ["mc/balance"],
    }

    figures = events.Images("mc/shares_stacked")
    assert len(figures) == len(monitor.history) + 1  # one per check, and the final one with the stop marked
    assert figures[-1].width > 400 and figures[-1].height > 300
    assert figures[-1].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"

    summary = events.Tensors("mc/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "**Collapse flagged**: modality `image` at epoch 3" in summary
    assert "training was stopped there" in summary
    assert f"| image | {monitor.history[-1]['shares']['image']:.4f} |" in summary


def test_csv_logger_gets_the_scalars_and_no_dashboard(tmp_path) -> None:
    logger = CSVLogger(tmp_path, name="csv", version=0)
    monitor, _ = _fit(tmp_path, logger)
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("mc/share/image")]
    assert [int(row["epoch"]) for row in rows] == [entry["epoch"] for entry in monitor.history]
    for name in MODALITIES:
        logged = [float(row[f"mc/share/{name}"]) for row in rows]
        assert logged == pytest.approx([entry["shares"][name] for entry in monitor.history], abs=1e-6)
    assert monitor.views.dashboard is None
    assert not list(Path(tmp_path).rglob("events.out.tfevents.*"))


def test_several_loggers_each_get_the_scalars_and_tensorboard_the_figure(tmp_path) -> None:
    tensorboard = TensorBoardLogger(tmp_path, name="tb", version=0)
    csv_logger = CSVLogger(tmp_path, name="csv", version=0)
    monitor, _ = _fit(tmp_path, [csv_logger, tensorboard], with_stopper=False)
    events = _events(tensorboard.log_dir)
    assert len(events.Scalars("mc/share/image")) == len(monitor.history) == 6  # no stopper: every epoch runs
    assert len(events.Images("mc/shares_stacked")) == 7
    summary = events.Tensors("mc/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "No CollapseEarlyStopping was attached" in summary
    assert "mc/share/image" in (Path(csv_logger.log_dir) / "metrics.csv").read_text()


def test_no_logger_runs_without_a_dashboard(tmp_path) -> None:
    monitor, trainer = _fit(tmp_path, False)
    assert monitor.views.dashboard is None and len(monitor.history) == 4
    assert "mc/share/image" in trainer.callback_metrics


def test_saved_figure_is_a_png(tmp_path) -> None:
    history = [
        {"epoch": epoch, "global_step": 10 * epoch, "shares": {"image": image, "table": 1 - image}}
        for epoch, image in enumerate([0.6, 0.4, 0.2, 0.04])
    ]
    path = save_shares_figure(history, ["image", "table"], tmp_path / "figures" / "shares.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
