"""Tiny models and data shared by the tests (importable by ddp_spawn workers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 3


class TwoModalityNet(L.LightningModule):
    """An image branch (1×8×8) and a table branch (5 columns), summed into ``NUM_CLASSES`` logits."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.image_branch = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, NUM_CLASSES)
        )
        self.table_branch = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, NUM_CLASSES))

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return self.image_branch(image) + self.table_branch(table)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        image, table, label = batch
        return nn.functional.cross_entropy(self(image, table), label)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        image, table, label = batch
        self.log("val_loss", nn.functional.cross_entropy(self(image, table), label))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def two_modality_dataset(num_samples: int = 48, seed: int = 0) -> TensorDataset:
    """Images, tables and labels where both modalities carry some signal about the label."""
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
    image = torch.randn(num_samples, 1, 8, 8, generator=generator)
    image[:, 0, label, :] += 1.0  # rows 0..2 light up with the class
    table = torch.randn(num_samples, 5, generator=generator)
    table[torch.arange(num_samples), label] += 1.0
    return TensorDataset(image, table, label)


def loader(dataset: TensorDataset, batch_size: int = 16) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def trainer_kwargs(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A fast, quiet CPU trainer configuration."""
    kwargs: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    kwargs.update(overrides)
    return kwargs
