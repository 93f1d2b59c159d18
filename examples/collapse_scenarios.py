"""Collapse scenarios: what CollapseEarlyStopping decides, label-free and with labels=, where the truth is planted.

A small image + table task (four classes; a 64-pixel "image" holding its class's template at amplitude 0.2 in unit
noise: informative, slow to learn; an 8-column table; a late-fusion MLP) trained under eight planted truths, one row
each, over five seeds. Where a shortcut is planted it is the label's one-hot × 2 plus noise σ = 0.2 (near-perfect,
easy); everywhere else the table holds an honest hint, the one-hot in noise σ = 1.

- ``collapse at epoch 4``: the hint until epoch 4, then the shortcut, in training and validation: the image, learned
  by then, is abandoned. Planted onset: epoch 4.
- ``collapse from epoch 0``: the shortcut from the first step. Planted onset: epoch 0.
- ``dominant table``: the table is genuinely the better modality (the one-hot in noise σ = 0.5), at test too.
- ``pure-noise table``: the table holds nothing about the label (noise σ = 0.5); the network is right to ignore it.
- ``redundant copies``: the table is the image's own evidence, its projection on the four templates: either alone
  carries what both do.
- ``transient dip``: the shortcut for epoch 4 only, then the hint again.
- ``train-only shortcut``: the shortcut in the training tables only; validation and test tables hold the hint.
  Planted onset: epoch 0 (in training).
- ``  on a training slice``: the same training, measured (and stopped) on a held-out slice of the training data:
  the recipe for a shortcut the validation set does not have (a second monitor on such a slice).

Each run trains with one monitor and two stoppers side by side, both ``action="warn"`` so that neither ends the
other's run: one label-free, one with ``labels=2``, both ``min_share=0.1, patience=2, warmup_epochs=2``. A stop epoch
is the epoch whose check flagged the collapse, where ``action="stop"`` ends the run
(``tests/test_collapse_scenarios.py`` checks that). A stopper's *kept* model is the model at its stop (the last
epoch's without one); ``kept acc`` is its accuracy on a shortcut-free test set (the test split's table: the hint
where training had the shortcut, the same kind of table elsewhere). The label-based indicator beside it, as OGM-GE
and BalanceBenchmark report it: the final model's validation accuracy with the other modality occluded (its
validation mean).

Run:  python examples/collapse_scenarios.py   (about 30 s on 2 CPU cores; --seeds 1 --epochs 8 for a quick look)
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import re
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_mc import CollapseEarlyStopping, ModalityContributionMonitor

NUM_CLASSES = 4
PIXELS = 64
COLUMNS = 8
MODALITIES = {"image": 0, "table": 1}
#: Amplitude of the class template in the image (unit noise): informative, slower to learn than the table.
IMAGE_SIGNAL = 0.2
#: The same for the multi-label and survival rows: the findings or the risk times the templates.
TASK_IMAGE_SIGNAL = 0.2
#: The shortcut: the label's one-hot × SHORTCUT_SCALE plus noise of σ SHORTCUT_NOISE (near-perfect and easy).
SHORTCUT_SCALE, SHORTCUT_NOISE = 2.0, 0.2
#: The honest hint: the one-hot in noise of this σ.
HINT_NOISE = 1.0
#: A genuinely better table: the one-hot in noise of this σ, at training and at test.
GENUINE_NOISE = 0.5
#: A table with nothing to give: noise of this σ, whatever the label.
NOISE = 0.5
#: The stoppers' settings, the same for every row.
STOPPER = {"min_share": 0.1, "patience": 2, "warmup_epochs": 2}
LEARNING_RATE = 1e-2


@dataclass(frozen=True)
class Scenario:
    """A planted truth: the table each split holds at each epoch, and the epoch a collapse begins."""

    name: str
    #: ``(split, epoch) -> table kind`` (a key of :attr:`PlantedData.tables`); split: "train", "val" or "test".
    table: Callable[[str, int], str]
    #: The epoch a collapse is planted to begin (``None``: none planted).
    onset: int | None
    #: The schedule the validation set follows: "val", or "train" for a held-out slice of the training data.
    val_split: str = "val"
    #: What the labels are: "classes" (four classes), "multilabel" (four findings) or "survival" ([time, event]).
    task: str = "classes"


def shortcut(when: Callable[[int], bool], splits: tuple[str, ...] = ("train", "val")) -> Callable[[str, int], str]:
    """The shortcut in ``splits`` at the epochs where ``when(epoch)``, the hint everywhere else."""
    return lambda split, epoch: "shortcut" if split in splits and when(epoch) else "hint"


SCENARIOS = [
    Scenario("collapse at epoch 4", shortcut(lambda epoch: epoch >= 4), onset=4),
    Scenario("collapse from epoch 0", shortcut(lambda epoch: True), onset=0),
    Scenario("dominant table", lambda split, epoch: "genuine", onset=None),
    Scenario("pure-noise table", lambda split, epoch: "noise", onset=None),
    Scenario("redundant copies", lambda split, epoch: "copy", onset=None),
    Scenario("transient dip", shortcut(lambda epoch: epoch == 4), onset=None),
    Scenario("train-only shortcut", shortcut(lambda epoch: True, ("train",)), onset=0),
    Scenario("  on a training slice", shortcut(lambda epoch: True, ("train",)), onset=0, val_split="train"),
]


#: The small-set rows: a collapse, nothing to give, both modalities informative, a dip; multi-label and survival labels.
SMALL_SET_SCENARIOS = [
    SCENARIOS[0],
    SCENARIOS[1],
    SCENARIOS[3],
    SCENARIOS[4],
    SCENARIOS[5],
    Scenario("multi-label collapse", shortcut(lambda epoch: True), onset=0, task="multilabel"),
    Scenario("survival collapse", shortcut(lambda epoch: True), onset=0, task="survival"),
]
#: Validation set sizes of the small-set rows (the training set: SMALL_SET_TRAIN samples, ≥ 10× larger).
SMALL_SET_VAL, SMALL_SET_TRAIN = (40, 100), 1000


def planted_labels(task: str, num: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """The labels of ``task``, and the ``(num, NUM_CLASSES)`` truths that the image and the table carry of them.

    Findings: each present with probability 0.3; image and table carry the multi-hot. Survival: an exponential event
    time whose log-hazard is a latent risk, censored at random (about 30 %); the image carries the risk, the table the
    label itself (minus the log time and the event: what a leaked follow-up field would hold).
    """
    if task == "multilabel":
        findings = (torch.rand(num, NUM_CLASSES, generator=generator) < 0.3).float()
        return findings, findings, findings
    risk = torch.randn(num, generator=generator)
    event_time = -torch.log(torch.rand(num, generator=generator)) / torch.exp(risk)
    censor_time = -torch.log(torch.rand(num, generator=generator)) * 2.0
    labels = torch.stack([torch.minimum(event_time, censor_time), (event_time <= censor_time).float()], dim=1)
    leaked = torch.stack([-torch.log(labels[:, 0]), labels[:, 1]], dim=1)
    return labels, nn.functional.pad(risk[:, None], (0, NUM_CLASSES - 1)), nn.functional.pad(leaked, (0, 2))


class PlantedData(Dataset):
    """One split: images, labels and a table of every kind; the scenario and :attr:`epoch` pick the table served."""

    def __init__(self, scenario: Scenario, split: str, num: int, templates: Tensor, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.scenario, self.split, self.epoch = scenario, split, 0
        if scenario.task == "classes":
            self.labels = torch.randint(0, NUM_CLASSES, (num,), generator=generator)
            self.images = IMAGE_SIGNAL * templates[self.labels] + torch.randn(num, PIXELS, generator=generator)
            truth = nn.functional.one_hot(self.labels, NUM_CLASSES).float()
        else:
            self.labels, seen, truth = planted_labels(scenario.task, num, generator)
            self.images = TASK_IMAGE_SIGNAL * seen @ templates + torch.randn(num, PIXELS, generator=generator)
        one_hot = nn.functional.pad(truth, (0, COLUMNS - NUM_CLASSES))
        evidence = self.images @ templates.T / templates.norm(dim=1)  # the image's evidence for each class
        self.tables = {
            "shortcut": SHORTCUT_SCALE * one_hot + SHORTCUT_NOISE * torch.randn(num, COLUMNS, generator=generator),
            "hint": one_hot + HINT_NOISE * torch.randn(num, COLUMNS, generator=generator),
            "genuine": one_hot + GENUINE_NOISE * torch.randn(num, COLUMNS, generator=generator),
            "noise": NOISE * torch.randn(num, COLUMNS, generator=generator),
            "copy": torch.cat([evidence, torch.zeros(num, COLUMNS - NUM_CLASSES)], dim=1),
        }

    def table(self) -> Tensor:
        """The tables this split holds at :attr:`epoch`."""
        return self.tables[self.scenario.table(self.split, self.epoch)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.images[index], self.table()[index], self.labels[index]


class PlantSchedule(L.Callback):
    """Serves each epoch's tables, in training and validation."""

    def __init__(self, *datasets: PlantedData) -> None:
        self.datasets = datasets

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for dataset in self.datasets:
            dataset.epoch = trainer.current_epoch


