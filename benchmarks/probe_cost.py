"""P11: what ``CollapseEarlyStopping(labels=...)`` costs: milliseconds per verdict, and the training rows' gathering.

- Per verdict: :func:`~lightning_mc.analyses.probe.linear_probe` on the demo's sizes (a reservoir of 1024 training
  rows and 447 validation rows of 64 features, ten classes), on 40 validation rows beside the same reservoir, and on
  256 hashed features (a 3-D volume), in milliseconds.
- Per training batch: what the stopper adds to a training step of the demo's model (a small CNN + an MLP, batches
  of 64 noisy 8×8 digits + 10 columns, Adam): choosing the reservoir's rows, their features and labels, stored where
  they are. While the reservoir fills (the first 1024 rows of an epoch) every row is kept, the dearest case; once it
  is full most rows are drawn out. Target: at most 2 % of the training step.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from benchmarks.suites import Config, Row, Table
from benchmarks.timing import Stat, interleaved, ratio
from lightning_mc import ModalityContributionMonitor
from lightning_mc.analyses.probe import linear_probe
from lightning_mc.callbacks.probe_features import ProbeFeatures

BATCH, CLASSES, COLUMNS = 64, 10, 10  # the demo's batches: 8×8 digits, a 10-column table, ten classes
#: Most a training batch's gathering may add to the training step.
GATHER_TARGET = 0.02


def demo_model() -> nn.Module:
    """The demo's late-fusion network (``DigitsTableNet`` of examples/collapse_demo.py), loaded from the example."""
    path = Path(__file__).resolve().parents[1] / "examples" / "collapse_demo.py"
    spec = importlib.util.spec_from_file_location("collapse_demo", path)
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo.DigitsTableNet()


def _rows(num: int, width: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (num,), generator=generator)
    features = torch.randn(num, width, generator=generator)
    features[torch.arange(num), labels % width] += 0.5
    return features, labels


def _verdict_seconds(config: Config) -> list[list[str]]:
    cases = {"demo: 1024 training + 447 validation, 64 features": (1024, 447, 64)}
    cases["small set: 1024 training + 40 validation, 64 features"] = (1024, 40, 64)
    if not config.quick:
        cases["volume: 1024 training + 40 validation, 256 features"] = (1024, 40, 256)
    rows = []
    for name, (train, val, width) in cases.items():
        x_train, y_train = _rows(train, width, seed=0)
        x_val, y_val = _rows(val, width, seed=1)

        def probe(x_val: Tensor = x_val, y_val: Tensor = y_val, x_train: Tensor = x_train, y_train: Tensor = y_train):
            return linear_probe(x_val, y_val, train_features=x_train, train_labels=y_train)

        seconds = interleaved({"probe": probe}, 1 if config.quick else 3, torch.device("cpu"))["probe"]
        rows.append([name, f"{Stat.of([1000 * s for s in seconds]).median:.0f} ms", probe().verdict])
    return rows


def p11_probe_cost(config: Config) -> tuple[list[Row], Table]:
    """The gathering's cost per training batch ÷ a training step, and the milliseconds of a verdict."""
    device = config.device
    generator = torch.Generator().manual_seed(0)
    batch = (
        torch.rand(BATCH, 1, 8, 8, generator=generator).to(device),
        torch.randn(BATCH, COLUMNS, generator=generator).to(device),
        torch.randint(0, CLASSES, (BATCH,), generator=generator).to(device),
    )
    model = demo_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def training_step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(batch[0], batch[1]), batch[2]).backward()
        optimizer.step()

    monitor = ModalityContributionMonitor({"image": 0, "table": 1}, output_transform="softmax")
    features = ProbeFeatures(labels=2)
    trainer = SimpleNamespace(global_rank=0, current_epoch=0)

    def gathering() -> None:
        if features._reservoir.count >= features._reservoir.capacity:  # keep measuring the filling reservoir
            features.train_start(trainer, model, monitor, ("image", "table"))
        features.train_batch_start(batch)
        features.train_batch_end(batch)

    features.train_start(trainer, model, monitor, ("image", "table"))
    times = interleaved({"step": training_step, "gather": gathering}, config.repeats, device, inner=config.inner)
    share = ratio(times["gather"], times["step"])
    rows = [
        Row(
            "P11",
            f"demo model, batches of {BATCH}, reservoir filling",
            "gathering ÷ training step",
            share,
            f"≤ {GATHER_TARGET}",
            share.median <= GATHER_TARGET,
            digits=3,
        )
    ]
    table = Table(
        "P11 the collapse probe: milliseconds per verdict (one CPU thread, float64 LBFGS fits: 5 outer folds, C chosen "
        "from 4 by 3 inner folds)",
        ["case", "per verdict", "verdict"],
        _verdict_seconds(config),
        note="A verdict runs only at a check that may flag a modality, once per low modality; the gathering runs on "
        "every training batch from the end of the warm-up.",
    )
    return rows, table
