"""Two processes (ddp_spawn, gloo on CPU) measure exactly what one process measures on the same validation set.

One spawn run per test: each run costs 10–20 s, so a run checks several things and its workers write what they
saw to files in ``tmp_path`` for the parent to compare.
"""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed

from lightning_mc import ModalityContributionMonitor
from lightning_mc.functional import modality_contribution

from helpers import TwoModalityNet, assert_same_numbers, loader, trainer_kwargs, two_modality_dataset

MODALITIES = {"image": 0, "table": 1}
#: Odd, so DistributedSampler pads rank 1 with a repeat of sample 0 (17 + 17 rows for 33 samples).
NUM_VAL = 33

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


class RecordLoggedValues(L.Callback):
    """Placed after the monitor: each rank writes what it logged at every validation end, and its final weights."""

    def __init__(self, directory: Path, monitor: ModalityContributionMonitor) -> None:
        self.directory = directory
        self.monitor = monitor
        self.records: list[dict] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        logged = {key: value.item() for key, value in trainer.callback_metrics.items() if key.startswith("mc/")}
        self.records.append(
            {
                "epoch": trainer.current_epoch,
                "logged": logged,
                "num_samples": self.monitor.history[-1]["num_samples"],
                "local_rows": self.monitor.schedule.padding.seen,
            }
        )

    def on_fit_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        (self.directory / f"rank{rank}.json").write_text(json.dumps(self.records))
        if rank == 0:
            torch.save(pl_module.state_dict(), self.directory / "weights.pt")


def test_two_processes_log_the_single_process_numbers_and_the_same_keys_on_every_rank(tmp_path) -> None:
    monitor = ModalityContributionMonitor(MODALITIES, output_transform="softmax", occlusion="mean")
    recorder = RecordLoggedValues(tmp_path, monitor)
    torch.manual_seed(0)
    trainer = L.Trainer(
        callbacks=[monitor, recorder],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=2),
    )
    trainer.fit(
        TwoModalityNet(), loader(two_modality_dataset(48), batch_size=8), loader(two_modality_dataset(NUM_VAL, seed=1))
    )

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # every rank logged the same keys and the same values at every check
    assert [r["epoch"] for r in ranks[0]] == [r["epoch"] for r in ranks[1]] == [0, 1]
    for first, second in zip(*ranks):
        assert set(first["logged"]) == set(second["logged"])
        assert {"mc/share/image", "mc/share/table", "mc/raw/image", "mc/raw/table", "mc/balance"} <= set(
            first["logged"]
        )
        assert first["logged"] == pytest.approx(second["logged"], abs=1e-7)
        # 17 rows on each rank, one of them DistributedSampler's repeat of sample 0: counted once, not twice
        assert first["local_rows"] == second["local_rows"] == 17
        assert first["num_samples"] == second["num_samples"] == NUM_VAL

    model = TwoModalityNet()
    model.load_state_dict(torch.load(tmp_path / "weights.pt"))
    single = modality_contribution(
        model, loader(two_modality_dataset(NUM_VAL, seed=1)), MODALITIES, output_transform="softmax"
    )
    logged = ranks[0][-1]["logged"]
    for name in MODALITIES:
        assert_same_numbers(logged[f"mc/share/{name}"], single.shares[name], f"mc/share/{name}")
        assert_same_numbers(logged[f"mc/raw/{name}"], single.raw[name], f"mc/raw/{name}")
    assert_same_numbers(logged["mc/balance"], single.balance, "mc/balance")
    # the padded repeat would have moved the numbers: sample 0 counted twice gives a different mean
    padded = modality_contribution(
        model,
        [torch.utils.data.default_collate([two_modality_dataset(NUM_VAL, seed=1)[i] for i in [*range(NUM_VAL), 0]])],
        MODALITIES,
        output_transform="softmax",
    )
    assert abs(padded.raw["image"] - single.raw["image"]) > 1e-5
