"""P9: a validation epoch under 2 processes (DDP, gloo on CPU) with ``tolerance`` ÷ the monitor without it.

The tolerance is one no run reaches (``1e-6``), so both runs measure every batch and the ratio is the price of the
convergence decision alone (main took 501 ms with tolerance and 53 ms without on a 50-batch epoch: an all-gather of
every state after every batch). The two workers are launched the way ``torchrun`` launches them (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ...), so Lightning joins their process group instead of spawning, and one pair of
processes runs every repeat: no epoch, no model and one process group per measurement.

``python -m benchmarks --only P9`` runs it; ``python -m benchmarks.distributed`` prints the ratio alone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import Stat, ratio

#: Validation batches per process, batch size and repeats (``--quick``: fewer).
FULL, QUICK = (50, 16, 9), (20, 16, 3)
#: A half-width no run reaches: every batch is measured with and without it.
NEVER = 1e-6
TARGET = 1.3


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(quick: bool = False, timeout: float = 600) -> dict[str, Any]:
    """Launch the 2 workers, wait for them, and return rank 0's timings (seconds per validation epoch)."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "timings.json"
        root = str(Path(__file__).resolve().parents[1])
        workers = []
        for rank in (0, 1):
            env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "WORLD_SIZE": "2",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "NODE_RANK": "0",
                "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
            }
            command = [sys.executable, "-m", "benchmarks.distributed", "--worker", str(out), *(["--quick"] * quick)]
            workers.append(subprocess.Popen(command, env=env, cwd=root))
        try:
            for worker in workers:
                if worker.wait(timeout=timeout) != 0:
                    raise RuntimeError(f"a P9 worker exited with {worker.returncode}")
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
        return json.loads(out.read_text())


def _worker(out: Path, quick: bool) -> None:
    """One of the 2 processes: every repeat validates once without the monitor, once with it, once with tolerance."""
    import warnings

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_mc import ModalityContributionMonitor

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    batches, size, repeats = QUICK if quick else FULL
    generator = torch.Generator().manual_seed(0)
    count = 2 * batches * size
    data = TensorDataset(torch.randn(count, 8, generator=generator), torch.randn(count, 8, generator=generator))

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.a(a) + self.b(b)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self(*batch)

    class EpochTimer(L.Callback):  # first and last in the callbacks: around every other callback's hooks
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            torch.distributed.barrier()
            self.started = time.perf_counter()

        def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if self is trainer.callbacks[-1]:
                torch.distributed.barrier()
                self.seconds.append(time.perf_counter() - self.started)

    def monitor(tolerance: float | None) -> ModalityContributionMonitor:
        return ModalityContributionMonitor({"a": 0, "b": 1}, tolerance=tolerance, run_on_validate=True)

    timers = {name: EpochTimer() for name in ("no monitor", "monitor", "monitor + tolerance")}
    callbacks = {"no monitor": [], "monitor": [monitor(None)], "monitor + tolerance": [monitor(NEVER)]}
    model = Net()
    for _ in range(repeats + 1):  # the first round warms up
        for name, timer in timers.items():
            trainer = L.Trainer(
                accelerator="cpu",
                devices=2,
                strategy="ddp",
                callbacks=[timer, *callbacks[name], timer],
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                default_root_dir=out.parent,
            )
            trainer.validate(model, DataLoader(data, batch_size=size), verbose=False)
    if torch.distributed.get_rank() == 0:
        seconds = {name: timer.seconds[1:] for name, timer in timers.items()}
        out.write_text(json.dumps({"batches": batches, "batch_size": size, "seconds": seconds}))
    torch.distributed.destroy_process_group()  # a gloo worker exiting with its group alive may abort at shutdown


def p9_distributed_tolerance(config: Any) -> tuple[list[Any], Any]:
    """The P9 row (tolerance ÷ monitor alone) and a table of the three epoch times."""
    from benchmarks.suites import Row, Table

    found = run(config.quick)
    seconds = found["seconds"]
    value = ratio(seconds["monitor + tolerance"], seconds["monitor"])
    medians = {name: Stat.of(values) for name, values in seconds.items()}
    case = f"2 processes (DDP, gloo, CPU), {found['batches']} batches of {found['batch_size']} per process"
    row = Row(
        "P9",
        case,
        "validation epoch: tolerance ÷ monitor alone",
        value,
        f"≤ {TARGET}",
        value.median <= TARGET,
        note=", ".join(f"{name} {stat.median * 1e3:.1f} ms" for name, stat in medians.items()),
        extra={"seconds": {name: stat.as_dict() for name, stat in medians.items()}},
    )
    table = Table(
        "P9: a validation epoch under 2 processes (median [IQR] ms)",
        ["run", "epoch", "÷ monitor alone"],
        [
            [
                name,
                f"{stat.median * 1e3:.1f} [{stat.low * 1e3:.1f}–{stat.high * 1e3:.1f}]",
                ratio(seconds[name], seconds["monitor"]).format(),
            ]
            for name, stat in medians.items()
        ],
    )
    return [row], table


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--worker"]:
        _worker(Path(args[1]), "--quick" in args)
        return 0
    found = run("--quick" in args)
    seconds = found["seconds"]
    for name, values in seconds.items():
        print(f"{name}: {Stat.of(values).median * 1e3:.1f} ms per validation epoch")
    print(
        f"tolerance ÷ without: {ratio(seconds['monitor + tolerance'], seconds['monitor']).format()} (target ≤ {TARGET})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
