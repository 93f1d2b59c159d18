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


#: What each summary number means, written under the summary in the Markdown file (for the ids the run measured).
EXPLANATIONS: dict[str, str] = {
    "P1": (
        "monitor ÷ floor: the monitor's work per check (ContributionMeasurement reset, update per batch, compute) "
        "over the forward calls it cannot avoid (1 clean + Σ masks copies of every sample, same chunks, inputs built "
        "beforehand). 1.00 would mean zero overhead; the note splits the rest into the engine alone and the "
        "milliseconds per batch beyond the floor (the breakdown table says where they go)."
    ),
    "P2": "bs=1 loop ÷ monitor: how many times faster the monitor is than the reference's one-sample-one-mask loop.",
    "P3": "monitor ÷ Captum: the monitor's time over Captum FeatureAblation's (best perturbations_per_eval), same |Δ|.",
    "P4": "fit with ÷ without: a whole Trainer.fit with the monitor every epoch on 10% of validation over one without.",
    "P5": "max ÷ min peak: peak memory of a check as the masks grow 4 → 64 at a fixed max_batch_size (flat = bounded).",
    "P6": (
        "reuse ÷ occluded floor: a check whose clean outputs come from the validation step (update(..., clean=logits), "
        "what reuse_outputs=True runs; update and compute timed) over its own floor, the forward calls of the "
        "occluded copies alone. The note gives reuse ÷ today's default check (< 1 is the saving) and the clean pass's "
        "measured part of the floor's forward time, next to its share of the rows, 1/(1+H)."
    ),
    "P7": (
        "tolerance ÷ fixed limit_batches: modality_contribution(tolerance=0.02), which stops once every share's 95% "
        "half-width is ≤ 0.02, over a fixed limit_batches = the smallest number of batches that reaches that "
        "half-width on the same data (so both use the same samples: the ratio is the price of checking the "
        "half-width after every batch). The case names the samples needed; the note gives tolerance ÷ the one fixed "
        "limit that suits both models (the high-noise model's), the saving on the low-noise model. The ≤ 1.05 "
        "target is the benchmarks' own: the issue sets none."
    ),
    "P8": (
        "check with encoders ÷ plain validation pass: one batch's check (clean copy and every occluded copy) with "
        "encoders= over the model's plain forward on the batch; the note gives the same check without encoders, with "
        "encoders and reuse_outputs (clean outputs and encoder outputs from the validation step), and with ÷ without. "
        "Targets where a fill is the same for every sample and the encoder reads nothing else: ≤ 1.2 whole, ≤ 1.3 "
        "per column, ≤ 0.3 with reuse_outputs. A per-sample fill, or an encoder that also reads a per-sample input "
        "(BERT's attention mask), runs that encoder on every sample: no target."
    ),
    "P10": (
        "measurement with encoders ÷ plain validation pass: a measurement of a fit after its first (reset, update "
        "per batch of 8, compute; the safety check of encoders= ran on the fit's first) over the model's plain "
        "forward on the same samples; the note gives the same without encoders and the fit's first measurement "
        "(with the check). Targets from 24 samples on: ≤ 1.2 whole, ≤ 1.3 per column. The tiny MLP: a measurement "
        "with encoders ÷ one without (≤ 1.0: where caching cannot pay, one batch's timing chooses the plain "
        "path), and a measurement without encoders ÷ its floor (≤ 1.15)."
    ),
    "P11": (
        "gathering ÷ training step: what CollapseEarlyStopping(labels=...) adds to a training step of the demo's "
        "model (batches of 64) while its reservoir of training rows fills: choosing the rows, their features and "
        "labels, stored where they are. Target ≤ 0.02 (issue 35). The table: milliseconds per verdict."
    ),
    "P12": (
        "measurement with the spot check ÷ without: a measurement of a fit after its first with encoders= (reset, "
        "update per batch of 8, compute), with the spot check (each modality's encoders on one seeded random clean "
        "row of one seeded random batch, every other modality occluded) over the same measurement with the spot "
        "check switched off, at 24 validation samples, P10's smallest set. Target ≤ 1.03 (issue 37)."
    ),
}


def explanations(rows: list[Row]) -> str:
    ids = list(dict.fromkeys(row.id for row in rows))
    if not ids:
        return ""
    return "How to read each number:\n\n" + "".join(f"- **{i}** {EXPLANATIONS[i]}\n" for i in ids if i in EXPLANATIONS)


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
    if "clock" in machine:
        header += (
            f"Clock: {machine['clock']}; load average at the start {machine.get('load_average_at_start', '?')} on "
            f"{machine.get('cpu_count', '?')} cores.\n\n"
        )
    notes = explanations(rows)
    body = "\n".join(markdown(t) for t in [summary_table(rows), *tables])
    if notes:
        first = markdown(summary_table(rows))
        body = first + "\n" + notes + "\n" + "\n".join(markdown(t) for t in tables)
    md_path.write_text(header + body)
    return [json_path, md_path]
