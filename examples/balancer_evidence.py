"""Does ModalityBalancer's default rescue a collapse and do no harm elsewhere? Two tasks, three cases, three seeds.

Each task pairs a *primary* modality that is slow to learn with a *table*, and comes in three cases that differ only
in what the table holds (``scale`` × the label's code + Gaussian noise of σ ``noise``):

- **shortcut**: a near-perfect, easy code. The network abandons its primary modality during training (its share
  falls to about 0.05). Scored on a *shortcut-free* test set (the same test rows, the table replaced by noise of the
  same σ: no label information, as at a deployment where the shortcut is absent), against the ceiling
  ``<primary> only`` (the same network trained with such a table: it can only learn from the primary modality).
  ``gap closed``: of the shortcut-free gap between no balancer and that ceiling.
- **genuine**: an informative but imperfect table that stays informative at test. The network rightly leans on it;
  the primary modality keeps a modest share (about 0.15–0.3 after the first epochs). Scored on the ordinary test set:
  ``harm`` = accuracy without a balancer − accuracy with it.
- **control**: a weak, honest table; the primary modality leads. Scored on the ordinary test set, ``harm`` as above.

Tasks (nothing downloads; both data sets ship with scikit-learn):

- ``digits``: the collapse demo's (``examples/collapse_demo.py``): noisy 8×8 digits (σ = 0.8) and a 10-column table
  holding the one-hot label; a small CNN and an MLP fused by a linear head; Adam, 20 epochs, batches of 64.
- ``cancer``: scikit-learn's breast-cancer table (569 tumours, 30 cell-nucleus measurements, benign or malignant),
  standardised, with Gaussian noise (σ = 2) so that the cells are slow to learn, and a 4-column table whose first
  column holds ``±scale`` for the label (the rest noise); two MLP branches fused by a linear head; Adam, 30 epochs,
  batches of 64.

Settings: ``none`` and ``defaults`` (``ModalityBalancer()`` with its default thresholds). ``--full`` adds the frontier
of thresholds that chose the defaults (``docs/how-to/collapse.md`` quotes it).

Run:  python examples/balancer_evidence.py   (about 1 minute on 2 CPU cores; --full about 12)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from sklearn.datasets import load_breast_cancer
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the collapse demo's data and network
from collapse_demo import HINT, SHORTCUT, DigitsTableNet, accuracy, make_datasets, shortcut_free

from lightning_mc import ModalityBalancer, ModalityContributionMonitor

CASES = ("shortcut", "genuine", "control")

#: name -> ModalityBalancer keyword arguments (None: no balancer).
SETTINGS: dict[str, dict[str, Any] | None] = {"none": None, "defaults": {}}
FRONTIER: dict[str, dict[str, Any] | None] = {
    "min_share 0.1, release 0.4": {"min_share": 0.1, "release_share": 0.4},
    "min_share 0.12, release 0.4": {"min_share": 0.12, "release_share": 0.4},
    "min_share 0.15, release 0.4": {"min_share": 0.15, "release_share": 0.4},
    "min_share 0.2, release 0.4": {"min_share": 0.2, "release_share": 0.4},
    "min_share 0.12, no hysteresis": {"min_share": 0.12, "release_share": 0.12},
    "min_share 0.3, no hysteresis (0.1's default)": {"min_share": 0.3, "release_share": 0.3},
    "min_share None (any imbalance)": {"min_share": None},
}


@dataclass(frozen=True)
class Task:
    """One task: its modalities, its data for a table setting, its network and its training length."""

    name: str
    primary: str
    tables: dict[str, dict[str, float]]  # case (and "<primary> only") -> table scale and noise
    datasets: Callable[[dict[str, float], int], tuple[TensorDataset, TensorDataset, TensorDataset]]
    network: Callable[[], L.LightningModule]
    epochs: int
    batch_size: int

    @property
    def ceiling(self) -> str:
        return f"{self.primary} only"

    @property
    def encoders(self) -> dict[str, str]:
        return {self.primary: f"{self.primary}_branch", "table": "table_branch"}


# ------------------------------------------------------------------------------------------------------------ digits


class DigitsNet(DigitsTableNet):
    """The collapse demo's network; ``image_branch`` and ``table_branch`` encode the two modalities."""

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        image, table, label = batch  # the demo's step without its per-step log (the same training, faster)
        return nn.functional.cross_entropy(self(image, table), label)


