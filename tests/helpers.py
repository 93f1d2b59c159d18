"""Tiny models and data shared by the tests (importable by ddp_spawn workers)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
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


class ScheduledContributionNet(L.LightningModule):
    """Frozen linear branches whose weights follow a per-epoch schedule: the shares are planted, not learned.

    ``forward = image_scale · A(image) + table_scale · B(table)`` with ``A``, ``B`` fixed linear maps and
    ``(image_scale, table_scale) = schedule[current_epoch]`` (the last entry repeats). With ``occlusion="zeros"``
    and no output transform each modality's raw value is proportional to its scale, so the image share at an
    epoch is ``s_i·r_i / (s_i·r_i + s_t·r_t)`` with ``r_i``, ``r_t`` the shares' values at scales (1, 1).
    """

    def __init__(self, schedule: list[tuple[float, float]]) -> None:
        super().__init__()
        self.schedule = schedule
        self.image_scale, self.table_scale = schedule[0]
        self.image_head = nn.Linear(64, NUM_CLASSES)
        self.table_head = nn.Linear(5, NUM_CLASSES)
        self.bias = nn.Parameter(torch.zeros(NUM_CLASSES))  # the only trained parameter: shares stay as planted
        for parameter in (*self.image_head.parameters(), *self.table_head.parameters()):
            parameter.requires_grad_(False)

    def on_train_epoch_start(self) -> None:
        self.image_scale, self.table_scale = self.schedule[min(self.current_epoch, len(self.schedule) - 1)]

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return (
            self.image_scale * self.image_head(image.flatten(1)) + self.table_scale * self.table_head(table) + self.bias
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        image, table, label = batch
        return nn.functional.cross_entropy(self(image, table), label)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.bias], lr=0.0)


class Lambda(nn.Module):
    """A module that calls ``function``: a model written as one expression (``Lambda(lambda a, b: a.sum(1))``)."""

    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.function(*inputs)


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (not a package) so a test can use its builders and functions."""
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module
