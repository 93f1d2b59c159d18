"""CT volumes + a clinical table with MONAI: which modality the network uses, and where in the volume it looks.

Data (synthetic, nothing downloads): 24³ volumes from ``monai.data.create_test_image_3d``; half of them hold 1–3
spherical lesions (radius 3–5 voxels), the other half are lesion-free noise. The clinical table has five
standardised columns: ``age`` and ``marker`` (a lab value) make a clinical risk score, ``bmi``, ``height`` and ``site``
are pure noise. A patient is positive when the volume has a lesion *and* the risk is high, so the network needs both
modalities (each alone is right for 75% of patients at best).

Pipeline: a MONAI ``Dataset`` with dict transforms (``EnsureChannelFirstd``, ``ScaleIntensityd``, ``RandFlipd`` for
training, ``EnsureTyped``) and MONAI's ``DataLoader``, so every batch holds ``MetaTensor``s; a MONAI 3-D
``Regressor`` encoder for the CT fused with an MLP for the table, trained with Lightning under
``ModalityContributionMonitor`` (modality shares each epoch, the table per column) and ``CollapseEarlyStopping``.
Then, on the positive validation volumes, a ``Patches3d((6, 6, 6))`` attribute map per volume (64 patches, the
functional API on one-volume MONAI batches): the patches whose occlusion moves the prediction most should be the
ones that hold lesion voxels. The script prints how often the top-3 patches hold lesion voxels against the
fraction of all patches that do (what a random map would score).

Run:  python examples/monai_ct_clinical.py   (about 20 s on 2 CPU cores; --quick: about 10 s)
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from monai.data import DataLoader, Dataset, create_test_image_3d
from monai.networks.nets import Regressor
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, RandFlipd, ScaleIntensityd
from monai.utils import set_determinism
from torch import Tensor, nn

from lightning_mc import CollapseEarlyStopping, Modality, ModalityContributionMonitor
from lightning_mc.functional import modality_contribution
from lightning_mc.masks import Columns, Patches3d

SIZE = 24
COLUMNS = ["age", "marker", "bmi", "height", "site"]
#: The clinical columns that make the risk score; the others are noise.
RISK_COLUMNS = ("age", "marker")
PATCHES = Patches3d((6, 6, 6))  # a 4 x 4 x 4 grid of patches over the 24³ volume
TOP_K = 3


def make_samples(num_samples: int, seed: int) -> list[dict[str, Any]]:
    """Dicts of ``ct`` (24³, numpy), ``lesions`` (its lesion mask), ``clinical`` (5 columns) and ``label``."""
    rng = np.random.RandomState(seed)
    samples = []
    for index in range(num_samples):
        has_lesion = index % 2
        image, lesions = create_test_image_3d(
            SIZE, SIZE, SIZE, num_objs=rng.randint(1, 4) if has_lesion else 0, rad_max=5, rad_min=3, noise_max=0.4,
            num_seg_classes=1, random_state=rng,
        )  # fmt: skip
        clinical = rng.normal(size=len(COLUMNS))
        risk = sum(clinical[COLUMNS.index(name)] for name in RISK_COLUMNS)
        samples.append(
            {
                "ct": image.astype(np.float32),
                "lesions": lesions > 0,
                "clinical": clinical.astype(np.float32),
                "label": int(has_lesion and risk > 0),
            }
        )
    return samples


def transforms(train: bool) -> Compose:
    """MONAI dict transforms: channel first, intensities to [0, 1], a random flip when training, MetaTensors."""
    steps: list[Any] = [
        EnsureChannelFirstd(keys="ct", channel_dim="no_channel"),
        ScaleIntensityd(keys="ct"),
    ]
    if train:
        steps.append(RandFlipd(keys="ct", prob=0.5, spatial_axis=0))
    steps.append(EnsureTyped(keys=["ct", "clinical"]))
    return Compose(steps)


def loader(samples: list[dict[str, Any]], train: bool, batch_size: int = 16) -> DataLoader:
    keep = [{key: sample[key] for key in ("ct", "clinical", "label")} for sample in samples]
    return DataLoader(Dataset(keep, transforms(train)), batch_size=batch_size, shuffle=train)


class CTClinicalNet(L.LightningModule):
    """Late fusion: MONAI's 3-D ``Regressor`` as the CT encoder (24³ → 16 features), an MLP for the table."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.ct_encoder = Regressor(
            in_shape=(1, SIZE, SIZE, SIZE), out_shape=(16,), channels=(4, 8, 16), strides=(2, 2, 2)
        )
        self.clinical_encoder = nn.Sequential(nn.Linear(len(COLUMNS), 16), nn.ReLU())
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(32, 2))

    def forward(self, ct: Tensor, clinical: Tensor) -> Tensor:
        return self.head(torch.cat([self.ct_encoder(ct), self.clinical_encoder(clinical)], dim=1))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = nn.functional.cross_entropy(self(batch["ct"], batch["clinical"]), batch["label"])
        self.log("train_loss", loss, batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["ct"], batch["clinical"])
        accuracy = (logits.argmax(1) == batch["label"]).float().mean()
        self.log("val_acc", accuracy, batch_size=len(batch["label"]))
        return logits  # the monitor reuses them as the clean outputs (reuse_outputs=True): one pass fewer

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


MODALITIES = [
    Modality("ct", key="ct", occlusion="mean"),
    Modality("clinical", key="clinical", occlusion="zeros", attributes=Columns(COLUMNS)),
]


