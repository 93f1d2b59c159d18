"""Formatting of the results: a plain-text table for the terminal, Markdown and JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.suites import Row, Table


def summary_table(rows: list[Row]) -> Table:
    def verdict(row: Row) -> str:
        return "n/a" if row.met is None else ("met" if row.met else "MISSED")

    return Table(
        "Summary (median [p25–p75] of per-round ratios, things compared run interleaved in the same rounds)",
        ["id", "case", "measure", "median [p25–p75]", "n", "target", "verdict", "note"],
        [
            [r.id, r.case, r.measure, r.value.format(r.digits), f"{r.value.n}", r.target, verdict(r), r.note]
            for r in rows
        ],
    )


def markdown(table: Table) -> str:
    lines = [f"**{table.title}**", "", "| " + " | ".join(table.columns) + " |"]
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


def text(table: Table) -> str:
    widths = [max([len(c), *(len(row[i]) for row in table.rows)]) for i, c in enumerate(table.columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(table.columns, widths))
    out = [table.title, line, "-" * len(line)]
    out += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table.rows]
    if table.note:
        out.append(table.note)
    return "\n".join(out) + "\n"


def write(directory: Path, stem: str, machine: dict[str, Any], rows: list[Row], tables: list[Table]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    payload = {
        "machine": machine,
        "summary": [row.as_dict() for row in rows],
        "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows, "note": t.note} for t in tables],
    }
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    header = f"Machine: {machine['description']}\n\nCommand: `{machine['command']}`\n\n"
    md_path.write_text(header + "\n".join(markdown(t) for t in [summary_table(rows), *tables]))
    return [json_path, md_path]
