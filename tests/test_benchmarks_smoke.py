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
from benchmarks.breakdown import STEPS
from benchmarks.models import GatedImageTableNet, ImageTableNet, image_table_batches, image_table_modalities, seeded
from benchmarks.peers import CaptumAblation, Floor, Monitor, clean_predictions, reference_loop, shares
from benchmarks.savings import batches_to_reach
from benchmarks.timing import choose_clock, pick_device


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


def test_occluded_floor_runs_exactly_the_engines_inputs_when_the_clean_outputs_are_given(tiny) -> None:
    model, batches = tiny
    modalities = image_table_modalities(1, patches=4)
    (clean,) = clean_predictions(model, batches[:1], modalities)
    outputs = Monitor(modalities).engine.run(model, batches[0], clean)
    expected = torch.cat([o.transpose(0, 1) for o in outputs.occluded.values()])  # (H, N, C), no clean row
    floor = Floor(model, batches[:1], modalities, max_batch_size=None, include_clean=False)
    assert floor().shape[0] == 5 * batches[0][0].shape[0]  # 4 patches + 1 table, the clean copy left out
    assert torch.allclose(floor().softmax(-1), expected.reshape(-1, expected.shape[-1]), atol=1e-6)
    assert torch.allclose(outputs.clean, clean.softmax(-1))  # the given logits, transformed as the engine's own


def test_monitor_with_the_validation_steps_outputs_gives_the_default_values(tiny) -> None:
    model, batches = tiny
    modalities = image_table_modalities(1, patches=4)
    cleans = clean_predictions(model, batches, modalities)
    reused, default = Monitor(modalities)(model, batches, cleans), Monitor(modalities)(model, batches)
    assert min(default.values()) > 0.01
    for name in default:
        assert reused[name] == pytest.approx(default[name], abs=1e-6)
    # the clean outputs really come from `cleans`: other logits give other values
    shifted = [clean + torch.arange(clean.shape[1], dtype=clean.dtype) for clean in cleans]
    assert Monitor(modalities)(model, batches, shifted)["image"] != pytest.approx(default["image"], abs=1e-3)


def _half_width(model, batches) -> float:
    """The largest share's delta-method 95% half-width, computed here from the model's outputs (ratio of sums).

    The image is occluded by each sample's mean, the table by zeros, as ``image_table_modalities`` asks.
    """
    per_sample = []
    with torch.inference_mode():
        for image, table in batches:
            clean = model(image, table).softmax(-1)
            mean_image = image.mean(dim=(1, 2, 3), keepdim=True).expand_as(image)
            d_image = (model(mean_image, table).softmax(-1) - clean).abs().sum(1)
            d_table = (model(image, torch.zeros_like(table)).softmax(-1) - clean).abs().sum(1)
            per_sample.append(torch.stack([d_image, d_table], dim=1))
    d = torch.cat(per_sample).double()  # (N, M)
    t, n = d.sum(1), d.shape[0]
    u = d - (d.sum(0) / t.sum()) * t[:, None]  # d_nm − s_m t_n
    return float((1.959963984540054 * (u.pow(2).sum(0) / (n - 1) / n).sqrt() / t.mean()).max())


def test_batches_to_reach_is_the_first_count_whose_half_width_is_within_the_tolerance() -> None:
    model = seeded(GatedImageTableNet(sharpness=10.0, image_size=8))
    batches = image_table_batches(20, 32, 1, 8)
    modalities = image_table_modalities(1)
    count, half_width = batches_to_reach(model, batches, modalities, tolerance=0.05)
    assert 2 <= count < len(batches)  # 50 samples at least, and not the last one by accident
    assert half_width == pytest.approx(_half_width(model, batches[:count]), rel=1e-4)
    assert half_width <= 0.05 < _half_width(model, batches[: count - 1])
    with pytest.raises(AssertionError, match=r"do not reach a half-width of 0\.001"):
        batches_to_reach(model, batches, modalities, tolerance=0.001)


