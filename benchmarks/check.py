"""``python -m benchmarks.check [--update]`` (``make bench-check``): the quick rows against the committed ones.

Runs the quick benchmark rows (P1 and P10 at quick sizes, :data:`ROUNDS` interleaved rounds each, 2 threads: a
minute or two on 2 cores), prints each row's median ratio beside the one committed in :data:`BASELINE`, and exits 1
when a row is more than :data:`DEARER` dearer than committed (every ratio of these rows is a cost: lower is better).
``--update`` writes the run as the new baseline: commit it when a row got cheaper.

The ratios compare things timed in the same interleaved rounds, so they hold across machines of a kind; the medians
of a loaded machine still move by ±10 %, which the 20 % margin leaves room for. A row missing from the baseline (new)
is printed and never fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.__main__ import main as run_benchmarks

#: The committed quick rows.
BASELINE = Path(__file__).parent / "results" / "bench-check.json"
#: A row fails when its median exceeds the committed one by more than this fraction.
DEARER = 0.20
ROUNDS, THREADS, SUITES = 9, 2, "P1,P10"


def key(row: dict[str, Any]) -> str:
    """What names a row across runs: its id, case and measure."""
    return f"{row['id']} | {row['case']} | {row['measure']}"


def compare(baseline: dict[str, float], current: dict[str, float], dearer: float = DEARER) -> tuple[list[str], bool]:
    """Lines of ``row: now (committed, change)``, and whether any row is more than ``dearer`` above its baseline.

    Example:
        >>> lines, failed = compare({"a": 1.0, "b": 2.0}, {"a": 1.3, "b": 2.1, "c": 1.0})
        >>> failed, lines[0]
        (True, 'a: 1.30 (committed 1.00, +30 %) DEARER')
        >>> lines[2]
        'c: 1.00 (not committed: new)'
    """
    lines, failed = [], False
    for name, value in current.items():
        if name not in baseline:
            lines.append(f"{name}: {value:.2f} (not committed: new)")
            continue
        committed = baseline[name]
        change = value / committed - 1 if committed else 0.0
        worse = change > dearer
        failed |= worse
        lines.append(
            f"{name}: {value:.2f} (committed {committed:.2f}, {change * 100:+.0f} %)" + (" DEARER" if worse else "")
        )
    return lines, failed


def medians(path: Path) -> dict[str, float]:
    """``row key -> median`` of a results JSON file written by ``python -m benchmarks``."""
    return {key(row): float(row["median"]) for row in json.loads(path.read_text())["summary"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.check", description=__doc__)
    parser.add_argument("--update", action="store_true", help=f"write this run as the baseline ({BASELINE.name})")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        command = ["--quick", "--only", SUITES, "--threads", str(THREADS), "--repeats", str(ROUNDS), "--out", out]
        run_benchmarks(command)
        written = Path(out) / f"quick-{SUITES.replace(',', '-')}.json"
        current = medians(written)
        if args.update:
            BASELINE.write_text(written.read_text())
            print(f"bench-check: wrote {BASELINE} ({len(current)} rows)")
            return 0
    if not BASELINE.exists():
        print(f"bench-check: no baseline at {BASELINE}; run `python -m benchmarks.check --update` and commit it.")
        return 1
    lines, failed = compare(medians(BASELINE), current)
    print(f"\nbench-check: each quick row's median now, beside {os.path.relpath(BASELINE)}")
    print("\n".join(lines))
    if failed:
        print(f"bench-check: FAILED: a row is more than {DEARER:.0%} dearer than committed (DEARER above).")
        return 1
    print(f"bench-check: passed (no row more than {DEARER:.0%} dearer).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
