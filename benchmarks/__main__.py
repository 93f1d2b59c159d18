"""``python -m benchmarks [--quick] [--only P1,P6] [--device cuda] [--out DIR]``: run, print and save the tables."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks import distributed, encoders, probe_cost, report, savings, small_sets, spot_check, suites
from benchmarks.breakdown import breakdown
from benchmarks.timing import CLOCKS, DEVICES, choose_clock, pick_device, set_clock

#: The suites that return their summary rows and one detail table.
ROW_AND_TABLE = {
    "P6": savings.p6_reuse,
    "P7": savings.p7_tolerance,
    "P9": distributed.p9_distributed_tolerance,
    "P10": small_sets.p10_small_sets,
    "P11": probe_cost.p11_probe_cost,
    "P12": spot_check.p12_spot_check,
}
SUITES = ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9", "P10", "P11", "P12", "scaling", "breakdown")


def machine(device: torch.device, command: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    description = (
        f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"
    )
    if device.type == "cuda":
        description += f", GPU {torch.cuda.get_device_name(device)}"
    return {
        "description": description,
        "device": str(device),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "command": command,
    }


def free_cores(load: float) -> int:
    """Threads for a CPU run: more intra-op threads than free cores make every op wait on descheduled peers.

    Measured here with another job on one of 2 cores: a forward pass took 7× longer with 2 threads than with 1.
    """
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - round(load)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: small sizes, few repeats")
    parser.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {SUITES}")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads on CPU; 0 (default): the cores left free by the 1-minute load average, at least 1",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where models and batches live; auto (default): cuda when available, else cpu. CUDA timings synchronise "
        "the device around every timed call",
    )
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="auto",
        help="what a timing reads; auto (default): the thread's CPU time on CPU with 1 thread (robust on a shared "
        "machine), else the wall clock",
    )
    parser.add_argument(
        "--repeats", type=int, default=0, help="interleaved rounds per comparison; 0 (default): 3 with --quick, else 9"
    )
    parser.add_argument(
        "--inner",
        type=int,
        default=0,
        help="back-to-back calls of each function per round, the fastest kept; 0 (default): 1 with --quick, else 3. "
        "With 1, a call's time depends on the function before it in the round",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where JSON/MD go")
    args = parser.parse_args(argv)
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(SUITES))
    if unknown:
        parser.error(f"--only: unknown suites {unknown}; choose from {SUITES}")

    warnings.filterwarnings("ignore", module="lightning")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    try:
        device = pick_device(args.device)
    except ValueError as err:
        parser.error(f"--device {args.device}: {err}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = args.threads if args.threads > 0 else free_cores(load)
    torch.set_num_threads(threads)
    try:
        clock = choose_clock(args.clock, device, threads)
    except ValueError as err:
        parser.error(f"--clock {args.clock}: {err}")
    set_clock(clock)
    config = suites.Config(quick=args.quick, device=device, rounds=max(args.repeats, 0), calls=max(args.inner, 0))
    command = "python -m benchmarks" + (" --quick" if args.quick else "") + f" --threads {threads}"
    if args.repeats > 0:
        command += f" --repeats {args.repeats}"
    if args.inner > 0:
        command += f" --inner {args.inner}"
    if args.device != "auto":
        command += f" --device {args.device}"
    if args.clock != "auto":
        command += f" --clock {args.clock}"
    if selected != list(SUITES):
        command += f" --only {','.join(selected)}"
    info = machine(device, command)
    info["clock"] = {"thread": "thread CPU time (time.thread_time)", "wall": "wall clock (time.perf_counter)"}[clock]
    info["load_average_at_start"] = round(load, 2)
    print(f"lightning-mc benchmarks on {info['description']} ({device}; {info['clock']})", flush=True)

    rows: list[suites.Row] = []
    tables: list[suites.Table] = []
    started = time.perf_counter()
    for name in selected:
        began = time.perf_counter()
        if name == "P1":
            rows += suites.p1_floor(config)
        elif name == "P2":
            rows += suites.p2_reference(config)
        elif name == "P3":
            rows += suites.p3_captum(config)
        elif name == "P4":
            found, cost = suites.p4_training(config)
            rows += found
            tables.append(cost)
        elif name == "P5":
            found, by_budget, by_masks = suites.p5_memory(config)
            rows += found
            tables += [by_budget, by_masks]
        elif name == "P8":
            found, table = encoders.p8_encoders(config)
            rows += found
            tables += [table, encoders.p8_monai_occlusion(config)]
        elif name in ROW_AND_TABLE:  # the suites that give their rows and one table
            found, table = ROW_AND_TABLE[name](config)
            rows += found
            tables.append(table)
        elif name == "scaling":
            tables.append(suites.scaling(config))
        elif name == "breakdown":
            tables.append(breakdown(config))
        print(f"  {name} done in {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    info["seconds"] = round(time.perf_counter() - started, 1)

    print()
    for table in [report.summary_table(rows), *tables]:
        print(report.text(table))
    # a partial run writes beside the full run's files, never over them
    stem = ("quick" if args.quick else "results") + ("" if selected == list(SUITES) else "-" + "-".join(selected))
    paths = report.write(args.out, stem, info, rows, tables)
    print(f"total {info['seconds']} s; wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