class KeepWeights(L.Callback):
    """The model's weights after each epoch's training: what a stop at that epoch keeps."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, Tensor]] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.weights[trainer.current_epoch] = copy.deepcopy(pl_module.state_dict())


def cox_loss(risk: Tensor, labels: Tensor) -> Tensor:
    """Breslow's negative log partial likelihood of ``risk`` for ``[time, event]`` labels (ties broken by order)."""
    order = torch.argsort(labels[:, 0], descending=True)
    risk, event = risk[order], labels[order, 1]
    return -((risk - torch.logcumsumexp(risk, dim=0)) * event).sum() / event.sum().clamp(min=1)


class FusionNet(L.LightningModule):
    """Late fusion: an MLP per modality, a linear head on both embeddings; the loss of the task's labels."""

    def __init__(self, task: str = "classes") -> None:
        super().__init__()
        self.task = task
        self.image_branch = nn.Sequential(nn.Linear(PIXELS, 32), nn.ReLU())
        self.table_branch = nn.Sequential(nn.Linear(COLUMNS, 32), nn.ReLU())
        self.head = nn.Linear(64, 1 if task == "survival" else NUM_CLASSES)

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return self.head(torch.cat([self.image_branch(image), self.table_branch(table)], dim=1))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        image, table, label = batch
        output = self(image, table)
        if self.task == "multilabel":
            return nn.functional.binary_cross_entropy_with_logits(output, label)
        if self.task == "survival":
            return cox_loss(output[:, 0], label)
        return nn.functional.cross_entropy(output, label)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        image, table, _ = batch
        self(image, table)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=LEARNING_RATE)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, tables: Tensor, labels: Tensor) -> float:
    """Accuracy of ``model`` in eval mode (NaN for labels that are not classes)."""
    if labels.dim() != 1:
        return math.nan
    model.eval()
    return (model(images, tables).argmax(dim=1) == labels).float().mean().item()


