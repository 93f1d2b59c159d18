"""Small multimodal models, synthetic data and attribute masks used by the benchmarks."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_mc import Modality
from lightning_mc.core.occlusion import AttributeMasks

NUM_OUTPUTS = 5
COLUMNS = 32
TOKENS = 32
VOCAB = 1000


class ImageTableNet(nn.Module):
    """A CNN image branch plus ``num_tables`` MLP table branches, summed into ``NUM_OUTPUTS`` logits.

    ``convs=1`` is the small model (per-call overhead dominates on small images); ``convs=2`` with wide channels on
    32×32 images is the compute-bound one.
    """

    def __init__(
        self,
        num_tables: int = 1,
        image_size: int = 8,
        channels: int = 8,
        convs: int = 1,
        hidden: int = 32,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for index in range(convs):
            out = channels * 2**index
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.ReLU()]
            width = out
        pooled = min(image_size, 8)
        layers += [nn.AdaptiveAvgPool2d(pooled), nn.Flatten(), nn.Linear(width * pooled * pooled, hidden)]
        self.image = nn.Sequential(*layers)
        self.tables = nn.ModuleList(
            nn.Sequential(nn.Linear(COLUMNS, hidden), nn.ReLU(), nn.Linear(hidden, hidden)) for _ in range(num_tables)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, NUM_OUTPUTS))

    def forward(self, image: Tensor, *tables: Tensor) -> Tensor:
        hidden = self.image(image)
        for branch, table in zip(self.tables, tables):
            hidden = hidden + branch(table)
        return self.head(hidden)


class GatedImageTableNet(ImageTableNet):
    """``ImageTableNet`` (one table) whose two branches are weighted per sample by a gate read from the image.

    The gate is ``sigmoid(sharpness · z)`` with ``z`` the image's standardised per-sample mean (about N(0, 1) on the
    benchmarks' random images), and the head sees ``gate · image branch + (1 − gate) · table branch``. The mean fill
    keeps each image's mean, so occluding either modality leaves the gate as it was. ``sharpness=0`` weighs both
    branches ½ in every sample: per-sample shares vary little (a low-noise measurement, few samples reach a given
    precision). A large ``sharpness`` lets one branch or the other dominate sample by sample: per-sample shares spread
    between 0 and 1 (a high-noise one, many more samples for the same precision).
    """

    def __init__(self, sharpness: float, image_size: int = 16) -> None:
        super().__init__(num_tables=1, image_size=image_size)
        self.sharpness = sharpness

    def forward(self, image: Tensor, *tables: Tensor) -> Tensor:
        (table,) = tables
        z = image.flatten(1).mean(1, keepdim=True) * image[0].numel() ** 0.5
        gate = torch.sigmoid(self.sharpness * z)
        return self.head(gate * self.image(image) + (1 - gate) * self.tables[0](table))


class TextTableNet(nn.Module):
    """A transformer-style text branch (embedding, one encoder layer, mean pool) plus an MLP table branch."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, dim)
        self.position = nn.Parameter(torch.randn(TOKENS, dim) * 0.1)
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, batch_first=True)
        self.text = nn.Linear(dim, dim)
        self.table = nn.Sequential(nn.Linear(COLUMNS, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(dim, NUM_OUTPUTS))

    def forward(self, tokens: Tensor, table: Tensor) -> Tensor:
        encoded = self.encoder(self.embedding(tokens) + self.position)
        return self.head(self.text(encoded.mean(dim=1)) + self.table(table))


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise ``model`` from ``seed`` so every run measures the same weights."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    torch.random.set_rng_state(generator_state)
    return model.eval()


def image_table_batches(
    num_batches: int,
    batch_size: int,
    num_tables: int = 1,
    image_size: int = 8,
    in_channels: int = 1,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> list[tuple[Tensor, ...]]:
    """Tuples ``(image, table_1, ..., table_T)`` of random data."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        image = torch.randn(batch_size, in_channels, image_size, image_size, generator=generator)
        tables = [torch.randn(batch_size, COLUMNS, generator=generator) for _ in range(num_tables)]
        batches.append(tuple(t.to(device) for t in (image, *tables)))
    return batches


def text_table_batches(
    num_batches: int, batch_size: int, device: torch.device | str = "cpu", seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """Tuples ``(token_ids, table)``; token id 0 is the neutral (padding) token used as the text fill."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(1, VOCAB, (batch_size, TOKENS), generator=generator).to(device),
            torch.randn(batch_size, COLUMNS, generator=generator).to(device),
        )
        for _ in range(num_batches)
    ]


class PatchGrid:
    """Attribute masks of a square image cut into ``grid × grid`` patches, shared by all samples."""

    def __init__(self, grid: int) -> None:
        self.grid = grid

    def __call__(self, value: Tensor) -> AttributeMasks:
        size = value.shape[-1]
        step = size // self.grid
        masks = torch.zeros(self.grid * self.grid, 1, 1, size, size, dtype=torch.bool, device=value.device)
        for row in range(self.grid):
            for col in range(self.grid):
                masks[row * self.grid + col, ..., row * step : (row + 1) * step, col * step : (col + 1) * step] = True
        names = tuple(f"p{row}_{col}" for row in range(self.grid) for col in range(self.grid))
        return AttributeMasks(masks, names)


class Positions:
    """One attribute per position of the last dimension (table columns, token positions), shared by all samples."""

    def __call__(self, value: Tensor) -> AttributeMasks:
        width = value.shape[-1]
        masks = torch.eye(width, dtype=torch.bool, device=value.device).reshape(width, 1, width)
        return AttributeMasks(masks, tuple(f"c{index}" for index in range(width)))


def image_table_modalities(
    num_tables: int = 1, patches: int | None = None, columns: bool = False, image_fill: str = "mean"
) -> list[Modality]:
    """The image (whole, or ``patches`` patches) and the tables (whole, or the first one by column)."""
    grid = None if patches is None else round(patches**0.5)
    modalities = [Modality("image", key=0, occlusion=image_fill, attributes=None if grid is None else PatchGrid(grid))]
    for index in range(num_tables):
        by_column = columns and index == 0
        modalities.append(
            Modality(f"table{index}", key=1 + index, occlusion=0.0, attributes=Positions() if by_column else None)
        )
    return modalities


def text_table_modalities(tokens: bool = False) -> list[Modality]:
    return [
        Modality("text", key=0, occlusion=0, attributes=Positions() if tokens else None),
        Modality("table", key=1, occlusion=0.0),
    ]


def num_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


class LitImageTable(L.LightningModule):
    """``ImageTableNet`` trained with cross-entropy on random labels (the fit's time is what matters)."""

    def __init__(self, **net: Any) -> None:
        super().__init__()
        self.net = ImageTableNet(**net)

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return self.net(image, table)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        image, table, label = batch
        return nn.functional.cross_entropy(self(image, table), label)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        image, table, label = batch
        self.log("val_loss", nn.functional.cross_entropy(self(image, table), label))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)