def test_the_high_noise_model_needs_more_samples_for_the_same_precision() -> None:
    batches = image_table_batches(16, 32, 1, 8)
    modalities = image_table_modalities(1)
    low, _ = batches_to_reach(seeded(GatedImageTableNet(0.0, image_size=8)), batches, modalities, tolerance=0.05)
    high, _ = batches_to_reach(seeded(GatedImageTableNet(10.0, image_size=8)), batches, modalities, tolerance=0.05)
    assert high >= 2 * low


def test_pick_device_gives_cuda_only_where_there_is_one() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == expected and pick_device("cpu").type == "cpu"
    if torch.cuda.is_available():
        assert pick_device("cuda").type == "cuda"
    else:
        with pytest.raises(ValueError, match=r"device='cuda' was asked for but torch\.cuda\.is_available"):
            pick_device("cuda")
    with pytest.raises(ValueError, match="device='tpu' is not one of"):
        pick_device("tpu")


def test_the_thread_clock_is_taken_only_where_every_op_runs_in_the_calling_thread() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_clock("auto", cpu, threads=1) == "thread"
    assert choose_clock("auto", cpu, threads=2) == choose_clock("auto", cuda, threads=1) == "wall"
    assert choose_clock("wall", cpu, threads=1) == "wall"
    with pytest.raises(ValueError, match=r"clock='thread' needs a CPU run with 1 intra-op thread \(got device cpu, 2"):
        choose_clock("thread", cpu, threads=2)
    with pytest.raises(ValueError, match="clock='cpu' is not one of"):
        choose_clock("cpu", cpu, threads=1)