@dataclass
class Verdict:
    """What one stopper decided in one run."""

    #: The epoch whose check flagged the collapse (``None``: no stop), and the modality flagged.
    stop: int | None
    modality: str | None
    #: The modalities reported uninformative up to the stop (with labels=).
    uninformative: list[str]
    #: The probe's score of the flagged modality, or else of the one reported uninformative (with labels=).
    probe: float | None
    #: Shortcut-free test accuracy of the model kept.
    kept_accuracy: float
    #: The verdict of that probe ("informative", "uninformative", "undecided"; None: no probe ran).
    verdict: str | None = None
    #: Whether every message that calls a modality uninformative has a probe of that verdict behind it.
    honest: bool = True


@dataclass
class Run:
    """One scenario, one seed."""

    label_free: Verdict
    with_labels: Verdict
    #: The lowest share of each modality over the checks, and the image share of every check.
    lowest_share: dict[str, float]
    image_shares: list[float]
    #: Validation accuracy of the final model with the other modality occluded (its validation mean).
    alone: dict[str, float]
    #: Shortcut-free test accuracy of the final model (trained to the last epoch).
    final_accuracy: float
    #: Epochs trained (``max_epochs``, unless an ``action="stop"`` stopper ended the run).
    epochs_run: int


def verdict(stopper: CollapseEarlyStopping, model: FusionNet, keep: KeepWeights, test: PlantedData) -> Verdict:
    """What ``stopper`` decided, and the shortcut-free accuracy of the model it kept."""
    stop = stopper.collapse_epoch
    kept = copy.deepcopy(model)
    kept.load_state_dict(keep.weights[max(keep.weights) if stop is None else stop])
    reported = sorted(
        {name for entry in stopper.history if stop is None or entry["epoch"] <= stop for name in entry["uninformative"]}
    )
    probed = stopper.collapsed_modality or (reported[0] if reported else None)
    probed = probed or next(iter(stopper.probe_results), None)
    results = stopper.probe_results.get(probed, []) if probed is not None else []
    at_stop = [result for result in results if stop is None or result.epoch <= stop]
    result = at_stop[-1] if at_stop else None
    return Verdict(
        stop=stop,
        modality=stopper.collapsed_modality,
        uninformative=reported,
        probe=result.score if result is not None and result.reason is None else None,
        kept_accuracy=accuracy(kept, test.images, test.table(), test.labels),
        verdict=result.verdict if result is not None else None,
        honest=honest(stopper),
    )


