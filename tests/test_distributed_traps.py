"""Distributed runs without traps: no hang, no per-batch collective, duplicates counted once, a local functional API.

Each case runs 2 gloo processes on CPU in a child interpreter (``python tests/test_distributed_traps.py CASE DIR``)
under a timeout, so a hang fails the test instead of the suite: the child and its workers are one process group,
killed when the time is up. The workers write what they saw to JSON files in ``DIR`` for the test to compare.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_mc import ContributionMeasurement, ModalityContributionMonitor
from lightning_mc.callbacks.validation_batches import CHECK_EVERY
from lightning_mc.functional import modality_contribution

from helpers import TwoModalityNet, assert_same_numbers, trainer_kwargs, two_modality_dataset

MODALITIES = {"image": 0, "table": 1}
#: A fill that does not depend on how samples are batched (the default "mean" uses the batch mean).
OPTIONS: dict[str, Any] = {"output_transform": "softmax", "occlusion": "zeros"}
#: A tolerance no run here reaches: every batch is measured (and every check runs).
NEVER = 1e-6
#: Seconds a case may take (a spawn run takes 5–15 s here; a hang runs into this).
TIMEOUT = 120

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def run_case(case: str, directory: Path) -> list[dict[str, Any]]:
    """Run ``case`` in a child interpreter with a timeout; each rank's record."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, __file__, case, str(directory)],
        env=env,
        start_new_session=True,  # the child, its spawned workers and nothing else: killed together on a hang
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = child.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        pytest.fail(f"case {case} hung (killed after {TIMEOUT} s); its output:\n{output[-4000:]}")
    assert child.returncode == 0, f"case {case} failed:\n{output[-4000:]}"
    return [json.loads((directory / f"rank{rank}.json").read_text()) for rank in (0, 1)]


# ------------------------------------------------------------------------------------------------ the workers' side


def val_set(num: int = 64) -> TensorDataset:
    return two_modality_dataset(num, seed=1)


class ShardedVal(TwoModalityNet):
    """Its validation loader is built per rank: ``shards[rank]`` (indices of :func:`val_set`), batches of 8."""

    def __init__(self, shards: list[list[int]]) -> None:
        super().__init__()
        self.shards = shards

    def val_dataloader(self) -> DataLoader:
        return DataLoader(Subset(val_set(), self.shards[self.trainer.global_rank]), batch_size=8)


class WholeVal(TwoModalityNet):
    """Its validation loader: the first ``num`` samples of :func:`val_set` in batches of 8 (sharded or not)."""

    def __init__(self, num: int) -> None:
        super().__init__()
        self.num = num

    def val_dataloader(self) -> DataLoader:
        return DataLoader(val_set(self.num), batch_size=8)


