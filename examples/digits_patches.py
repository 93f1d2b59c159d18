"""Which image patches matter: scikit-learn's bundled 8×8 digits plus a small table, measured per 2×2 patch.

Data: ``sklearn.datasets.load_digits`` (1797 images, bundled, nothing downloads), pixels scaled to [0, 1]. The
table has three columns: ``parity_hint`` (1 for an even digit, flipped for 30% of the samples: a weak, noisy clue)
and two pure-noise columns. A tiny two-branch net is trained for a few epochs with the monitor; the image is cut into
16 patches of 2×2 pixels (``Patches2d((2, 2))``) and the table into its columns (``Columns``).

The image fill is ``"zeros"``: 0 is the digits' background, so an occluded patch looks like blank paper. The script
prints the modality shares, the patch shares as a 4×4 grid, the share of the centre 4×4 pixels against the border
ring, and saves the heat-map (mean image below) and the table's bar chart as PNG, also to TensorBoard.

Run:  python examples/digits_patches.py   (about 15 s on CPU)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mc import Modality, ModalityContributionMonitor
from lightning_mc.masks import Columns, Patches2d
from lightning_mc.views.attribute_figures import patch_heatmap, top_attributes_bar

TABLE_COLUMNS = ["parity_hint", "noise_a", "noise_b"]
PATCHES = Patches2d((2, 2))


def make_data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    digits = load_digits()
    generator = torch.Generator().manual_seed(seed)
    image = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    label = torch.tensor(digits.target, dtype=torch.long)
    flip = torch.rand(len(label), generator=generator) < 0.3
    parity = ((label % 2 == 0) ^ flip).float()
    table = torch.cat([parity[:, None], torch.randn(len(label), 2, generator=generator)], dim=1)
    order = torch.randperm(len(label), generator=generator)
    train, val = order[:1400], order[1400:]
    return TensorDataset(image[train], table[train], label[train]), TensorDataset(image[val], table[val], label[val])


class DigitsNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.image_branch = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 32), nn.ReLU()
        )
        self.table_branch = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
        self.head = nn.Linear(40, 10)

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return self.head(torch.cat([self.image_branch(image), self.table_branch(table)], dim=1))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        image, table, label = batch
        return nn.functional.cross_entropy(self(image, table), label)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        image, table, label = batch
        self.log("val_acc", (self(image, table).argmax(dim=1) == label).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("runs/digits_patches"))
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    train, val = make_data(seed=0)
    monitor = ModalityContributionMonitor(
        [
            Modality("image", key=0, occlusion="zeros", attributes=PATCHES),
            Modality("table", key=1, occlusion="zeros", attributes=Columns(TABLE_COLUMNS)),
        ],
        output_transform="softmax",
    )
    logger = TensorBoardLogger(args.out, name="", version="")
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    trainer.fit(DigitsNet(), DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=200))

    print(f"{'epoch':>5} | {'share image':>11} | {'share table':>11}")
    for entry in monitor.history:
        print(f"{entry['epoch']:>5} | {entry['shares']['image']:>11.3f} | {entry['shares']['table']:>11.3f}")
    result = monitor.latest
    assert result is not None
    print(f"val_acc {trainer.callback_metrics['val_acc'].item():.3f}, measured on {result.num_samples} samples")

    patch_shares = result.attribute_shares["image"]
    print("\nimage patch shares (2x2 patches, rows r0..r3, columns c0..c3):")
    for r in range(4):
        print("  " + " ".join(f"{patch_shares[f'r{r}c{c}']:.3f}" for c in range(4)))
    centre = sum(patch_shares[f"r{r}c{c}"] for r in (1, 2) for c in (1, 2))
    border = result.shares["image"] - centre
    print(f"centre 4x4 pixels (4 patches): {centre:.3f}   border ring (12 patches): {border:.3f}")
    print(
        f"mean share per patch: centre {centre / 4:.4f}, border {border / 12:.4f} "
        f"(ratio {centre / 4 / (border / 12):.1f}x)"
    )
    print("table column shares: " + ", ".join(f"{n} {s:.3f}" for n, s in result.attribute_shares["table"].items()))

    mean_image = val.tensors[0][:, 0].mean(dim=0)
    heatmap = patch_heatmap(patch_shares, PATCHES, mean_image, title="digits: share per 2x2 patch (mean image below)")
    bars = top_attributes_bar(result.attribute_shares["table"], k=3, title="table: share per column")
    args.out.mkdir(parents=True, exist_ok=True)
    for figure, name in ((heatmap, "patch_heatmap"), (bars, "table_columns")):
        path = args.out / f"{name}.png"
        figure.savefig(path, dpi=120)
        logger.experiment.add_figure(f"mc_attributes/{name}", figure, global_step=trainer.global_step)
        print(f"saved {path}")
    logger.experiment.flush()


if __name__ == "__main__":
    main()