def honest(stopper: CollapseEarlyStopping) -> bool:
    """Whether each report that calls a modality uninformative (or says it has nothing to give) follows a probe of
    that modality, at that check, whose verdict was uninformative."""
    for report in stopper.reports:
        found = re.match(r"Modality '(\w+)' .*? at epoch (\d+)", report)
        if found and ("is uninformative" in report or "nothing to give" in report):
            name, epoch = found.group(1), int(found.group(2))
            results = stopper.probe_results.get(name, [])
            if not any(result.epoch == epoch and result.verdict == "uninformative" for result in results):
                return False
    return True


def run(
    scenario: Scenario, seed: int, epochs: int = 20, num_train: int = 800, num_val: int = 400, action: str = "warn"
) -> Run:
    """Trains one scenario with one seed, the monitor and both stoppers (``action`` for both)."""
    L.seed_everything(seed, verbose=False)
    templates = torch.randn(NUM_CLASSES, PIXELS, generator=torch.Generator().manual_seed(100 + seed))
    train = PlantedData(scenario, "train", num_train, templates, seed=1000 + seed)
    val = PlantedData(scenario, scenario.val_split, num_val, templates, seed=2000 + seed)
    test = PlantedData(scenario, "test", num_val, templates, seed=3000 + seed)
    transform = {"classes": "softmax", "multilabel": "sigmoid", "survival": None}[scenario.task]
    monitor = ModalityContributionMonitor(MODALITIES, output_transform=transform, occlusion="mean")
    label_free = CollapseEarlyStopping(**STOPPER, action=action)
    kind = "survival" if scenario.task == "survival" else "auto"  # "auto" does not guess [time, event] pairs
    with_labels = CollapseEarlyStopping(**STOPPER, action=action, labels=2, label_kind=kind)
    keep = KeepWeights()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[PlantSchedule(train, val), monitor, label_free, with_labels, keep],
    )
    model = FusionNet(scenario.task)
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=num_val))
    tables = val.table()
    return Run(
        label_free=verdict(label_free, model, keep, test),
        with_labels=verdict(with_labels, model, keep, test),
        lowest_share={name: min(entry["shares"][name] for entry in monitor.history) for name in MODALITIES},
        image_shares=[entry["shares"]["image"] for entry in monitor.history],
        alone={
            "image": accuracy(model, val.images, tables.mean(dim=0).expand_as(tables), val.labels),
            "table": accuracy(model, val.images.mean(dim=0).expand_as(val.images), tables, val.labels),
        },
        final_accuracy=accuracy(model, test.images, test.table(), test.labels),
        epochs_run=trainer.current_epoch,
    )


def mean(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f}"


def stops(verdicts: list[Verdict]) -> str:
    """Each seed's stop epoch ("-": none), then the modality stopped on."""
    names = "/".join(sorted({v.modality for v in verdicts if v.modality is not None}))
    return " ".join("-" if v.stop is None else str(v.stop) for v in verdicts) + (f" {names}" if names else "")


def delay(verdicts: list[Verdict], onset: int | None) -> str:
    """Mean epochs from the planted onset to the stop, over the seeds that stopped ("missed": none did)."""
    if onset is None:
        return "-"
    delays = [v.stop - onset for v in verdicts if v.stop is not None]
    return f"{statistics.mean(delays):.1f}" if delays else "missed"


def report(verdicts: list[Verdict]) -> str:
    """What the labelled stopper reported: a collapse, an uninformative modality, or nothing."""
    collapsed = sorted({v.modality for v in verdicts if v.modality is not None})
    uninformative = sorted({name for v in verdicts for name in v.uninformative})
    words = [f"collapse {'/'.join(collapsed)}"] if collapsed else []
    words += [f"uninformative {'/'.join(uninformative)}"] if uninformative else []
    return ", ".join(words) or "-"


COLUMNS_SHOWN = [
    ("scenario", 21),
    ("onset", 5),
    ("label-free stop", 20),
    ("delay", 6),
    ("labels= stop", 20),
    ("delay", 6),
    ("labels= reported", 19),
    ("probe", 5),
    ("kept acc free/labels/none", 25),
    ("lowest share i/t", 16),
    ("alone acc i/t", 13),
]