def test_quick_run_prints_and_writes_every_suite(tmp_path, capsys) -> None:
    threads = str(torch.get_num_threads())  # explicit, so the run leaves the process's thread count as it was
    assert main(["--quick", "--only", "P1,P5", "--threads", threads, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "monitor ÷ floor" in printed and "P5" in printed
    results = json.loads((tmp_path / "quick-P1-P5.json").read_text())  # a partial run never overwrites a full one
    assert {row["id"] for row in results["summary"]} == {"P1", "P5"}
    assert all(row["outputs_max_abs_diff"] < 1e-4 for row in results["summary"] if row["id"] == "P1")
    markdown = (tmp_path / "quick-P1-P5.md").read_text()
    assert markdown.startswith("Machine:") and "- **P1** monitor ÷ floor:" in markdown and "**P6**" not in markdown


def test_quick_run_of_the_reuse_and_tolerance_suites(tmp_path) -> None:
    threads = str(torch.get_num_threads())
    assert main(["--quick", "--only", "P6,P7", "--threads", threads, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "quick-P6-P7.json").read_text())
    p6 = [row for row in results["summary"] if row["id"] == "P6"]
    p7 = [row for row in results["summary"] if row["id"] == "P7"]
    assert [row["case"] for row in p6] == ["CNN+MLP, M=2, whole", "CNN+MLP, 16 image patches", "Text+MLP, M=2, whole"]
    assert [row["masks"] for row in p6] == [2, 17, 2]
    assert all(row["shares_max_abs_diff"] < 1e-5 and row["outputs_max_abs_diff"] < 1e-4 for row in p6)
    assert [row["clean_part_expected"] for row in p6] == pytest.approx([1 / 3, 1 / 18, 1 / 3])
    low, high = p7
    assert all(row["half_width"] <= row["tolerance"] for row in p7)
    assert all(row["samples"] == row["batch_size"] * row["limit_batches"] for row in p7)
    assert high["samples"] >= 5 * low["samples"]  # the point of a tolerance: the samples needed differ a lot
    assert low["one_limit_batches"] == high["one_limit_batches"] == high["limit_batches"]
    titles = [table["title"] for table in results["tables"]]
    assert titles[0].startswith("P6 reuse_outputs") and titles[1].startswith("P7 tolerance=0.05")


def test_breakdown_runs_alone_and_charges_every_step_of_the_library(tmp_path, capsys) -> None:
    threads = str(torch.get_num_threads())
    assert main(["--quick", "--only", "breakdown", "--threads", threads, "--out", str(tmp_path)]) == 0
    assert "beyond the forward calls (check − floor)" in capsys.readouterr().out
    results = json.loads((tmp_path / "quick-breakdown.json").read_text())
    assert results["summary"] == []  # a run of detail tables only has an empty summary, not a crash
    (table,) = results["tables"]
    kinds = {row[0]: row[1] for row in table["rows"]}
    assert "missing" not in kinds.values()  # every step the breakdown times still exists in the library
    assert {label for _, _, label, _ in STEPS} <= set(kinds)
    assert [row[0] for row in table["rows"][:4]] == [
        "check (reset, 2 × update, compute), per batch",
        "forward call of the 192 stacked rows (floor)",
        "beyond the forward calls (check − floor)",
        "model forward calls (inside engine.run)",
    ]


def test_p8_encoders_runs_and_the_cache_gives_the_plain_outputs(tmp_path) -> None:
    threads = str(torch.get_num_threads())
    assert main(["--quick", "--only", "P8", "--threads", threads, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "quick-P8.json").read_text())
    p8 = [row for row in results["summary"] if row["id"] == "P8"]
    assert [row["case"] for row in p8] == ["3-D CNN + table, whole, zeros", "3-D CNN + table, per column, zeros"]
    assert all(row["outputs_max_abs_diff"] <= 1e-4 for row in p8)  # the case itself raises beyond that
    titles = [table["title"] for table in results["tables"]]
    assert titles[0].startswith("P8 encoders") and titles[1].startswith("P8 3-D patch maps")
    assert [row[0] for row in results["tables"][1]["rows"]] == [
        "MONAI OcclusionSensitivity",
        "ours",
        "ours, encoders",
    ]


def test_p10_small_sets_runs_and_the_table_copies_build_no_ct_rows(tmp_path) -> None:
    threads = str(torch.get_num_threads())
    assert main(["--quick", "--only", "P10", "--threads", threads, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "quick-P10.json").read_text())
    measures = [row["measure"] for row in results["summary"] if row["id"] == "P10"]
    assert measures.count("measurement with encoders ÷ plain validation pass") == 4  # 2 cases × 2 quick sizes
    assert measures[-2:] == ["measurement with encoders ÷ without", "measurement ÷ floor"]
    memory = next(row for row in results["summary"] if row["measure"].startswith("bytes allocated"))
    saved = memory["allocated_mib"]["copied"] - memory["allocated_mib"]["not_copied"]
    # the 80 CT rows of the 10 table copies (replayed) and the 8 zeros rows of the CT copy (one row, expanded)
    assert saved == pytest.approx((10 + 1) * 8 * 24**3 * 4 / 2**20, rel=0.01)


def test_p11_probe_cost_runs_and_the_reservoir_keeps_the_gathered_rows(tmp_path) -> None:
    threads = str(torch.get_num_threads())
    assert main(["--quick", "--only", "P11", "--threads", threads, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "quick-P11.json").read_text())
    [row] = [row for row in results["summary"] if row["id"] == "P11"]
    assert row["measure"] == "gathering ÷ training step" and 0 < row["median"] < 1
    [table] = [table for table in results["tables"] if table["title"].startswith("P11")]
    assert [cells[0].split(":")[0] for cells in table["rows"]] == ["demo", "small set"]
    assert all(cells[1].endswith(" ms") for cells in table["rows"])


def test_p12_spot_check_runs_one_spot_check_per_measurement(tmp_path) -> None:
    threads = str(torch.get_num_threads())
    assert main(["--quick", "--only", "P12", "--threads", threads, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "quick-P12.json").read_text())
    rows = [row for row in results["summary"] if row["id"] == "P12"]
    assert [row["measure"] for row in rows] == ["measurement with the spot check ÷ without"] * 2  # whole, per column
    assert all(row["median"] > 0 for row in rows)  # the suite itself raises unless each measurement spot-checked once
