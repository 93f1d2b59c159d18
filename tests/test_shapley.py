"""Exact modality Shapley values on planted models: redundancy, synergy and independent additive modalities."""

from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mc import ModalityContributionMonitor
from lightning_mc.analyses.shapley import (
    ModalityShapley,
    coalitions,
    redundancy_message,
    shapley_interactions,
    shapley_values,
)
from lightning_mc.core.modality import resolve_modalities
from lightning_mc.functional import modality_contribution, modality_shapley

from helpers import (
    PlantedModule,
    TwoModalityNet,
    assert_same_numbers,
    coalition_outputs,
    loader,
    make_engine,
    trainer_kwargs,
    two_modality_dataset,
)

MODALITIES = {"image": 0, "table": 1}


class RedundantMax(nn.Module):
    """Either input alone suffices: the max of two branches that see the same (non-negative) evidence."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.maximum(a.sum(1, keepdim=True), b.sum(1, keepdim=True))


class Xor(nn.Module):
    """Synergy: the output is the XOR of two binary inputs, useful only together."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return (a + b - 2 * a * b).sum(1, keepdim=True)


class Additive(nn.Module):
    """Independent additive modalities: non-negative linear branches on non-negative inputs, so ``|Δ|`` adds up."""

    def __init__(self, sizes: tuple[int, ...], num_outputs: int = 3) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.weights = [torch.rand(size, num_outputs, generator=generator) * (k + 1) for k, size in enumerate(sizes)]

    def forward(self, *inputs: Tensor) -> Tensor:
        return sum(x @ w for x, w in zip(inputs, self.weights))


