"""Genes or clinic? Modality and attribute contributions on a real breast-cancer cohort, next to single-modality AUCs.

Data: scikit-survival's bundled ``load_breast_cancer`` (198 lymph-node-negative patients; 76 gene-expression values
of the 76-gene metastasis signature, plus age, oestrogen-receptor status, grade and tumour size; nothing downloads).

Task: **distant metastasis within 5 years** (binary). Distant metastasis is what makes breast cancer lethal, and
deciding who needs adjuvant chemotherapy is exactly the question the 76-gene signature was built to answer. The
label uses the time to distant metastasis (``t.tdm``, days) and its event flag (``e.tdm``): 1 = metastasis by day
1826, 0 = metastasis-free beyond day 1826; the 9 patients censored before 5 years have no known label and are left
out (counting them as negatives would bias the task). That leaves 189 patients, 35 positive.

Model: a two-branch net (genes: 76 → 16, clinical: 6 → 8, one logit), trained with ``ModalityContributionMonitor``
(sigmoid outputs, fill 0 = the training mean after standardisation); genes are measured per gene (``Columns``),
clinical variables per variable (``ColumnGroups``: the three grade indicators are one attribute). Everything runs in
5-fold stratified cross-validation (seeded): the shares are measured on each held-out fold, and the same branches
trained alone give the single-modality AUCs, as in Gapp et al.

Pictures: the top genes and the clinical variables (mean attribute share over folds) are saved as PNG under ``--out``
and written to TensorBoard there (``.venv/bin/tensorboard --logdir runs/breast_cancer``), next to fold 0's share
curves and the monitor's own top-genes figure (``mc_attributes/genes``: 76 genes are too many for scalars).

Run:  python examples/breast_cancer_genes_clinical.py   (about 30 s on CPU)
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sksurv.datasets import load_breast_cancer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mc import Modality, ModalityContributionMonitor
from lightning_mc.masks import ColumnGroups, Columns
from lightning_mc.views.attribute_figures import top_attributes_bar

FIVE_YEARS_DAYS = 1826
CLINICAL_GROUPS = {"age": [0], "er": [1], "grade": [2, 3, 4], "size": [5]}


def load_task() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Genes (n, 76), clinical (n, 6), label (n,) for distant metastasis within 5 years, and the gene names."""
    features, outcome = load_breast_cancer()
    event, time = outcome["e.tdm"], outcome["t.tdm"]
    known = (event & (time <= FIVE_YEARS_DAYS)) | (time > FIVE_YEARS_DAYS)
    label = (event & (time <= FIVE_YEARS_DAYS))[known].astype(np.float32)
    features = features[known]
    gene_names = [c for c in features.columns if c not in ("age", "er", "grade", "size")]
    genes = features[gene_names].to_numpy(np.float32)
    grade = features["grade"].astype(str)
    clinical = np.stack(
        [
            features["age"].to_numpy(float),
            (features["er"].astype(str) == "positive").to_numpy(float),
            (grade == "well differentiated").to_numpy(float),
            (grade == "intermediate").to_numpy(float),
            (grade == "poorly differentiated").to_numpy(float),
            features["size"].to_numpy(float),
        ],
        axis=1,
    ).astype(np.float32)
    return genes, clinical, label, gene_names


def standardise(train: np.ndarray, test: np.ndarray) -> tuple[Tensor, Tensor]:
    mean, std = train.mean(0), train.std(0) + 1e-6
    return torch.tensor((train - mean) / std), torch.tensor((test - mean) / std)


class TwoBranchNet(L.LightningModule):
    """Genes and clinical branches concatenated into one logit; ``use`` drops a branch for single-modality models."""

    def __init__(self, num_genes: int, num_clinical: int, use: tuple[str, ...] = ("genes", "clinical")) -> None:
        super().__init__()
        self.use = use
        self.genes = nn.Sequential(nn.Dropout(0.2), nn.Linear(num_genes, 16), nn.ReLU())
        self.clinical = nn.Sequential(nn.Linear(num_clinical, 8), nn.ReLU())
        width = (16 if "genes" in use else 0) + (8 if "clinical" in use else 0)
        self.head = nn.Linear(width, 1)

    def forward(self, genes: Tensor, clinical: Tensor) -> Tensor:
        parts = ([self.genes(genes)] if "genes" in self.use else []) + (
            [self.clinical(clinical)] if "clinical" in self.use else []
        )
        return self.head(torch.cat(parts, dim=1))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        genes, clinical, label = batch
        return nn.functional.binary_cross_entropy_with_logits(self(genes, clinical)[:, 0], label)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        genes, clinical, label = batch
        self.log("val_loss", nn.functional.binary_cross_entropy_with_logits(self(genes, clinical)[:, 0], label))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3, weight_decay=1e-3)