class EpochRecorder(L.Callback):
    """After the monitor: keeps each epoch's accuracy and the clinical column shares it logged."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        row = {"val_acc": metrics["val_acc"].item()}
        row.update({name: metrics[f"mc/attr/clinical/{name}"].item() for name in COLUMNS})
        self.rows.append(row)


def print_epochs(monitor: ModalityContributionMonitor, recorder: EpochRecorder) -> None:
    """One row per epoch: the modality shares, the balance, accuracy and the clinical column shares."""
    columns = " ".join(f"{name:>6}" for name in COLUMNS)
    print(f"{'epoch':>5} | {'share/ct':>8} | {'share/clinical':>14} | {'balance':>7} | {'val_acc':>7} | {columns}")
    for entry, row in zip(monitor.history, recorder.rows):
        shares = entry["shares"]
        by_column = " ".join(f"{row[name]:>6.3f}" for name in COLUMNS)
        print(
            f"{entry['epoch']:>5} | {shares['ct']:>8.3f} | {shares['clinical']:>14.3f} | {entry['balance']:>7.3f} | "
            f"{row['val_acc']:>7.3f} | {by_column}"
        )
    print(f"{'':>44}(clinical columns: their shares of the total, summing to share/clinical)")


def lesion_overlap(model: CTClinicalNet, samples: list[dict[str, Any]]) -> tuple[float, float, list[str]]:
    """Per positive volume: the Patches3d map, and whether its top-k patches hold lesion voxels.

    Returns ``(top-k hit fraction, chance fraction, one line per volume)``.
    """
    hits, chance, lines = [], [], []
    patch_masks = PATCHES(torch.zeros(1, 1, SIZE, SIZE, SIZE))
    modalities = [Modality("ct", key="ct", occlusion="mean", attributes=PATCHES), MODALITIES[1]]
    for index, sample in enumerate(samples):
        one = loader([sample], train=False, batch_size=1)  # a MONAI batch of one volume: MetaTensors
        result = modality_contribution(
            model, one, modalities, forward_fn=_forward, output_transform="softmax", max_batch_size=128
        )  # the clean volume and its 64 + 5 occluded copies in one forward call
        patch_raw = result.attribute_raw["ct"]
        lesions = torch.as_tensor(sample["lesions"])[None, None]
        has_lesion = {name: bool((mask & lesions).any()) for name, mask in zip(patch_masks.names, patch_masks.masks)}
        top = sorted(patch_raw, key=patch_raw.get, reverse=True)[:TOP_K]
        hits.append(sum(has_lesion[name] for name in top) / TOP_K)
        chance.append(sum(has_lesion.values()) / len(has_lesion))
        lines.append(
            f"  volume {index:>2}: {sum(has_lesion.values()):>2}/64 patches hold lesion voxels; top-{TOP_K} "
            f"{', '.join(top)} -> {round(hits[-1] * TOP_K)}/{TOP_K} on a lesion (ct share {result.shares['ct']:.2f})"
        )
    return float(np.mean(hits)), float(np.mean(chance)), lines


def _forward(model: CTClinicalNet, batch: dict[str, Tensor]) -> Tensor:
    return model(batch["ct"], batch["clinical"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train", type=int, default=192, help="training volumes")
    parser.add_argument("--val", type=int, default=64, help="validation volumes")
    parser.add_argument("--maps", type=int, default=16, help="positive validation volumes to map with Patches3d")
    parser.add_argument("--quick", action="store_true", help="a small run for tests (few volumes, 3 epochs)")
    parser.add_argument("--log-dir", type=Path, default=Path("runs/monai_ct_clinical"))
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.train, args.val, args.maps = 3, 96, 32, 4
    # One intra-op thread: these small 3-D convolutions gain little from more, a busy machine makes two threads up to
    # 20x slower (measured here), and the printed numbers do not depend on the machine's core count.
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # the volumes are in memory
    start = time.perf_counter()
    L.seed_everything(0, verbose=False)
    set_determinism(seed=0)  # MONAI's random transforms (RandFlipd)

    train, val = make_samples(args.train, seed=0), make_samples(args.val, seed=1)
    monitor = ModalityContributionMonitor(
        MODALITIES, forward_fn=_forward, output_transform="softmax", reuse_outputs=True
    )
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2, warmup_epochs=2, monitor=monitor)
    recorder = EpochRecorder()
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(args.log_dir, name="", version=""),
        callbacks=[monitor, stopper, recorder],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=4,
    )
    model = CTClinicalNet()
    trainer.fit(model, loader(train, train=True), loader(val, train=False))
    batch = next(iter(loader(val, train=False)))
    print(f"batches: {type(batch['ct']).__module__}.{type(batch['ct']).__name__} {tuple(batch['ct'].shape)}")
    print(f"{args.train} training / {args.val} validation volumes of {SIZE}³, {trainer.current_epoch} epochs\n")
    print_epochs(monitor, recorder)
    print(f"\nCollapseEarlyStopping: {stopper.collapse_message or 'no collapse flagged'}")

    positives = [sample for sample in val if sample["label"] == 1][: args.maps]
    top, chance, lines = lesion_overlap(model, positives)
    print(f"\nPatches3d((6, 6, 6)) map of each of {len(positives)} positive validation volumes (64 patches):")
    print("\n".join(lines))
    print(f"top-{TOP_K} hit={top:.3f} chance={chance:.3f}  (fraction of top-{TOP_K} patches holding lesion voxels)")
    experiment = trainer.logger.experiment  # type: ignore[union-attr]
    experiment.add_scalar("lesion_overlap/top3", top, trainer.global_step)
    experiment.add_scalar("lesion_overlap/chance", chance, trainer.global_step)
    experiment.flush()
    print(f"\nDone in {time.perf_counter() - start:.0f} s. TensorBoard: .venv/bin/tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
