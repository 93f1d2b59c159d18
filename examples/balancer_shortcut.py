"""Balancer on a shortcut: does ModalityBalancer keep the network using its images when the table holds a shortcut?

The data and the network are the collapse demo's (``examples/collapse_demo.py``: noisy 8×8 digits and a table; a
small CNN + MLP fused by a linear head). Each run trains 20 epochs with no stopper, then reports:

- the final image share (the monitor's last check);
- accuracy on the ordinary test set (the validation images and tables: the shortcut is there, as in training);
- accuracy on the shortcut-free test set (the same images, the table replaced by noise of the same σ: no label
  information), i.e. what the network learned from the images when the shortcut is absent at deployment;
- accuracy of the image path alone (the same images, the table encoder's output set to zeros, which is what the
  balancer's dropout feeds the head in training): how much of the remaining gap is the image representation and how
  much is the table branch reacting to a table that carries nothing.

Setups: ``shortcut`` (table = one-hot(label) + noise σ = 0.2, the collapse demo's), ``control`` (a weak, honest
hint, σ = 1: the image legitimately leads with a share of about 0.64, and the balancer must not hurt it), and the
ceiling ``images only`` (the same network whose table is noise in training too). This compares the balancer's
*mechanisms* (how it acts once it acts): none, gradient scaling alone (OGM-GE's rule, ``α = 2``, on any imbalance),
and gradient scaling + OPM-style dropout of the dominant encoder's output while a share is below 0.3 (the defaults of
lightning-mc 0.1). ``--sweep`` adds the other settings tried (docs/how-to/collapse.md has their numbers).
``examples/balancer_evidence.py`` measures *when* to act: the defaults, on two tasks with a genuine case.

Run:  python examples/balancer_shortcut.py   (about 1-2 minutes on 2 CPU cores; --sweep about 5 more)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the collapse demo's data and network
from collapse_demo import HINT, MODALITIES, SHORTCUT, DigitsTableNet, accuracy, make_datasets, shortcut_free

from lightning_mc import ModalityBalancer, ModalityContributionMonitor

ENCODERS = {"image": "image_branch", "table": "table_branch"}
TABLES = {"shortcut": SHORTCUT, "control": HINT, "images only": {"scale": 0.0, "noise": SHORTCUT["noise"]}}

#: name -> ModalityBalancer keyword arguments (None: no balancer).
SETTINGS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "gradient only (α=2, any imbalance)": {"alpha": 2.0, "min_share": None, "dropout": 0.0},
    "dropout 1, below 0.3 (0.1's defaults)": {"min_share": 0.3, "release_share": 0.3},
}
SWEEP: dict[str, dict[str, Any] | None] = {
    "gradient only (α=4, any imbalance)": {"alpha": 4.0, "min_share": None, "dropout": 0.0},
    "gradient only (α=2, below 0.2)": {"alpha": 2.0, "min_share": 0.2, "release_share": 0.2, "dropout": 0.0},
    "dropout 0.25 (any imbalance)": {"min_share": None, "dropout": 0.25},
    "dropout 0.5 (any imbalance)": {"min_share": None, "dropout": 0.5},
    "dropout 1 (any imbalance)": {"min_share": None, "dropout": 1.0},
    "dropout 1, α=2 (any imbalance)": {"alpha": 2.0, "min_share": None, "dropout": 1.0},
    "dropout 0.5, below 0.3": {"min_share": 0.3, "release_share": 0.3, "dropout": 0.5},
    "dropout 1, below 0.2": {"min_share": 0.2, "release_share": 0.2, "dropout": 1.0},
}


@torch.no_grad()
def image_alone_accuracy(model: DigitsTableNet, dataset: Any) -> float:
    """Accuracy with the table encoder's output set to zeros: the image path and the fusion head only."""
    handle = model.table_branch.register_forward_hook(lambda module, inputs, output: torch.zeros_like(output))
    try:
        return accuracy(model, dataset)
    finally:
        handle.remove()


def train_once(setup: str, setting: dict[str, Any] | None, seed: int, epochs: int = 20) -> dict[str, Any]:
    """Trains one network on ``setup`` with ``setting`` and returns its final share and accuracies."""
    table = TABLES[setup]
    L.seed_everything(seed, verbose=False)
    train, val = make_datasets(table, seed=seed)
    monitor = ModalityContributionMonitor(MODALITIES, output_transform="softmax", occlusion="mean", dashboard=False)
    callbacks: list[L.Callback] = [monitor]
    balancer = None
    if setting is not None:
        balancer = ModalityBalancer(ENCODERS, **setting)
        callbacks.append(balancer)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    model = DigitsTableNet()
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256))
    free = shortcut_free(val, table, seed=seed)
    return {
        "image share": monitor.history[-1]["shares"]["image"],
        "test acc": accuracy(model, val),
        "shortcut-free acc": accuracy(model, free),
        "image alone": image_alone_accuracy(model, free),
        "coefficients": None if balancer is None else dict(balancer.coefficients),
    }


def compare(
    settings: dict[str, dict[str, Any] | None], seeds: Sequence[int], epochs: int = 20, verbose: bool = True
) -> list[dict[str, Any]]:
    """Runs every setting on the shortcut and the control, and the images-only ceiling; one row per pair."""
    plan = [(setup, name) for setup in ("shortcut", "control") for name in settings] + [("images only", "none")]
    rows = []
    for setup, name in plan:
        runs = [train_once(setup, settings.get(name), seed, epochs) for seed in seeds]
        row: dict[str, Any] = {"setup": setup, "setting": name}
        for key in ("image share", "test acc", "shortcut-free acc", "image alone"):
            values = [run[key] for run in runs]
            row[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        rows.append(row)
        if verbose:
            print(f"  done: {setup:<11} {name}", flush=True)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """The comparison, mean ± sd over seeds, with the share of the shortcut gap each setting closed."""
    by_key = {(row["setup"], row["setting"]): row for row in rows}
    none_acc = by_key[("shortcut", "none")]["shortcut-free acc"][0]
    ceiling = by_key[("images only", "none")]["shortcut-free acc"][0]
    columns = ("image share", "test acc", "shortcut-free acc", "image alone")
    width = max(len(row["setting"]) for row in rows)
    print(f"{'setup':<11} | {'setting':<{width}} | " + " | ".join(f"{c:>17}" for c in columns) + " | gap closed")
    for row in rows:
        cells = " | ".join(f"{row[c][0]:>9.3f} ± {row[c][1]:.3f}" for c in columns)
        gap = ""
        if row["setup"] == "shortcut":
            gap = f"{(row['shortcut-free acc'][0] - none_acc) / (ceiling - none_acc):>9.0%}"
        print(f"{row['setup']:<11} | {row['setting']:<{width}} | {cells} | {gap}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (seed 0, 1, ...)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also run the other settings tried")
    args = parser.parse_args()
    torch.set_num_threads(1)  # networks this small run fastest on one thread (and far faster on a busy machine)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # the data are in memory
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # no per-run "GPU available" banners
    settings = {**SETTINGS, **SWEEP} if args.sweep else dict(SETTINGS)
    start = time.perf_counter()
    print(f"Training {len(settings) * 2 + 1} setups × {args.seeds} seeds, {args.epochs} epochs each ...")
    rows = compare(settings, range(args.seeds), args.epochs)
    print(f"\nmean ± sd over {args.seeds} seeds; shortcut-free: the table replaced by noise (no label information);")
    print("image alone: the table encoder's output zeroed; gap closed: of the shortcut-free gap to images only\n")
    print_table(rows)
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
