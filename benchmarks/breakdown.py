"""Where a check's time goes on the smallest P1 case: the profile behind the README's explanation of the P1 misses.

On the CNN+MLP with whole modalities (M = 2, batches of 64, the engine's default chunking: one call of 192 rows) it
times, per batch, the forward call the monitor cannot avoid, the whole ``engine.run``, the engine's own work (the same
call on a stub model that returns the forward's outputs at once), and the metric's ``update``, ``compute`` and
``reset`` — alone, and ``update`` again right after a real ``engine.run``, as it runs in a check.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks.models import ImageTableNet, image_table_batches, image_table_modalities, seeded
from benchmarks.peers import Floor
from benchmarks.suites import Config, Table
from benchmarks.timing import Stat, interleaved, synchronize
from lightning_mc.core.engine import OcclusionEngine
from lightning_mc.core.metric import ModalityContribution


class _Replay(nn.Module):
    """Returns fixed outputs whatever the inputs: ``engine.run`` on it costs only the engine's own work."""

    def __init__(self, outputs: Tensor) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.outputs


def _microseconds(stat: Stat) -> str:
    return f"{stat.median * 1e6:.0f} [{stat.low * 1e6:.0f}–{stat.high * 1e6:.0f}]"


def _in_sequence(
    engine: OcclusionEngine, model: nn.Module, batch: tuple[Tensor, ...], metric: ModalityContribution, repeats: int
) -> tuple[list[float], list[float]]:
    """Seconds of ``engine.run`` and of the ``metric.update`` that follows it, measured inside one loop."""
    run_seconds, update_seconds = [], []
    device = batch[0].device
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        outputs = engine.run(model, batch)
        synchronize(device)
        middle = time.perf_counter()
        metric.update(outputs.clean, outputs.occluded)
        synchronize(device)
        run_seconds.append(middle - start)
        update_seconds.append(time.perf_counter() - middle)
    return run_seconds, update_seconds


def breakdown(config: Config) -> Table:
    """Microseconds per batch of each part of a check (median [p25–p75]), and the total beyond the forward call."""
    device, repeats = config.device, 5 if config.quick else 30
    model = seeded(ImageTableNet(num_tables=1, image_size=16)).to(device)
    modalities = image_table_modalities(1)
    batch = image_table_batches(1, 64, 1, 16, device=device)[0]
    engine = OcclusionEngine(modalities, output_transform="softmax")
    floor = Floor(model, [batch], modalities, max_batch_size=None)
    with torch.inference_mode():
        replay = _Replay(model(*floor.chunks[0][0]))
    outputs = engine.run(model, batch)
    metric = ModalityContribution(outputs.attribute_names, num_outputs=outputs.clean.shape[1]).to(device)

    def compute() -> None:
        metric._computed = None  # torchmetrics caches compute(); time the computation itself
        metric.compute()

    parts: dict[str, Callable[[], object]] = {
        "forward call of the 192 stacked rows (floor)": floor,
        "engine.run (forward included)": lambda: engine.run(model, batch),
        "engine.run on a stub model (the engine's own work)": lambda: engine.run(replay, batch),
        "metric.update, alone": lambda: metric.update(outputs.clean, outputs.occluded),
        "metric.compute, alone (once per check)": compute,
        "metric.reset, alone (once per check)": metric.reset,
    }
    times = interleaved(parts, repeats, device, inner=3)
    stats = {name: Stat.of(values) for name, values in times.items()}
    run_seconds, update_seconds = _in_sequence(engine, model, batch, metric, repeats * 3)
    stats["metric.update, right after engine.run (as in a check)"] = Stat.of(update_seconds)
    rows = [[name, _microseconds(stat)] for name, stat in stats.items()]
    in_check = statistics.median(run_seconds) + stats["metric.update, right after engine.run (as in a check)"].median
    extra = in_check - stats["forward call of the 192 stacked rows (floor)"].median
    return Table(
        "Breakdown of a check, CNN+MLP with whole modalities (M=2), per batch of 64 (µs, median [p25–p75])",
        ["part", "µs per batch"],
        rows,
        note=(
            f"engine.run + metric.update in a check, beyond the forward call: {extra * 1e6:.0f} µs per batch "
            "(compute and reset come once per check, on top)."
        ),
    )