class Mixed(nn.Module):
    """Three modalities, non-linear and interacting (for the brute-force comparison)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(2, 5), nn.Linear(3, 5)

    def forward(self, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        return torch.tanh(self.a(a)) * torch.sigmoid(self.b(b)) + torch.relu(self.c(c) + self.a(a))


def _pair(seed: int = 0, n: int = 64, d: int = 4) -> list[tuple[Tensor, Tensor]]:
    x = torch.rand(n, d, generator=torch.Generator().manual_seed(seed))
    return [(x[: n // 2], x[: n // 2].clone()), (x[n // 2 :], x[n // 2 :].clone())]


def test_redundant_pair_one_at_a_time_blind_shapley_half_half_positive_interaction() -> None:
    data = _pair()
    with pytest.warns(UserWarning, match="redundant"):
        one_at_a_time = modality_contribution(RedundantMax(), data, {"a": 0, "b": 1}, occlusion="zeros")
    assert one_at_a_time.raw == {"a": 0.0, "b": 0.0}  # occluding one of the two moves nothing
    result = modality_shapley(RedundantMax(), data, {"a": 0, "b": 1}, occlusion="zeros")
    v_all = result.coalition_values["a+b"]
    assert v_all > 1.0  # occluding both moves the output by the whole evidence
    assert result.values["a"] == pytest.approx(v_all / 2)
    assert result.shares == pytest.approx({"a": 0.5, "b": 0.5})
    # sign convention: redundancy → positive interaction, here the whole v(all)
    assert result.interactions[("a", "b")] == pytest.approx(v_all)
    assert result.num_samples == 64


def test_xor_synergy_has_negative_interaction() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 2, (200, 1), generator=generator).float()
    b = torch.randint(0, 2, (200, 1), generator=generator).float()
    result = modality_shapley(Xor(), [(a, b)], {"a": 0, "b": 1}, occlusion="zeros")
    # zero fill: occluding a leaves b, moving the output by a; occluding both moves it by a XOR b
    assert result.coalition_values["a"] == pytest.approx(a.mean().item())
    assert result.coalition_values["b"] == pytest.approx(b.mean().item())
    assert result.coalition_values["a+b"] == pytest.approx((a != b).float().mean().item())
    # I = v(ab) − v(a) − v(b) = E[a xor b] − E[a] − E[b] = −2 E[ab]: negative (synergy), ≈ −0.5 for fair coins
    both = (a * b).mean().item()
    assert result.interactions[("a", "b")] == pytest.approx(-2 * both)
    assert -0.6 < result.interactions[("a", "b")] < -0.4
    # φ_a = ½ [v(a) + v(ab) − v(b)] = E[a] − E[ab]
    assert result.values["a"] == pytest.approx(a.mean().item() - both)
    assert result.values["b"] == pytest.approx(b.mean().item() - both)
    assert sum(result.values.values()) == pytest.approx(result.coalition_values["a+b"])


def test_independent_additive_zero_interaction_and_shares_match_one_at_a_time() -> None:
    sizes = (3, 2, 5)
    generator = torch.Generator().manual_seed(2)
    batches = [tuple(torch.rand(16, size, generator=generator) for size in sizes) for _ in range(3)]
    model = Additive(sizes)
    spec = {"x": 0, "y": 1, "z": 2}
    result = modality_shapley(model, batches, spec, occlusion="zeros")
    one_at_a_time = modality_contribution(model, batches, spec, occlusion="zeros")
    v_all = result.coalition_values["x+y+z"]
    for interaction in result.interactions.values():
        assert abs(interaction) < 1e-6 * v_all  # float32 forward passes: exact 0 up to rounding
    assert result.values == pytest.approx(one_at_a_time.raw, rel=1e-6)
    assert result.shares == pytest.approx(one_at_a_time.shares, rel=1e-6)


@pytest.mark.parametrize("max_batch_size", [None, 5, 1000])
def test_equals_brute_force_coalition_loop_and_sums_to_v_all(max_batch_size: int | None) -> None:
    generator = torch.Generator().manual_seed(4)
    batches = [(torch.randn(12, 4, generator=generator), torch.randn(12, 2, generator=generator),
                torch.randn(12, 3, generator=generator)) for _ in range(2)]  # fmt: skip
    model = Mixed().eval()
    spec = {"a": 0, "b": 1, "c": 2}
    result = modality_shapley(
        model, batches, spec, occlusion="mean", output_transform="softmax", max_batch_size=max_batch_size
    )

    # brute force: one plain forward per coalition, the fill being the per-sample mean of the occluded modality
    def v(coalition: frozenset[int]) -> float:
        total, count = 0.0, 0
        for batch in batches:
            clean = model(*batch).softmax(-1)
            inputs = [x.mean(1, keepdim=True).expand_as(x) if i in coalition else x for i, x in enumerate(batch)]
            total += (clean - model(*inputs).softmax(-1)).abs().sum().item()
            count += batch[0].shape[0]
        return total / count if coalition else 0.0

    names = ["a", "b", "c"]
    game = {frozenset(s): v(frozenset(s)) for r in range(4) for s in itertools.combinations(range(3), r)}
    for coalition in coalitions(3):
        key = "+".join(names[i] for i in sorted(coalition))
        assert result.coalition_values[key] == pytest.approx(game[coalition], rel=1e-5)
    m = 3
    for i in range(m):
        others = [k for k in range(m) if k != i]
        phi = sum(
            math.factorial(len(s)) * math.factorial(m - len(s) - 1) / math.factorial(m)
            * (game[frozenset(s) | {i}] - game[frozenset(s)])
            for r in range(m) for s in itertools.combinations(others, r)
        )  # fmt: skip
        assert result.values[names[i]] == pytest.approx(phi, rel=1e-5)
    for i, j in itertools.combinations(range(m), 2):
        rest = [k for k in range(m) if k not in (i, j)]
        interaction = sum(
            math.factorial(len(s)) * math.factorial(m - len(s) - 2) / math.factorial(m - 1)
            * (game[frozenset(s) | {i, j}] - game[frozenset(s) | {i}] - game[frozenset(s) | {j}] + game[frozenset(s)])
            for r in range(m - 1) for s in itertools.combinations(rest, r)
        )  # fmt: skip
        assert result.interactions[(names[i], names[j])] == pytest.approx(interaction, rel=1e-5, abs=1e-9)
    assert sum(result.values.values()) == pytest.approx(result.coalition_values["a+b+c"], rel=1e-9)
    assert sum(result.shares.values()) == pytest.approx(1.0)


def test_run_coalitions_chunking_does_not_change_outputs_and_respects_max_batch_size() -> None:
    calls: list[int] = []

    def forward(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        calls.append(batch[0].shape[0])
        return model(*batch)

    batch = (torch.randn(6, 4), torch.randn(6, 2), torch.randn(6, 3))
    modalities = resolve_modalities({"a": 0, "b": 1, "c": 2})
    model = Mixed()
    reference = coalition_outputs(
        make_engine(modalities, occlusion="zeros", max_batch_size=1000), model, batch, coalitions(3)
    )
    clean, occluded = coalition_outputs(
        make_engine(modalities, forward_fn=forward, occlusion="zeros", max_batch_size=7), model, batch, coalitions(3)
    )
    assert max(calls) <= 7 and sum(calls) == 8 * 6
    torch.testing.assert_close(clean, reference[0])
    torch.testing.assert_close(occluded, reference[1])
    assert occluded.shape == (6, 7, 5)
    assert model.training  # mode restored


def test_two_halves_merged_with_their_reduce_functions_give_the_whole_datas_values() -> None:
    # merge_state combines each state with the dist_reduce_fx it declares, as a DDP sync does: a wrong reduction
    # ("mean", "max", "cat") for any state would give other coalition values or counts
    torch.manual_seed(0)
    clean, occluded = torch.randn(10, 2), torch.randn(10, 3, 2)
    occluded[1, 0, 0] = occluded[7, 1, 0] = float("nan")  # one skipped sample in each half
    whole = ModalityShapley(["a", "b"])
    whole.update(clean, occluded)
    halves = [ModalityShapley(["a", "b"]), ModalityShapley(["a", "b"])]
    halves[0].update(clean[:4], occluded[:4])
    halves[1].update(clean[4:], occluded[4:])
    halves[0].merge_state(halves[1])
    merged, expected = halves[0].compute(), whole.compute()
    for key in ("coalition_values", "values", "interactions"):
        torch.testing.assert_close(merged[key], expected[key])
    assert (int(merged["num_samples"]), int(merged["num_skipped"])) == (8, 2)


def test_a_sample_with_a_nan_output_is_skipped_and_counted() -> None:
    clean, occluded = torch.ones(3, 1), torch.zeros(3, 3, 1)
    occluded[1, 2, 0] = float("nan")
    metric = ModalityShapley(["a", "b"])
    metric.update(clean, occluded)
    out = metric.compute()
    assert int(out["num_samples"]) == 2 and int(out["num_skipped"]) == 1
    torch.testing.assert_close(out["coalition_values"], torch.ones(3, dtype=torch.float64))


def test_a_redundant_game_splits_evenly_with_positive_interaction_and_a_synergistic_one_negative() -> None:
    # redundant: v(a) = v(b) = 0, v(ab) = 1; synergistic: v(a) = v(b) = v(ab) = 1
    torch.testing.assert_close(shapley_values(torch.tensor([0.0, 0.0, 1.0])), torch.tensor([0.5, 0.5]).double())
    assert shapley_interactions(torch.tensor([0.0, 0.0, 1.0]))[0, 1] == 1.0
    assert shapley_interactions(torch.tensor([1.0, 1.0, 1.0]))[0, 1] == -1.0
    torch.testing.assert_close(shapley_values(torch.tensor([2.0])), torch.tensor([2.0]).double())


def test_more_than_six_modalities_are_refused_with_the_limit_in_the_message() -> None:
    with pytest.raises(ValueError, match="1 to 6 modalities"):
        coalitions(7)
    batch = tuple(torch.randn(2, 1) for _ in range(7))
    with pytest.raises(ValueError, match="1 to 6 modalities"):
        modality_shapley(nn.Identity(), [batch], {f"m{i}": i for i in range(7)})
    with pytest.raises(ValueError, match="Expected 2\\^M - 1"):
        shapley_values(torch.zeros(4))


def test_empty_data_and_a_coalition_of_unknown_modalities_are_refused() -> None:
    with pytest.raises(ValueError, match="no batch"):
        modality_shapley(RedundantMax(), [], {"a": 0, "b": 1})
    engine = make_engine({"a": 0, "b": 1})
    with pytest.raises(ValueError, match="non-empty set"):
        coalition_outputs(engine, RedundantMax(), (torch.rand(2, 2), torch.rand(2, 2)), [frozenset({2})])


class RedundantModule(PlantedModule):
    """A trainable scale on the max of two branches that see the same evidence (either modality alone suffices)."""

    lr = 1e-3

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.scale * RedundantMax()(a, b)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return (self(batch[0], batch[1]) - 1.0).pow(2).mean()


def test_functional_redundancy_warning_fires_on_redundant_and_not_on_additive() -> None:
    data = _pair()
    with pytest.warns(UserWarning, match="look redundant.*modality_shapley"):
        result = modality_contribution(RedundantMax(), data, {"a": 0, "b": 1}, occlusion="zeros", check_redundancy=True)
    shapley = modality_shapley(RedundantMax(), data, {"a": 0, "b": 1}, occlusion="zeros")
    assert result.all_occluded_raw == pytest.approx(shapley.coalition_values["a+b"])
    assert modality_contribution(RedundantMax(), data, {"a": 0, "b": 1}, occlusion="zeros").all_occluded_raw is None

    sizes = (3, 2)
    batches = [tuple(torch.rand(16, size, generator=torch.Generator().manual_seed(5)) for size in sizes)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        additive = modality_contribution(
            Additive(sizes), batches, {"x": 0, "y": 1}, occlusion="zeros", check_redundancy=True
        )
    assert additive.all_occluded_raw == pytest.approx(sum(additive.raw.values()), rel=1e-5)


def test_functional_shapley_option_equals_modality_shapley_and_feeds_the_redundancy_check() -> None:
    data = _pair()
    with pytest.warns(UserWarning, match="look redundant"):
        result = modality_contribution(
            RedundantMax(), data, {"a": 0, "b": 1}, occlusion="zeros", shapley=True, check_redundancy=True
        )
    reference = modality_shapley(RedundantMax(), data, {"a": 0, "b": 1}, occlusion="zeros")
    assert_same_numbers(result.shapley, reference, "shapley")  # two entry points, other chunks of copies
    # v(all) from the Shapley pass, no extra copy
    assert_same_numbers(result.all_occluded_raw, reference.coalition_values["a+b"], "v(all)")
    assert (
        modality_contribution(
            RedundantMax(), data, {"a": 0, "b": 1}, occlusion="zeros", check_redundancy=False, shapley=False
        ).shapley
        is None
    )
    with pytest.raises(ValueError, match="1 to 6 modalities"):
        modality_contribution(
            Additive((1,) * 7),
            [tuple(torch.rand(2, 1) for _ in range(7))],
            {f"m{i}": i for i in range(7)},
            shapley=True,
        )


def test_redundancy_message_threshold() -> None:
    assert redundancy_message({"a": 0.01, "b": 0.02}, 1.0) is not None
    assert redundancy_message({"a": 0.5, "b": 0.5}, 1.0) is None  # additive: raw values sum to v(all)
    assert redundancy_message({"a": 0.0, "b": 0.0}, 0.0) is None  # nothing moves: not a redundancy
    assert redundancy_message({"a": 0.0}, float("nan")) is None


def test_monitor_redundancy_warning_once_and_logs_v_all(tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(32, 4, generator=generator)
    dataset = TensorDataset(x, x.clone())
    monitor = ModalityContributionMonitor({"a": 0, "b": 1}, occlusion="zeros", check_redundancy=True, dashboard=False)
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_epochs=2))
    with pytest.warns(UserWarning) as record:
        trainer.fit(RedundantModule(), DataLoader(dataset, batch_size=8), DataLoader(dataset, batch_size=8))
    redundant = [w for w in record if "look redundant" in str(w.message)]
    assert len(redundant) == 1
    assert monitor.latest is not None and monitor.latest.raw == {"a": 0.0, "b": 0.0}
    assert trainer.callback_metrics["mc/all_occluded_raw"].item() == pytest.approx(
        monitor.latest.all_occluded_raw, rel=1e-6
    )
    assert monitor.latest.all_occluded_raw > 1.0
    # off by default: no extra pass, nothing logged
    plain = ModalityContributionMonitor({"a": 0, "b": 1}, occlusion="zeros", dashboard=False)
    trainer = L.Trainer(callbacks=[plain], **trainer_kwargs(tmp_path / "plain", max_epochs=1))
    trainer.fit(RedundantModule(), DataLoader(dataset, batch_size=8), DataLoader(dataset, batch_size=8))
    assert "mc/all_occluded_raw" not in trainer.callback_metrics and plain.latest.all_occluded_raw is None


def test_monitor_with_shapley_takes_v_all_from_its_last_coalition_without_a_second_all_occluded_pass(
    tmp_path,
) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(32, 4, generator=generator)
    dataset = TensorDataset(x, x.clone())
    results = {}
    for shapley in (False, True):
        fully_occluded_rows = []

        def forward(model: nn.Module, batch: Any, rows: list[int] = fully_occluded_rows) -> Tensor:
            rows.append(int(((batch[0] == 0).all(1) & (batch[1] == 0).all(1)).sum()))
            return model(batch[0], batch[1])

        monitor = ModalityContributionMonitor(
            {"a": 0, "b": 1}, forward_fn=forward, occlusion="zeros", check_redundancy=True, shapley=shapley
        )
        trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path / str(shapley), max_epochs=1))
        with pytest.warns(UserWarning, match="look redundant"):
            trainer.fit(RedundantModule(), DataLoader(dataset, batch_size=8), DataLoader(dataset, batch_size=8))
        assert sum(fully_occluded_rows) == 32  # each validation sample occluded whole once, with or without Shapley
        results[shapley] = trainer.callback_metrics["mc/all_occluded_raw"].item()
        assert monitor.latest is not None and monitor.latest.all_occluded_raw == pytest.approx(results[shapley])
    assert_same_numbers(results[True], results[False], "v(all) with and without Shapley")
    assert monitor.latest_shapley is not None
    assert_same_numbers(results[True], monitor.latest_shapley.coalition_values["a+b"], "v(all) as logged")


def test_monitor_shapley_logs_values_equal_to_the_functional_api(tmp_path) -> None:
    monitor = ModalityContributionMonitor(MODALITIES, output_transform="softmax", shapley=True, dashboard=False)
    torch.manual_seed(0)
    model = TwoModalityNet()
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(model, loader(two_modality_dataset(48)), loader(two_modality_dataset(32, seed=1)))
    offline = modality_shapley(model, loader(two_modality_dataset(32, seed=1)), MODALITIES, output_transform="softmax")
    for name in MODALITIES:
        assert_same_numbers(
            trainer.callback_metrics[f"mc/shapley/{name}"].item(), offline.values[name], f"mc/shapley/{name}"
        )
        assert_same_numbers(monitor.latest_shapley.values[name], offline.values[name], f"latest_shapley.values[{name}]")
    interaction = trainer.callback_metrics["mc/interaction/image/table"].item()
    assert_same_numbers(interaction, offline.interactions[("image", "table")], "interaction")
    assert monitor.history[-1]["shapley"] == monitor.latest_shapley.values
    assert monitor.latest.shapley == monitor.latest_shapley
    with pytest.raises(ValueError, match="1 to 6 modalities"):
        ModalityContributionMonitor({f"m{i}": i for i in range(7)}, shapley=True)


class RecordShapley(L.Callback):
    """Placed after the monitor: each rank writes the Shapley values it logged, rank 0 the final weights."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.logged: dict[str, float] = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.logged = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("mc/")}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (self.directory / f"shapley{trainer.global_rank}.json").write_text(json.dumps(self.logged))
        if trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), self.directory / "weights.pt")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ddp_shapley_and_share_intervals_equal_single_process(tmp_path) -> None:
    # Shapley: sum states; intervals: per-sample values all-gathered (cat state) and bootstrapped in canonical order
    monitor = ModalityContributionMonitor(
        MODALITIES, output_transform="softmax", shapley=True, ci=0.9, n_boot=300, dashboard=False
    )
    torch.manual_seed(0)
    trainer = L.Trainer(
        callbacks=[monitor, RecordShapley(tmp_path)],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=1),
    )
    # 33 validation samples: DistributedSampler pads rank 1 with a repeat, which must not be counted
    trainer.fit(
        TwoModalityNet(), loader(two_modality_dataset(48), batch_size=8), loader(two_modality_dataset(33, seed=1))
    )
    ranks = [json.loads((tmp_path / f"shapley{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == pytest.approx(ranks[1], abs=1e-7)
    model = TwoModalityNet()
    model.load_state_dict(torch.load(tmp_path / "weights.pt"))
    single = modality_shapley(model, loader(two_modality_dataset(33, seed=1)), MODALITIES, output_transform="softmax")
    for name in MODALITIES:
        assert_same_numbers(ranks[0][f"mc/shapley/{name}"], single.values[name], f"mc/shapley/{name}")
    assert_same_numbers(
        ranks[0]["mc/interaction/image/table"], single.interactions[("image", "table")], "mc/interaction/image/table"
    )
    offline = modality_contribution(
        model, loader(two_modality_dataset(33, seed=1)), MODALITIES, output_transform="softmax", ci=0.9, n_boot=300
    )
    assert offline.num_samples == 33
    for name in MODALITIES:
        assert_same_numbers(ranks[0][f"mc/share/{name}"], offline.shares[name], f"mc/share/{name}")
        assert_same_numbers(ranks[0][f"mc/share_low/{name}"], offline.share_low[name], f"mc/share_low/{name}")
        assert_same_numbers(ranks[0][f"mc/share_high/{name}"], offline.share_high[name], f"mc/share_high/{name}")
        assert offline.share_low[name] < offline.shares[name] < offline.share_high[name]
