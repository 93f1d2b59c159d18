"""``python -m benchmarks.check [--update]`` (``make bench-check``): the quick rows against the committed ones.

Runs the quick benchmark rows (P1 and P10 at quick sizes, :data:`ROUNDS` interleaved rounds of :data:`CALLS` calls
each, 1 thread, so the clock is the thread's CPU time: about 70 s on 2 cores), prints each row's median ratio and
interquartile range beside the committed ones in :data:`BASELINE`, and exits 1 when a row is more than
:data:`DEARER` dearer than committed (every ratio of these rows is a cost: lower is better). ``--update`` writes the
run as the new baseline: commit it when a row got cheaper.

"Dearer" must be told from the spread of the rounds. Run after run on this 2-core machine shared with other jobs
(9 rounds of 1 call, 2 threads, the wall clock) the medians of the same code moved by up to ±30 %, so a gate on the
medians alone failed at random. What makes the verdict rest on evidence:

- the thread's CPU time with 1 intra-op thread leaves out the time the process waited for a core (2 threads on the
  wall clock were the noisiest setting);
- the fastest of :data:`CALLS` = 2 back-to-back calls per round: with 1 call, a call's time depended on the function
  before it in the round (after the measurement without ``encoders``, which allocates the big copies, P10's plain
  pass took 15 ms instead of 9 ms), so the per-round ratios were bimodal by round parity and a median sat between
  the two modes; the second call runs after itself;
- :data:`ROUNDS` = 25 rounds, not 9, so a median moves less with a few disturbed rounds;
- a row is dearer only when its median now is more than :data:`DEARER` above the committed median **and** the lower
  quartile of its rounds now is above the committed upper quartile: the middle halves of the two runs' rounds do
  not overlap, so most rounds now are dearer than most committed rounds, not one run's spread. A row above the 20 %
  whose quartiles still overlap is printed as within the spread and does not fail; a tight row fails at about 20 %,
  a row whose rounds spread widely needs a larger rise before the gate can call it one.

Measured on this machine with other jobs running (load 0.9–2.1): 3 runs of the same code gave interquartile ranges
of ±2–8 % and medians within 10 % of each other; none of the 84 row-against-row comparisons was dearer, by this rule
or by the median alone. With a regression planted in ``ContributionMeasurement.update`` (30 % more of its own time),
every pairing of a clean run with a slowed one failed, on 10 or 11 of the 14 rows (those that rose by 22–43 %).
Before, with 9 rounds of 1 call and a garbage collection every round, 6 of 60 comparisons had a median more than
20 % dearer at 2 threads and 3 of 60 at 1 thread; with 25 rounds of 1 call and the collector off, 2 of 84.

A row missing from the baseline (new) is printed and never fails.
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
from benchmarks.timing import Stat

#: The committed quick rows.
BASELINE = Path(__file__).parent / "results" / "bench-check.json"
#: A row fails when its median exceeds the committed one by more than this fraction (and the quartiles part).
DEARER = 0.20
#: Interleaved rounds, calls per round (the fastest kept), torch threads, the suites run.
ROUNDS, CALLS, THREADS, SUITES = 25, 2, 1, "P1,P10"


def key(row: dict[str, Any]) -> str:
    """What names a row across runs: its id, case and measure."""
    return f"{row['id']} | {row['case']} | {row['measure']}"


def dearer(committed: Stat, now: Stat, margin: float = DEARER) -> bool:
    """Whether ``now`` is dearer than ``committed``: median more than ``margin`` above, and the quartiles apart.

    Example:
        >>> dearer(Stat(1.0, 0.95, 1.05, 25), Stat(1.25, 1.2, 1.3, 25))
        True
        >>> dearer(Stat(1.0, 0.7, 1.3, 25), Stat(1.25, 0.9, 1.6, 25))  # the middle halves overlap: the spread
        False
    """
    return now.median > committed.median * (1 + margin) and now.low > committed.high


def compare(baseline: dict[str, Stat], current: dict[str, Stat], margin: float = DEARER) -> tuple[list[str], bool]:
    """Lines of ``row: now [p25–p75] (committed […], change)``, and whether any row is :func:`dearer` than committed.

    Example:
        >>> committed = {"a": Stat(1.0, 0.95, 1.05, 25), "b": Stat(2.0, 1.4, 2.6, 25)}
        >>> lines, failed = compare(committed, {"a": Stat(1.3, 1.25, 1.35, 25), "b": Stat(2.6, 2.1, 3.0, 25)})
        >>> failed, lines[0]
        (True, 'a: 1.30 [1.25–1.35] (committed 1.00 [0.95–1.05], +30 %) DEARER')
        >>> lines[1]
        'b: 2.60 [2.10–3.00] (committed 2.00 [1.40–2.60], +30 %) within the spread: p25 now ≤ p75 committed'
        >>> compare(committed, {"c": Stat(1.0, 1.0, 1.0, 1)})
        (['c: 1.00 [1.00–1.00] (not committed: new)'], False)
    """
    lines, failed = [], False
    for name, now in current.items():
        if name not in baseline:
            lines.append(f"{name}: {now.format()} (not committed: new)")
            continue
        committed = baseline[name]
        change = now.median / committed.median - 1 if committed.median else 0.0
        worse = dearer(committed, now, margin)
        failed |= worse
        verdict = ""
        if worse:
            verdict = " DEARER"
        elif change > margin:
            verdict = " within the spread: p25 now ≤ p75 committed"
        lines.append(f"{name}: {now.format()} (committed {committed.format()}, {change * 100:+.0f} %){verdict}")
    return lines, failed


def quartiles(path: Path) -> dict[str, Stat]:
    """``row key -> median and quartiles`` of a results JSON file written by ``python -m benchmarks``."""
    return {
        key(row): Stat(float(row["median"]), float(row["p25"]), float(row["p75"]), int(row["n"]))
        for row in json.loads(path.read_text())["summary"]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.check", description=__doc__)
    parser.add_argument("--update", action="store_true", help=f"write this run as the baseline ({BASELINE.name})")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        command = ["--quick", "--only", SUITES, "--threads", str(THREADS), "--repeats", str(ROUNDS)]
        command += ["--inner", str(CALLS), "--out", out]
        run_benchmarks(command)
        written = Path(out) / f"quick-{SUITES.replace(',', '-')}.json"
        current = quartiles(written)
        if args.update:
            BASELINE.write_text(written.read_text())
            print(f"bench-check: wrote {BASELINE} ({len(current)} rows)")
            return 0
    if not BASELINE.exists():
        print(f"bench-check: no baseline at {BASELINE}; run `python -m benchmarks.check --update` and commit it.")
        return 1
    lines, failed = compare(quartiles(BASELINE), current)
    print(f"\nbench-check: each quick row's median [p25–p75] now, beside {os.path.relpath(BASELINE)}")
    print("\n".join(lines))
    if failed:
        print(
            f"bench-check: FAILED: a row is more than {DEARER:.0%} dearer than committed, its quartiles apart from the "
            "committed ones (DEARER above)."
        )
        return 1
    print(f"bench-check: passed (no row more than {DEARER:.0%} dearer, its quartiles apart from the committed).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