def fit(
    model: TwoBranchNet,
    train: TensorDataset,
    test: TensorDataset,
    epochs: int,
    callbacks: list,
    logger: Logger | bool = False,
) -> float:
    """Train ``model`` and return its AUC on ``test``."""
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(test, batch_size=len(test)))
    model.eval()
    with torch.no_grad():
        scores = model(test.tensors[0], test.tensors[1])[:, 0].numpy()
    return float(roc_auc_score(test.tensors[2].numpy(), scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/breast_cancer"))
    args = parser.parse_args()
    tensorboard = TensorBoardLogger(args.out, name="", version="")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")

    genes, clinical, label, gene_names = load_task()
    print(f"patients {len(label)}, metastasis within 5 years {int(label.sum())}, genes {genes.shape[1]}")
    folds = StratifiedKFold(args.folds, shuffle=True, random_state=0).split(genes, label)
    aucs: dict[str, list[float]] = {"genes+clinical": [], "genes only": [], "clinical only": []}
    shares: list[dict[str, float]] = []
    gene_shares: list[dict[str, float]] = []
    clinical_shares: list[dict[str, float]] = []
    first_history: list[dict] = []
    for fold, (train_index, test_index) in enumerate(folds):
        genes_train, genes_test = standardise(genes[train_index], genes[test_index])
        clinical_train, clinical_test = standardise(clinical[train_index], clinical[test_index])
        train = TensorDataset(genes_train, clinical_train, torch.tensor(label[train_index]))
        test = TensorDataset(genes_test, clinical_test, torch.tensor(label[test_index]))
        monitor = ModalityContributionMonitor(
            [
                Modality("genes", key=0, attributes=Columns(gene_names)),
                Modality("clinical", key=1, attributes=ColumnGroups(CLINICAL_GROUPS)),
            ],
            output_transform="sigmoid",
            occlusion="zeros",
            every_n_epochs=10,
        )
        for use, name in (
            (("genes", "clinical"), "genes+clinical"),
            (("genes",), "genes only"),
            (("clinical",), "clinical only"),
        ):
            L.seed_everything(fold, verbose=False)
            model = TwoBranchNet(genes.shape[1], clinical.shape[1], use)
            multimodal = name == "genes+clinical"
            logger = tensorboard if multimodal and fold == 0 else False  # fold 0's share curves go to TensorBoard
            aucs[name].append(fit(model, train, test, args.epochs, [monitor] if multimodal else [], logger))
        result = monitor.latest
        assert result is not None
        shares.append(result.shares)
        gene_shares.append(result.attribute_shares["genes"])
        clinical_shares.append(result.attribute_shares["clinical"])
        if fold == 0:
            first_history = monitor.history

    print("\nShares over training (fold 0, held-out patients):")
    print("| epoch | genes | clinical |\n|---:|---:|---:|")
    for entry in first_history:
        print(f"| {entry['epoch']} | {entry['shares']['genes']:.3f} | {entry['shares']['clinical']:.3f} |")

    print(f"\nFinal shares and test AUCs, mean ± sd over {args.folds} folds:")
    print("| modality | share (genes+clinical model) | AUC of a model on this modality alone |\n|---|---:|---:|")
    for modality, name in (("genes", "genes only"), ("clinical", "clinical only")):
        values = [s[modality] for s in shares]
        print(
            f"| {modality} | {np.mean(values):.3f} ± {np.std(values):.3f} | "
            f"{np.mean(aucs[name]):.3f} ± {np.std(aucs[name]):.3f} |"
        )
    both = aucs["genes+clinical"]
    print(f"| genes+clinical (AUC) | | {np.mean(both):.3f} ± {np.std(both):.3f} |")

    args.out.mkdir(parents=True, exist_ok=True)
    for title, per_fold, k in (("genes", gene_shares, 8), ("clinical variables", clinical_shares, 4)):
        mean = {name: float(np.mean([fold[name] for fold in per_fold])) for name in per_fold[0]}
        top = sorted(mean.items(), key=lambda item: item[1], reverse=True)[:k]
        print(f"\nTop {title} (mean attribute share over folds):")
        print("| attribute | share |\n|---|---:|")
        for name, value in top:
            print(f"| {name} | {value:.4f} |")
        figure = top_attributes_bar(mean, k=max(k, 10) if title == "genes" else k, title=f"top {title}, mean share")
        tag = title.split()[0]
        figure.savefig(args.out / f"top_{tag}.png", dpi=120)
        tensorboard.experiment.add_figure(f"mc_attributes/top_{tag}_over_folds", figure)
        print(f"saved {args.out / f'top_{tag}.png'}")
    tensorboard.experiment.flush()


if __name__ == "__main__":
    main()
