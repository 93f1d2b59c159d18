"""The benchmark suite runs, and what it compares computes the same numbers (values only, never timings)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `pytest` run without `python -m`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.__main__ import main
from benchmarks.models import ImageTableNet, image_table_batches, image_table_modalities, seeded
from benchmarks.peers import CaptumAblation, Floor, Monitor, reference_loop, shares


@pytest.fixture(scope="module")
def tiny():
    model = seeded(ImageTableNet(num_tables=1, image_size=8))
    return model, image_table_batches(2, 6, num_tables=1, image_size=8)


def test_batched_monitor_and_batch_size_one_reference_loop_give_the_same_shares(tiny) -> None:
    model, batches = tiny
    for modalities in (image_table_modalities(1), image_table_modalities(1, patches=4, columns=True)):
        ours = Monitor(modalities, max_batch_size=5)(model, batches)  # chunks that cut through copies
        reference = reference_loop(model, batches, modalities)
        assert min(ours.values()) > 0.01
        for name in ours:
            assert ours[name] == pytest.approx(reference[name], abs=1e-6)
            assert shares(ours)[name] == pytest.approx(shares(reference)[name], abs=1e-6)


def test_captum_feature_ablation_gives_the_same_raw_values(tiny) -> None:
    model, batches = tiny
    modalities = image_table_modalities(1, image_fill="zeros")
    ours = Monitor(modalities)(model, batches)
    theirs = CaptumAblation(model, num_outputs=5, perturbations_per_eval=2)(batches, [m.name for m in modalities])
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6)


def test_floor_runs_exactly_the_engines_forward_inputs(tiny) -> None:
    model, batches = tiny
    modalities = image_table_modalities(1, patches=4)
    engine = Monitor(modalities).engine
    outputs = engine.run(model, batches[0])
    expected = torch.cat([outputs.clean.unsqueeze(0), *(o.transpose(0, 1) for o in outputs.occluded.values())])
    floor = Floor(model, batches[:1], modalities, max_batch_size=None)
    assert torch.allclose(floor().softmax(-1), expected.reshape(-1, expected.shape[-1]), atol=1e-6)


def test_quick_run_prints_and_writes_every_suite(tmp_path, capsys) -> None:
    threads = str(torch.get_num_threads())  # explicit, so the run leaves the process's thread count as it was
    assert main(["--quick", "--only", "P1,P5", "--threads", threads, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "monitor ÷ floor" in printed and "P5" in printed
    results = json.loads((tmp_path / "quick.json").read_text())
    assert {row["id"] for row in results["summary"]} == {"P1", "P5"}
    assert all(row["outputs_max_abs_diff"] < 1e-4 for row in results["summary"] if row["id"] == "P1")
    assert (tmp_path / "quick.md").read_text().startswith("Machine:")


def test_breakdown_runs_alone_and_writes_its_table(tmp_path, capsys) -> None:
    threads = str(torch.get_num_threads())
    assert main(["--quick", "--only", "breakdown", "--threads", threads, "--out", str(tmp_path)]) == 0
    assert "engine.run on a stub model" in capsys.readouterr().out
    results = json.loads((tmp_path / "quick.json").read_text())
    assert results["summary"] == []  # a run of detail tables only has an empty summary, not a crash
    (table,) = results["tables"]
    assert [row[0] for row in table["rows"]] == [
        "forward call of the 192 stacked rows (floor)",
        "engine.run (forward included)",
        "engine.run on a stub model (the engine's own work)",
        "metric.update, alone",
        "metric.compute, alone (once per check)",
        "metric.reset, alone (once per check)",
        "metric.update, right after engine.run (as in a check)",
    ]
