"""Quickstart: watch two modalities' contributions while a small multimodal model trains.

Synthetic data: an 8×8 "image" and a 10-column "table" each carry part of the label. The label is 1 when the
image's bright-blob score plus the table's risk score is positive, so both modalities matter.

Run:  python examples/quickstart.py   (about 20 s on 2 CPU cores)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mc import ModalityContributionMonitor


def make_data(num_samples: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(num_samples, 1, 8, 8, generator=generator)
    table = torch.randn(num_samples, 10, generator=generator)
    image_score = image[:, 0, 2:6, 2:6].mean(dim=(1, 2)) * 4  # a blob in the centre
    table_score = table[:, :3].sum(dim=1) / 3**0.5  # three informative columns
    label = (image_score + table_score > 0).long()
    return TensorDataset(image, table, label)


class ImageTableNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.image_branch = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 16)
        )
        self.table_branch = nn.Sequential(nn.Linear(10, 16), nn.ReLU())
        self.head = nn.Linear(32, 2)

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return self.head(torch.cat([self.image_branch(image), self.table_branch(table)], dim=1))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        image, table, label = batch
        loss = nn.functional.cross_entropy(self(image, table), label)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        image, table, label = batch
        logits = self(image, table)
        self.log("val_loss", nn.functional.cross_entropy(logits, label))
        self.log("val_acc", (logits.argmax(dim=1) == label).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class PrintShares(L.Callback):
    """Prints one table row per measured epoch from the monitor's history."""

    def __init__(self, monitor: ModalityContributionMonitor) -> None:
        self.monitor = monitor
        self.printed = 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or len(self.monitor.history) == self.printed:
            return
        if self.printed == 0:
            names = self.monitor.modality_names
            print(
                f"{'epoch':>5} | " + " | ".join(f"{'share ' + n:>12}" for n in names) + f" | {'balance':>7} | val_acc"
            )
        entry = self.monitor.history[-1]
        shares = " | ".join(f"{entry['shares'][n]:>12.3f}" for n in self.monitor.modality_names)
        accuracy = trainer.callback_metrics["val_acc"].item()
        print(f"{entry['epoch']:>5} | {shares} | {entry['balance']:>7.3f} | {accuracy:.3f}")
        self.printed = len(self.monitor.history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--logdir", type=Path, default=Path("runs/quickstart"))
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    train = DataLoader(make_data(1024, seed=0), batch_size=64, shuffle=True)
    val = DataLoader(make_data(256, seed=1), batch_size=128)
    monitor = ModalityContributionMonitor({"image": 0, "table": 1}, output_transform="softmax", occlusion="mean")
    logger = TensorBoardLogger(args.logdir, name="", version="")
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=[monitor, PrintShares(monitor)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=8,
    )
    trainer.fit(ImageTableNet(), train, val)
    print(f"\nTensorBoard logs: {logger.log_dir}\nOpen them with:   .venv/bin/tensorboard --logdir {logger.log_dir}")


if __name__ == "__main__":
    main()