class CountCollectives(L.Callback):
    """Counts the collectives each rank enters while validation batches run (between the first and the last hook)."""

    NAMES = ("all_gather", "all_reduce", "all_gather_into_tensor", "barrier", "broadcast")

    def __init__(self) -> None:
        self.count, self.counting = 0, False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name in self.NAMES:
            original = getattr(torch.distributed, name)

            def counted(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                self.count += self.counting
                return _original(*args, **kwargs)

            setattr(torch.distributed, name, counted)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.counting = True

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # before the monitor's: it comes first in callbacks
        self.counting = False


class Record(L.Callback):
    """After the monitor: each rank writes what its monitor measured and logged, and the warnings it saw."""

    def __init__(self, directory: Path, monitor: ModalityContributionMonitor, counter: Any = None) -> None:
        self.directory, self.monitor, self.counter = directory, monitor, counter
        self.caught: list[warnings.WarningMessage] = []

    def setup(self, trainer, pl_module, stage) -> None:  # in the worker (a catcher does not travel to it)
        self.caught = warnings.catch_warnings(record=True).__enter__()
        warnings.simplefilter("always")

    def on_validation_end(self, trainer, pl_module) -> None:
        latest = self.monitor.latest
        assert latest is not None
        record = {
            "logged": {key: value.item() for key, value in trainer.callback_metrics.items() if key.startswith("mc/")},
            "shares": latest.shares,
            "raw": latest.raw,
            "half_width": latest.share_half_width,
            "num_samples": latest.num_samples,
            "batches": self.monitor.schedule.padding.seen // 8,
            "warnings": [str(w.message) for w in self.caught if "ModalityContributionMonitor" in str(w.message)],
            "collectives": None if self.counter is None else self.counter.count,
        }
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def validate(directory: Path, model: L.LightningModule, monitor: ModalityContributionMonitor, **kwargs: Any) -> None:
    callbacks = kwargs.pop("callbacks", [])
    trainer = L.Trainer(
        callbacks=[*callbacks, monitor, Record(directory, monitor, kwargs.pop("counter", None))],
        **trainer_kwargs(directory, strategy="ddp_spawn", devices=2, **kwargs),
    )
    trainer.validate(model, verbose=False)


def case_uneven(directory: Path) -> None:
    """Rank 0 holds 5 batches, rank 1 holds 3 (hand-sharded, no distributed sampler), and a tolerance is set."""
    torch.manual_seed(0)
    monitor = ModalityContributionMonitor(MODALITIES, **OPTIONS, tolerance=NEVER, run_on_validate=True)
    validate(directory, ShardedVal([list(range(0, 40)), list(range(40, 64))]), monitor, use_distributed_sampler=False)


def case_collectives(directory: Path) -> None:
    """Equal shards of 12 batches (a DistributedSampler), a tolerance never reached: the collectives are counted."""
    torch.manual_seed(0)
    counter = CountCollectives()
    model = WholeVal(192)  # 96 samples, 12 batches per rank
    monitor = ModalityContributionMonitor(MODALITIES, **OPTIONS, tolerance=NEVER, run_on_validate=True)
    validate(directory, model, monitor, callbacks=[counter], counter=counter)


def case_duplicates(directory: Path) -> None:
    """``use_distributed_sampler=False``: the whole validation set (64 samples, 8 batches) on every rank."""
    torch.manual_seed(0)
    model = WholeVal(64)
    # the union of the two copies (128 "samples") would reach 0.45 at 4 batches; one copy (64) only at 8
    monitor = ModalityContributionMonitor(MODALITIES, **OPTIONS, tolerance=0.45, run_on_validate=True)
    validate(directory, model, monitor, use_distributed_sampler=False)


class FunctionalAfterFit(L.Callback):
    """At the end of training (the process group alive): the functional API on rank 0 only, then on both ranks."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        record: dict[str, Any] = {}
        if trainer.is_global_zero:  # the other rank goes on to the barrier: a collective here would hang or crash
            result = modality_contribution(
                pl_module, DataLoader(val_set(), batch_size=8), MODALITIES, **OPTIONS, tolerance=0.3
            )
            record["rank0_only"] = {"shares": result.shares, "num_samples": result.num_samples}
        trainer.strategy.barrier()
        half = Subset(val_set(), range(trainer.global_rank, 64, 2))
        synced = modality_contribution(
            pl_module, DataLoader(half, batch_size=8), MODALITIES, **OPTIONS, sync_across_processes=True
        )
        record["synced"] = {"shares": synced.shares, "num_samples": synced.num_samples}
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
        torch.save(pl_module.state_dict(), self.directory / "weights.pt")


def case_functional(directory: Path) -> None:
    torch.manual_seed(0)
    trainer = L.Trainer(
        callbacks=[FunctionalAfterFit(directory)],
        **trainer_kwargs(directory, strategy="ddp_spawn", devices=2, max_epochs=1, limit_val_batches=0),
    )
    trainer.fit(TwoModalityNet(), DataLoader(two_modality_dataset(32), batch_size=8))


class ShardedNet(TwoModalityNet):
    """The two branches sharded with FSDP2 ``fully_shard`` over the data-parallel mesh (``ModelParallelStrategy``)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.image_branch, mesh=mesh)
        fully_shard(self.table_branch, mesh=mesh)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def case_model_parallel(directory: Path) -> None:
    """ModelParallelStrategy with FSDP2 on CPU (gloo): fit one epoch, measure on validation."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.manual_seed(0)
    model = ShardedNet()
    monitor = ModalityContributionMonitor(MODALITIES, **OPTIONS)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    recorder = Record(directory, monitor)
    saver = SaveFullWeights(directory)
    kwargs = trainer_kwargs(directory, strategy=strategy, devices=2, max_epochs=1)
    trainer = L.Trainer(callbacks=[monitor, recorder, saver], **kwargs)
    trainer.fit(
        model,
        DataLoader(two_modality_dataset(32), batch_size=8),
        DataLoader(Subset(val_set(), range(33)), batch_size=8),
    )


class SaveFullWeights(L.Callback):
    """Rank 0 saves the full (unsharded) weights the validation ran with, for a one-process comparison."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_validation_end(self, trainer, pl_module) -> None:
        state = {key: value.full_tensor() for key, value in pl_module.state_dict().items()}  # a collective: all ranks
        if trainer.is_global_zero:
            torch.save(state, self.directory / "weights.pt")


CASES = {
    "uneven": case_uneven,
    "collectives": case_collectives,
    "duplicates": case_duplicates,
    "functional": case_functional,
    "model_parallel": case_model_parallel,
}


# ------------------------------------------------------------------------------------------------------ the tests


def single(directory: Path | None, indices: Any, tolerance: float | None = None, **options: Any) -> Any:
    """One process, all of ``indices``' batches of 8 (no early stop), with the trained weights of ``directory``."""
    torch.manual_seed(0)
    model = TwoModalityNet()
    if directory is not None:
        model.load_state_dict(torch.load(directory / "weights.pt"))
    measurement = ContributionMeasurement(MODALITIES, **OPTIONS, tolerance=tolerance, **options)
    for batch in DataLoader(Subset(val_set(), indices), batch_size=8):
        measurement.update(model, batch)
    return measurement.compute()