def digits_datasets(table: dict[str, float], seed: int) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Train, test and shortcut-free test sets of the collapse demo (the demo's validation set is the test set)."""
    train, test = make_datasets(table, seed=seed)
    return train, test, shortcut_free(test, table, seed=seed)


DIGITS = Task(
    name="digits",
    primary="image",
    tables={
        "shortcut": SHORTCUT,
        "genuine": {"scale": 1.0, "noise": 0.3},
        "control": HINT,
        "image only": {"scale": 0.0, "noise": SHORTCUT["noise"]},
    },
    datasets=digits_datasets,
    network=DigitsNet,
    epochs=20,
    batch_size=64,
)

# ------------------------------------------------------------------------------------------------------------ cancer

CELL_NOISE = 2.0  # on standardised measurements: the cells alone reach about 0.8
NUM_TEST = 169


def cancer_datasets(table: dict[str, float], seed: int) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Train, test and shortcut-free test sets of (noisy cell measurements, table, label); ``seed`` draws the split."""
    data = load_breast_cancer()
    generator = torch.Generator().manual_seed(seed)
    cells = torch.tensor(data.data, dtype=torch.float32)
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=generator)
    test, train = order[:NUM_TEST], order[NUM_TEST:]
    cells = (cells - cells[train].mean(0)) / cells[train].std(0)
    cells = cells + CELL_NOISE * torch.randn(cells.shape, generator=generator)
    code = torch.zeros(len(labels), 4)
    code[:, 0] = table["scale"] * (2.0 * labels - 1.0)
    tables = code + table["noise"] * torch.randn(code.shape, generator=generator)
    free = table["noise"] * torch.randn(code.shape, generator=generator)
    return (
        TensorDataset(cells[train], tables[train], labels[train]),
        TensorDataset(cells[test], tables[test], labels[test]),
        TensorDataset(cells[test], free[test], labels[test]),
    )


class CancerNet(L.LightningModule):
    """Late fusion of two small MLPs (cells: 30 → 16, table: 4 → 16) by a linear head."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.cells_branch = nn.Sequential(nn.Linear(30, 16), nn.ReLU())
        self.table_branch = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
        self.head = nn.Linear(32, 2)

    def forward(self, cells: Tensor, table: Tensor) -> Tensor:
        return self.head(torch.cat([self.cells_branch(cells), self.table_branch(table)], dim=1))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        cells, table, label = batch
        return nn.functional.cross_entropy(self(cells, table), label)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


CANCER = Task(
    name="cancer",
    primary="cells",
    tables={
        "shortcut": {"scale": 5.0, "noise": 0.3},
        "genuine": {"scale": 5.0, "noise": 2.75},
        "control": {"scale": 5.0, "noise": 7.0},
        "cells only": {"scale": 0.0, "noise": 0.3},
    },
    datasets=cancer_datasets,
    network=CancerNet,
    epochs=30,
    batch_size=64,
)

TASKS = {task.name: task for task in (DIGITS, CANCER)}

#: ``(case, setting) -> measure -> one value per seed``.
Results = dict[tuple[str, str], dict[str, list[float]]]

# --------------------------------------------------------------------------------------------------------- training


def train_once(task: Task, case: str, setting: dict[str, Any] | None, seed: int) -> dict[str, float]:
    """Trains ``task``'s network on ``case`` with ``setting`` (None: no balancer); its shares and accuracies."""
    L.seed_everything(seed, verbose=False)
    train, test, free = task.datasets(task.tables[case], seed)
    monitor = ModalityContributionMonitor(
        {task.primary: 0, "table": 1}, output_transform="softmax", occlusion="mean", dashboard=False
    )
    balancer = None if setting is None else ModalityBalancer(task.encoders, **setting)
    trainer = L.Trainer(
        max_epochs=task.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[monitor] if balancer is None else [monitor, balancer],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    model = task.network()
    # batches cut by index lists: the batches of DataLoader(train, batch_size, shuffle=True), without per-row collation
    batches = BatchSampler(RandomSampler(train), task.batch_size, drop_last=False)
    trainer.fit(model, DataLoader(train, batch_size=None, sampler=batches), DataLoader(test, batch_size=512))
    return {
        "lowest share": min(min(entry["shares"].values()) for entry in monitor.history),
        "final share": monitor.history[-1]["shares"][task.primary],
        "epochs engaged": 0.0 if balancer is None else float(sum(entry["active"] for entry in balancer.history)),
        "test acc": accuracy(model, test),
        "shortcut-free acc": accuracy(model, free),
    }


def compare(
    task: Task, settings: dict[str, dict[str, Any] | None], seeds: Sequence[int], verbose: bool = False
) -> Results:
    """``(case, setting) -> measure -> one value per seed`` for every case and setting, and the ceiling."""
    plan = [(case, name) for case in CASES for name in settings] + [(task.ceiling, "none")]
    results: Results = {}
    for case, name in plan:
        runs = [train_once(task, case, settings.get(name), seed) for seed in seeds]
        results[(case, name)] = {key: [run[key] for run in runs] for key in runs[0]}
        if verbose:
            print(f"  done: {task.name} {case} {name}", flush=True)
    return results


def mean(values: list[float]) -> float:
    return statistics.mean(values)


def gap_closed(task: Task, results: Results, setting: str) -> float:
    """The fraction of the shortcut-free gap between no balancer and the ``<primary> only`` ceiling that ``setting``
    closed."""
    none = mean(results[("shortcut", "none")]["shortcut-free acc"])
    ceiling = mean(results[(task.ceiling, "none")]["shortcut-free acc"])
    return (mean(results[("shortcut", setting)]["shortcut-free acc"]) - none) / (ceiling - none)


def harm(results: Results, case: str, setting: str) -> float:
    """Test accuracy lost to ``setting`` in ``case`` (positive: the balancer hurt)."""
    return mean(results[(case, "none")]["test acc"]) - mean(results[(case, setting)]["test acc"])


def print_table(task: Task, results: Results) -> None:
    """One row per case and setting (mean ± sd over seeds), then one line per setting: gap closed and harm."""
    columns = ("lowest share", "final share", "test acc", "shortcut-free acc")
    header = ["lowest share", f"final {task.primary} share", "test acc", "shortcut-free acc"]
    width = max(len(name) for _, name in results)
    print(f"{'case':<11} | {'setting':<{width}} | " + " | ".join(f"{c:>19}" for c in header) + " | engaged |   harm")
    for (case, name), values in results.items():
        cells = " | ".join(f"{mean(values[c]):>11.3f} ± {statistics.pstdev(values[c]):.3f}" for c in columns)
        lost = f"{harm(results, case, name):+.3f}" if case in ("genuine", "control") else ""
        print(f"{case:<11} | {name:<{width}} | {cells} | {mean(values['epochs engaged']):>7.0f} | {lost:>6}")
    for name in dict.fromkeys(name for _, name in results if name != "none"):
        print(
            f"{task.name} {name}: gap closed {gap_closed(task, results, name):.0%}; harm genuine "
            f"{harm(results, 'genuine', name):+.3f}, control {harm(results, 'control', name):+.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (seed 0, 1, ...)")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    parser.add_argument("--full", action="store_true", help="also run the frontier of thresholds")
    parser.add_argument("--verbose", action="store_true", help="print a line after each setting")
    args = parser.parse_args()
    torch.set_num_threads(1)  # networks this small run fastest on one thread (and far faster on a busy machine)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # the data are in memory
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # no per-run banners, no engage/release lines
    settings = {**SETTINGS, **FRONTIER} if args.full else dict(SETTINGS)
    defaults = ModalityBalancer({"a": "a"})
    print(
        f"ModalityBalancer defaults: min_share={defaults.min_share}, release_share={defaults.release_share}, "
        f"alpha={defaults.alpha}, dropout={defaults.dropout}"
    )
    print(f"mean ± sd over seeds 0-{args.seeds - 1}; engaged: epochs the balancer acted (mean over seeds); harm: test")
    print("accuracy lost to the balancer; gap closed: of the shortcut-free gap between none and <primary> only")
    start = time.perf_counter()
    for name in args.tasks:
        task = TASKS[name]
        print(f"\n{task.name}: {task.primary} + table, {task.epochs} epochs")
        print_table(task, compare(task, settings, range(args.seeds), args.verbose))
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