def row(scenario: Scenario, runs: list[Run]) -> str:
    """One line of the table: the scenario over its seeds."""
    free, labelled = [r.label_free for r in runs], [r.with_labels for r in runs]
    scores = [v.probe for v in labelled if v.probe is not None]
    cells = [
        scenario.name,
        "-" if scenario.onset is None else str(scenario.onset),
        stops(free),
        delay(free, scenario.onset),
        stops(labelled),
        delay(labelled, scenario.onset),
        report(labelled),
        mean(scores) if scores else "-",
        " / ".join(mean(values) for values in ([v.kept_accuracy for v in free], [v.kept_accuracy for v in labelled]))
        + f" / {mean([r.final_accuracy for r in runs])}",
        " / ".join(mean([r.lowest_share[name] for r in runs]) for name in MODALITIES),
        " / ".join(mean([r.alone[name] for r in runs]) for name in MODALITIES),
    ]
    return " | ".join(f"{cell:<{width}}" for cell, (_, width) in zip(cells, COLUMNS_SHOWN)).rstrip()


SMALL_COLUMNS = [
    ("scenario", 21),
    ("val", 3),
    ("label-free stop", 20),
    ("labels= stop", 20),
    ("labels= verdicts", 30),
    ("probe", 5),
    ("honest", 6),
]


def verdicts(runs: list[Run]) -> str:
    """How many seeds' probes said what, e.g. "5 informative image" ("-": no probe ran)."""
    said: dict[str, int] = {}
    for r in runs:
        v = r.with_labels
        if v.verdict is not None:
            name = v.modality or (v.uninformative[0] if v.uninformative else "")
            key = f"{v.verdict} {name}".strip()
            said[key] = said.get(key, 0) + 1
    return ", ".join(f"{count} {key}" for key, count in sorted(said.items(), key=lambda item: -item[1])) or "-"


def small_set_row(scenario: Scenario, num_val: int, runs: list[Run]) -> str:
    """One line of the small-set table: the scenario at one validation set size, over its seeds."""
    scores = [r.with_labels.probe for r in runs if r.with_labels.probe is not None]
    cells = [
        scenario.name,
        str(num_val),
        stops([r.label_free for r in runs]),
        stops([r.with_labels for r in runs]),
        verdicts(runs),
        mean(scores) if scores else "-",
        f"{sum(r.with_labels.honest for r in runs)}/{len(runs)}",
    ]
    return " | ".join(f"{cell:<{width}}" for cell, (_, width) in zip(cells, SMALL_COLUMNS)).rstrip()


def small_sets(seeds: int, epochs: int) -> None:
    """The small-set table: 40 and 100 validation samples beside 1000 training ones (multi-label, survival: 40)."""
    print(f"{seeds} seeds, {epochs} epochs, {SMALL_SET_TRAIN} training samples; validation samples as listed")
    print(" | ".join(f"{name:<{width}}" for name, width in SMALL_COLUMNS).rstrip())
    for scenario in SMALL_SET_SCENARIOS:
        sizes = SMALL_SET_VAL if scenario.task == "classes" else SMALL_SET_VAL[:1]
        for num_val in sizes:
            runs = [run(scenario, seed, epochs, SMALL_SET_TRAIN, num_val) for seed in range(seeds)]
            print(small_set_row(scenario, num_val, runs), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train", type=int, default=800, help="training samples")
    parser.add_argument("--val", type=int, default=400, help="validation (and test) samples")
    parser.add_argument("--verbose", action="store_true", help="also print the image share of every check")
    parser.add_argument("--small-sets", action="store_true", help="the small-set table (40 and 100 validation samples)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # networks this small train fastest on one thread
    warnings.filterwarnings("ignore")  # the label-free stopper's flags are warnings with action="warn"
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # no per-run banners, no stopper reports: the table has them
    start = time.perf_counter()
    if args.small_sets:
        small_sets(args.seeds, args.epochs)
        print(f"Done in {time.perf_counter() - start:.0f} s.")
        return
    print(f"{args.seeds} seeds, {args.epochs} epochs, {args.train} training and {args.val} validation samples")
    print(" | ".join(f"{name:<{width}}" for name, width in COLUMNS_SHOWN).rstrip())
    for scenario in SCENARIOS:
        runs = [run(scenario, seed, args.epochs, args.train, args.val) for seed in range(args.seeds)]
        print(row(scenario, runs), flush=True)
        if args.verbose:
            for r in runs:
                print("    image shares:", " ".join(f"{share:.2f}" for share in r.image_shares))
    print(f"Done in {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