def assert_shares_of(record: dict[str, Any], expected: Any) -> None:
    for name in MODALITIES:
        assert_same_numbers(record["shares"][name], expected.shares[name], f"shares[{name}]")
        assert_same_numbers(record["logged"][f"mc/share/{name}"], expected.shares[name], f"mc/share/{name}")


def test_tolerance_with_ranks_that_run_different_numbers_of_batches_ends_and_measures_every_batch(tmp_path) -> None:
    ranks = run_case("uneven", tmp_path)
    assert [r["batches"] for r in ranks] == [5, 3]  # the rank that runs out contributes nothing more
    assert ranks[0]["logged"] == ranks[1]["logged"]
    assert ranks[0]["num_samples"] == ranks[1]["num_samples"] == 64
    assert_shares_of(ranks[0], single(None, range(64)))


def test_tolerance_under_ddp_enters_one_collective_every_few_batches_not_every_batch(tmp_path) -> None:
    ranks = run_case("collectives", tmp_path)
    assert ranks[0]["num_samples"] == 192 and ranks[0]["batches"] == 12
    # one all_reduce after every CHECK_EVERY-th batch and after the 12th, the last every rank runs (main: a
    # torchmetrics all-gather of every state after every batch)
    checks = [count for count in range(1, 13) if count % CHECK_EVERY == 0 or count == 12]
    assert ranks[0]["collectives"] == ranks[1]["collectives"] == len(checks) < 12


def test_every_rank_measuring_the_same_samples_counts_them_once_with_a_warning_and_claims_no_precision(
    tmp_path,
) -> None:
    ranks = run_case("duplicates", tmp_path)
    once = single(None, range(64), tolerance=0.45)
    # what main did: 4 batches on each rank, summed, look like 64 samples within ±0.45; one copy's 32 claim nothing
    union = single(None, [*range(32), *range(32)], tolerance=0.45)
    assert max(union.share_half_width.values()) <= 0.45
    assert max(single(None, range(32), tolerance=0.45).share_half_width.values()) == float("inf")
    # not stopped at 4 batches (the union of the copies would claim ±0.45 there), counted once
    assert [r["batches"] for r in ranks] == [8, 8]
    assert ranks[0]["num_samples"] == ranks[1]["num_samples"] == 64 == ranks[0]["logged"]["mc/num_samples"]
    assert_shares_of(ranks[0], once)
    assert ranks[0]["half_width"] == pytest.approx(once.share_half_width, rel=1e-9)
    assert len(ranks[0]["warnings"]) == 1 and "use_distributed_sampler" in ranks[0]["warnings"][0]
    assert ranks[1]["warnings"] == []  # rank 0 warns


def test_the_functional_api_on_rank_zero_only_after_a_ddp_fit_is_local_and_syncs_only_when_asked(tmp_path) -> None:
    ranks = run_case("functional", tmp_path)
    whole = single(tmp_path, range(64))
    local = ranks[0]["rank0_only"]
    early = modality_contribution(  # one process, the same call
        _trained(tmp_path), DataLoader(val_set(), batch_size=8), MODALITIES, **OPTIONS, tolerance=0.3
    )
    assert local["num_samples"] == early.num_samples  # rank 0's own stop, on its own batches
    for name in MODALITIES:
        assert_same_numbers(local["shares"][name], early.shares[name], f"shares[{name}]")
    # sync_across_processes=True: each rank measured half, both got the whole set's numbers
    for rank in ranks:
        assert rank["synced"]["num_samples"] == 64
        for name in MODALITIES:
            assert_same_numbers(rank["synced"]["shares"][name], whole.shares[name], f"synced shares[{name}]")


def _trained(directory: Path) -> nn.Module:
    model = TwoModalityNet()
    model.load_state_dict(torch.load(directory / "weights.pt"))
    return model


def test_model_parallel_strategy_with_fsdp2_fully_shard_on_cpu_gives_the_single_process_shares(tmp_path) -> None:
    ranks = run_case("model_parallel", tmp_path)
    assert ranks[0]["logged"] == ranks[1]["logged"]
    assert ranks[0]["num_samples"] == 33  # DistributedSampler's padding counted once
    assert_shares_of(ranks[0], single(tmp_path, range(33)))


def test_a_measurement_is_local_unless_asked() -> None:
    measurement = ContributionMeasurement(MODALITIES)
    assert measurement.sync_across_processes is False
    with pytest.raises(TypeError, match="sync_across_processes=1 must be True or False"):
        ContributionMeasurement(MODALITIES, sync_across_processes=1)  # type: ignore[arg-type]
    assert ModalityContributionMonitor(MODALITIES).measurement.sync_across_processes is True


if __name__ == "__main__":
    CASES[sys.argv[1]](Path(sys.argv[2]))
