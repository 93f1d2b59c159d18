"""ModalityBalancer: the coefficient formula, engage/release, exact gradient scaling, dropout, logging, resume."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from lightning_mc import ModalityBalancer, ModalityContributionMonitor
from lightning_mc.callbacks.balancer import DEFAULT_MIN_SHARE, RELEASE_FRACTION, balance_coefficients, next_active

from helpers import NUM_CLASSES, PlantedModule, fit_scheduled, loader, trainer_kwargs, two_modality_dataset

MODALITIES = {"image": 0, "table": 1}
ENCODERS = {"image": "image_branch", "table": "table_branch"}


class FusionNet(PlantedModule):
    """Two encoders and a fusion head on their concatenated embeddings (plain SGD, so steps are easy to replay)."""

    def __init__(self, lr: float = 0.5) -> None:
        super().__init__()
        self.lr = lr
        self.image_branch = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Tanh())
        self.table_branch = nn.Linear(5, 6)  # no activation: a dropped (zeroed) row cannot occur naturally
        self.head = nn.Linear(12, NUM_CLASSES)

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return self.head(torch.cat([self.image_branch(image), self.table_branch(table)], dim=1))


class GradRecorder(L.Callback):
    """Copies every gradient in ``on_before_optimizer_step``: placed before and after the balancer in the list."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {name: p.grad.detach().clone() for name, p in pl_module.named_parameters() if p.grad is not None}
        self.steps.append({"epoch": trainer.current_epoch, **grads})


def _fit(tmp_path, balancer: ModalityBalancer | None, *extra: L.Callback, model=None, **overrides) -> L.Trainer:
    monitor = overrides.pop("monitor", None) or ModalityContributionMonitor(MODALITIES, occlusion="zeros")
    ckpt_path = overrides.pop("ckpt_path", None)
    num_train = overrides.pop("num_train", 48)
    callbacks = [monitor, *([balancer] if balancer is not None else []), *extra]
    callbacks = overrides.pop("callbacks", callbacks)
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **overrides))
    torch.manual_seed(0)
    trainer.fit(
        model or FusionNet(),
        loader(two_modality_dataset(num_train)),
        loader(two_modality_dataset(32, seed=1)),
        ckpt_path=ckpt_path,
    )
    return trainer


class PlantState(L.Callback):
    """After the balancer's ``setup`` (which starts every fit fresh): loads ``state`` into it, as a resume would."""

    def __init__(self, balancer: ModalityBalancer, state: dict[str, Any]) -> None:
        self.balancer, self.state = balancer, state

    def on_fit_start(self, trainer, pl_module) -> None:
        self.balancer.load_state_dict(self.state)


def _ogm(share: float, others: list[float], alpha: float) -> float:
    """OGM-GE's coefficient in its continuous form, written out independently of the library."""
    rho = share / (sum(others) / len(others))
    return 1.0 - math.tanh(alpha * max(rho - 1.0, 0.0))


# --- the formula -------------------------------------------------------------------------------------------------


def test_coefficients_of_planted_shares_follow_one_minus_tanh_of_the_excess_dominance() -> None:
    got = balance_coefficients({"image": 0.2, "table": 0.8}, alpha=1.0)
    assert got == {"image": 1.0, "table": pytest.approx(1.0 - math.tanh(3.0))}  # ρ = 0.8 / 0.2 = 4
    assert got["table"] == pytest.approx(0.0049452, abs=1e-7)
    got = balance_coefficients({"image": 0.6, "table": 0.4}, alpha=2.0)  # ρ = 1.5: 1 − tanh(1)
    assert got == {"image": pytest.approx(0.2384058), "table": 1.0}
    # three modalities: ρ = share / mean of the others; only the leader exceeds 1
    got = balance_coefficients({"a": 0.5, "b": 0.3, "c": 0.2}, alpha=0.5)
    assert got == {"a": pytest.approx(1.0 - math.tanh(0.5)), "b": 1.0, "c": 1.0}  # ρ_a = 0.5 / 0.25 = 2
    got = balance_coefficients({"a": 0.45, "b": 0.45, "c": 0.1}, alpha=1.0)  # two leaders, both slowed alike
    assert got["a"] == got["b"] == pytest.approx(1.0 - math.tanh(0.45 / 0.275 - 1.0)) and got["c"] == 1.0


def test_equal_shares_and_shares_at_or_above_min_share_leave_every_coefficient_at_one() -> None:
    assert balance_coefficients({"a": 0.5, "b": 0.5}, alpha=5.0) == {"a": 1.0, "b": 1.0}
    assert balance_coefficients({"a": 0.25, "b": 0.75}, alpha=1.0, min_share=0.2) == {"a": 1.0, "b": 1.0}
    below = balance_coefficients({"a": 0.25, "b": 0.75}, alpha=1.0, min_share=0.3)  # a is below min_share: act
    assert below == {"a": 1.0, "b": pytest.approx(1.0 - math.tanh(2.0))}


def test_a_modality_doing_everything_gets_coefficient_zero_and_nan_shares_are_refused() -> None:
    assert balance_coefficients({"a": 1.0, "b": 0.0}, alpha=1.0) == {"a": 0.0, "b": 1.0}
    with pytest.raises(ValueError, match="not NaN"):
        balance_coefficients({"a": math.nan, "b": 0.5}, alpha=1.0)
    with pytest.raises(ValueError, match="at least two"):
        balance_coefficients({"a": 1.0}, alpha=1.0)


# --- engage and release ------------------------------------------------------------------------------------------

# planted image shares of helpers.ScheduledContributionNet at these (image, table) scales, measured: 0.546, 0.265, 0.002
BALANCED, MODEST, COLLAPSED = (1.0, 1.0), (0.3, 1.0), (0.002, 1.0)
SCHEDULED_ENCODERS = {"image": "image_head", "table": "table_head"}


def test_next_active_engages_below_min_share_and_releases_only_at_release_share() -> None:
    lowest = [0.30, 0.20, 0.09, 0.15, 0.30, 0.39, 0.40, 0.20, 0.11]
    active, states = False, []
    for share in lowest:
        active = next_active(active, share, min_share=0.12, release_share=0.4)
        states.append(active)
    # 0.20 and 0.15 are between the thresholds: off before the collapse at 0.09, on after it until 0.40
    assert states == [False, False, True, True, True, True, False, False, True]
    assert all(next_active(False, share, None, 0.4) for share in (0.5, 0.01))  # min_share=None: always acting
    assert next_active(True, 0.3, 0.3, 0.3) is False and next_active(False, 0.29, 0.3, 0.3) is True  # no hysteresis


def test_fed_three_modality_checks_the_default_release_share_is_0_8_over_n() -> None:
    balancer = ModalityBalancer({"a": "a_encoder"}, dropout=0.0)  # driven by hand: no trainer, no setup
    planted = [(0.5, 0.3, 0.2), (0.8, 0.15, 0.05), (0.5, 0.25, 0.25), (0.4, 0.33, 0.27)]
    for epoch, shares in enumerate(planted):
        balancer._on_monitor_check(None, {"epoch": epoch, "global_step": epoch, "shares": dict(zip("abc", shares))})
    # engaged by 0.05 < 0.12, kept at 0.25 (< 0.8 / 3 = 0.267), released at 0.27
    assert [entry["active"] for entry in balancer.history] == [False, True, True, False]
    assert balancer.history[1]["coefficients"] == {"a": pytest.approx(1.0 - math.tanh(0.8 / 0.1 - 1.0))}
    assert balancer.history[3]["coefficients"] == {"a": 1.0} and balancer.history[3]["event"] == "released"


class LoggedActive(L.Callback):
    """The balancer_active value logged at each training epoch end (after the balancer, which logs it)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.values.append(trainer.callback_metrics["mc/balancer_active"].item())


def test_a_planted_collapse_engages_the_balancer_and_recovery_releases_it_with_one_line_each(tmp_path, caplog) -> None:
    schedule = [BALANCED, MODEST, COLLAPSED, MODEST, MODEST, BALANCED, MODEST, COLLAPSED]
    balancer = ModalityBalancer(SCHEDULED_ENCODERS, dropout=0.0)  # the defaults: min_share 0.12, release 0.4
    logged = LoggedActive()
    with caplog.at_level(logging.INFO):
        _, monitor = fit_scheduled(tmp_path, schedule, balancer, logged)

    assert (DEFAULT_MIN_SHARE, RELEASE_FRACTION, balancer._release) == (0.12, 0.8, 0.4)  # 0.8 / 2 modalities
    active = [False, False, True, True, True, False, False, True]  # MODEST (0.265) only acts after a collapse
    assert [entry["active"] for entry in balancer.history] == active
    assert logged.values == [float(value) for value in active]
    events = [(entry["epoch"], entry["event"]) for entry in balancer.history if entry["event"]]
    assert events == [(2, "engaged"), (5, "released"), (7, "engaged")]
    for entry, check in zip(balancer.history, monitor.history):
        shares = check["shares"]
        if entry["active"]:  # the OGM coefficients of that check's shares, written out independently
            want = {m: _ogm(shares[m], [shares[o] for o in shares if o != m], alpha=1.0) for m in shares}
            assert entry["coefficients"] == pytest.approx(want) and want["table"] < 0.9
        else:
            assert entry["coefficients"] == {"image": 1.0, "table": 1.0}
    lines = [record.getMessage() for record in caplog.records if "ModalityBalancer" in record.getMessage()]
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    assert lines[0].startswith("ModalityBalancer engaged at epoch 2: mc/share/image = 0.002 < min_share=0.12")
    assert lines[1].startswith("ModalityBalancer released at epoch 5: mc/share/table = 0.454 ≥ release_share=0.4")
    assert lines[2].startswith("ModalityBalancer engaged at epoch 7")


class WeakTableNet(FusionNet):
    """FusionNet reading its table at a third of its scale: the table keeps a modest share."""

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return super().forward(image, table / 3)


def test_a_model_whose_weaker_share_stays_above_min_share_trains_bit_identically_to_no_balancer(tmp_path) -> None:
    # Bit-equality is the right check here, not a tolerance: with the balancer released, both runs execute the same
    # kernels on the same rows in the same order (its hooks return None, it scales nothing and draws from its own
    # generator, never from the global RNG), so any difference at all would mean the balancer touched the training.
    torch.manual_seed(0)
    plain = WeakTableNet()
    plain_trainer = _fit(tmp_path / "plain", None, model=plain, max_epochs=3)
    torch.manual_seed(0)
    balanced = WeakTableNet()
    balancer = ModalityBalancer(ENCODERS)  # the defaults, dropout=1.0: its forward hooks are in place
    _fit(tmp_path / "balanced", balancer, model=balanced, max_epochs=3)

    monitor = next(cb for cb in plain_trainer.callbacks if isinstance(cb, ModalityContributionMonitor))
    lowest = min(min(entry["shares"].values()) for entry in monitor.history)
    assert DEFAULT_MIN_SHARE <= lowest < 0.3  # a modest share, above the engage threshold
    assert [entry["active"] for entry in balancer.history] == [False, False, False]
    assert len(balancer._handles) == 0  # removed at teardown; they were there during fit (dropout hooks)
    for name, value in plain.state_dict().items():
        assert torch.equal(balanced.state_dict()[name], value), name


# --- gradients ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_encoder_gradients_are_scaled_exactly_by_the_coefficient_and_other_gradients_are_untouched(
    tmp_path, precision
) -> None:
    before, after = GradRecorder(), GradRecorder()
    balancer = ModalityBalancer(ENCODERS, alpha=3.0, min_share=None, dropout=0.0)
    monitor = ModalityContributionMonitor(MODALITIES, occlusion="zeros")
    _fit(tmp_path, None, callbacks=[monitor, before, balancer, after], max_epochs=3, precision=precision)

    assert len(before.steps) == len(after.steps) == 9  # 3 epochs × 3 batches
    slowed = []
    for step_before, step_after in zip(before.steps, after.steps):
        epoch = step_before["epoch"]
        if epoch == 0:  # no check yet: every coefficient is 1
            expected = {"image": 1.0, "table": 1.0}
        else:  # set from the shares of the previous epoch's check, computed here independently
            shares = monitor.history[epoch - 1]["shares"]
            expected = {m: _ogm(shares[m], [shares[o] for o in shares if o != m], alpha=3.0) for m in shares}
        slowed.append(min(expected.values()))
        for name, grad in step_before.items():
            if name == "epoch":
                continue
            modality = next((m for m, path in ENCODERS.items() if name.startswith(path + ".")), None)
            factor = 1.0 if modality is None else expected[modality]
            torch.testing.assert_close(step_after[name], grad * factor, rtol=1e-6, atol=0.0)
        for name in ("head.weight", "head.bias"):
            assert torch.equal(step_after[name], step_before[name])  # the fusion head is never scaled
    assert min(slowed) < 0.9  # a modality really was slowed: the comparison above was not 1 == 1


def test_with_gradient_accumulation_the_step_equals_a_manual_step_on_the_scaled_summed_gradients(tmp_path) -> None:
    torch.manual_seed(0)
    model = FusionNet()
    start = copy.deepcopy(model.state_dict())
    balancer = ModalityBalancer(ENCODERS, min_share=None, dropout=0.0)
    planted = PlantState(balancer, {"coefficients": {"image": 1.0, "table": 0.25}})  # in effect from the first step
    _fit(tmp_path, balancer, planted, model=model, max_epochs=1, accumulate_grad_batches=2, num_train=64)

    manual = FusionNet()
    manual.load_state_dict(start)
    unbalanced = FusionNet()
    unbalanced.load_state_dict(start)
    batches = list(loader(two_modality_dataset(64)))  # 4 batches: 2 optimizer steps of 2 micro-batches
    for net, table_factor in ((manual, 0.25), (unbalanced, 1.0)):
        optimizer = torch.optim.SGD(net.parameters(), lr=net.lr)
        for first in range(0, len(batches), 2):
            optimizer.zero_grad()
            for image, table, label in batches[first : first + 2]:
                (nn.functional.cross_entropy(net(image, table), label) / 2).backward()
            for parameter in net.table_branch.parameters():
                parameter.grad *= table_factor
            optimizer.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, manual.state_dict()[name], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model.table_branch.weight, unbalanced.table_branch.weight, atol=1e-4)
    torch.testing.assert_close(model.image_branch[1].weight, manual.image_branch[1].weight)


# --- dropout -----------------------------------------------------------------------------------------------------


class OutputRecorder(L.Callback):
    """After the balancer's setup: hooks both encoders and counts, per stage, rows the balancer replaced by zeros."""

    def __init__(self) -> None:
        self.dropped = {"train": {"image": 0, "table": 0}, "eval": {"image": 0, "table": 0}}
        self.rows = {"train": 0, "eval": 0}
        self.mismatches = 0

    def setup(self, trainer, pl_module, stage) -> None:
        for modality, path in ENCODERS.items():
            pl_module.get_submodule(path).register_forward_hook(self._hook(modality))

    def _hook(self, modality: str):
        def hook(module, inputs, output) -> None:
            stage = "train" if module.training and torch.is_grad_enabled() else "eval"
            original = module.forward(*inputs)  # the encoder without any hook
            zero = (output == 0).all(dim=1) & (original != 0).any(dim=1)
            kept = torch.isclose(output, original, rtol=1e-6, atol=1e-7).all(dim=1)
            self.mismatches += int((~(zero | kept)).sum())
            self.dropped[stage][modality] += int(zero.sum())
            if modality == "table":
                self.rows[stage] += output.shape[0]

        return hook


def test_dropout_zeroes_whole_rows_of_the_slowed_encoder_in_training_only(tmp_path) -> None:
    balancer = ModalityBalancer(ENCODERS, min_share=None, dropout=0.8)
    planted = {"coefficients": {"image": 1.0, "table": 0.375}}  # q = 0.8 × (1 − 0.375) = 0.5
    balancer.load_state_dict(planted)
    assert balancer.drop_probability("table") == pytest.approx(0.5) and balancer.drop_probability("image") == 0.0
    recorder = OutputRecorder()
    _fit(tmp_path, balancer, PlantState(balancer, planted), recorder, max_epochs=1, num_train=96)

    assert recorder.mismatches == 0  # every row is either the encoder's own output or all zeros
    assert recorder.rows["train"] == 96
    assert 20 <= recorder.dropped["train"]["table"] <= 76  # Binomial(96, 0.5): mean 48, sd 4.9
    assert recorder.dropped["train"]["image"] == 0  # coefficient 1: never dropped
    assert recorder.rows["eval"] > 0 and recorder.dropped["eval"] == {"image": 0, "table": 0}  # monitor, validation


# --- logging, warm-up, NaN ---------------------------------------------------------------------------------------


def test_coefficients_are_logged_under_the_monitor_prefix_and_the_warmup_keeps_them_at_one(tmp_path) -> None:
    monitor = ModalityContributionMonitor(MODALITIES, occlusion="zeros", prefix="mc_ext")
    balancer = ModalityBalancer(ENCODERS, alpha=3.0, min_share=None, warmup_epochs=1, monitor=monitor)
    trainer = _fit(tmp_path, balancer, monitor=monitor, max_epochs=2)

    assert [entry["epoch"] for entry in balancer.history] == [0, 1]
    assert balancer.history[0]["coefficients"] == {"image": 1.0, "table": 1.0}
    shares = monitor.history[1]["shares"]
    want = {m: _ogm(shares[m], [shares[o] for o in shares if o != m], alpha=3.0) for m in shares}
    assert balancer.coefficients == pytest.approx(want) and min(want.values()) < 1.0
    for name in ("image", "table"):
        assert trainer.callback_metrics[f"mc_ext/coef/{name}"].item() == pytest.approx(want[name])


@pytest.mark.filterwarnings("ignore:Occluding any single modality:UserWarning")  # the monitor's own
def test_nan_shares_leave_the_coefficients_unchanged_with_a_warning(tmp_path) -> None:
    model = FusionNet(lr=0.0)
    with torch.no_grad():
        model.head.weight.zero_()  # the outputs ignore both inputs: no occlusion moves them, the shares are NaN
    balancer = ModalityBalancer(ENCODERS, min_share=None, dropout=0.0)
    planted = PlantState(balancer, {"coefficients": {"image": 1.0, "table": 0.5}})
    with pytest.warns(UserWarning, match="coefficients stay as they are"):
        _fit(tmp_path, balancer, planted, model=model, max_epochs=1)
    assert balancer.coefficients == {"image": 1.0, "table": 0.5} and balancer.history == []


# --- DDP ---------------------------------------------------------------------------------------------------------


class RankRecord(L.Callback):
    """Each ddp_spawn worker writes the coefficients it applied, what it logged and its final weights."""

    def __init__(self, directory: str, balancer: ModalityBalancer) -> None:
        self.directory, self.balancer, self.rows = directory, balancer, []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics.items()
        logged = {key: value.item() for key, value in metrics if "/coef/" in key or key.endswith("balancer_active")}
        shares = self.balancer.monitor.history[-1]["shares"]
        self.rows.append(
            {
                "coefficients": dict(self.balancer.coefficients),
                "logged": logged,
                "shares": shares,
                "history": [dict(entry) for entry in self.balancer.history],
            }
        )

    def on_fit_end(self, trainer, pl_module) -> None:
        weights = {name: value.tolist() for name, value in pl_module.state_dict().items()}
        record = {"rows": self.rows, "weights": weights}
        Path(self.directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_ddp_spawn_ranks_engage_together_apply_the_same_coefficients_and_stay_in_sync(tmp_path) -> None:
    # min_share 0.49: any imbalance engages it, and only near-equal shares (≥ 0.499) release it
    balancer = ModalityBalancer(ENCODERS, alpha=3.0, min_share=0.49, release_share=0.499)  # pickled after __init__
    monitor = ModalityContributionMonitor(MODALITIES, occlusion="zeros")
    callbacks = [monitor, balancer, RankRecord(str(tmp_path), balancer)]
    _fit(tmp_path, None, callbacks=callbacks, max_epochs=2, strategy="ddp_spawn", devices=2, accumulate_grad_batches=2)

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]  # same shares, engagements, coefficients, logged values and weights on both ranks
    history = ranks[0]["rows"][-1]["history"]
    assert history[0]["event"] == "engaged" and [entry["active"] for entry in history] == [True, True]
    for row in ranks[0]["rows"]:
        shares = row["shares"]
        assert min(shares.values()) < 0.49  # what engaged it
        want = {m: _ogm(shares[m], [shares[o] for o in shares if o != m], alpha=3.0) for m in shares}
        assert row["coefficients"] == pytest.approx(want)
        logged = {**{f"mc/coef/{m}": k for m, k in want.items()}, "mc/balancer_active": 1.0}
        assert row["logged"] == pytest.approx(logged, abs=1e-6)
    assert min(min(row["coefficients"].values()) for row in ranks[0]["rows"]) < 0.9


# --- resume ------------------------------------------------------------------------------------------------------


class CoefficientsAtEpochStart(L.Callback):
    def __init__(self, balancer: ModalityBalancer) -> None:
        self.balancer = balancer
        self.seen: dict[int, dict[str, float]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.seen[trainer.current_epoch] = dict(self.balancer.coefficients)


def test_resume_restores_the_coefficients_in_effect_and_the_history(tmp_path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = ModalityBalancer(ENCODERS, alpha=3.0, min_share=None)
    _fit(tmp_path, first, checkpoint, max_epochs=2, enable_checkpointing=True)
    assert min(first.coefficients.values()) < 1.0  # something to restore

    resumed = ModalityBalancer(ENCODERS, alpha=3.0, min_share=None)  # a new process: coefficients 1
    seen = CoefficientsAtEpochStart(resumed)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    _fit(
        tmp_path,
        resumed,
        checkpoint,
        seen,
        max_epochs=3,
        enable_checkpointing=True,
        ckpt_path=tmp_path / "ckpt" / "last.ckpt",
    )
    assert seen.seen[2] == first.coefficients  # the first resumed step uses the stored coefficients
    assert resumed.history[:2] == first.history and [entry["epoch"] for entry in resumed.history] == [0, 1, 2]


def test_a_resumed_fit_stays_engaged_between_the_thresholds_because_the_checkpoint_holds_the_state(tmp_path) -> None:
    schedule = [BALANCED, COLLAPSED, MODEST, MODEST, BALANCED]
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = ModalityBalancer(SCHEDULED_ENCODERS, dropout=0.0)
    fit_scheduled(tmp_path, schedule, first, checkpoint, max_epochs=2, enable_checkpointing=True)
    assert first.active and first.history[-1]["event"] == "engaged"  # engaged by the collapse at epoch 1

    resumed = ModalityBalancer(SCHEDULED_ENCODERS, dropout=0.0)  # a new process: released
    seen = ActiveAtEpochStart(resumed)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    ckpt_path = tmp_path / "ckpt" / "last.ckpt"
    fit_scheduled(tmp_path, schedule, resumed, checkpoint, seen, enable_checkpointing=True, ckpt_path=ckpt_path)
    assert seen.active == {2: True, 3: True, 4: True}  # in effect from the first resumed step
    # MODEST (0.265) is between min_share and release_share: only the restored state keeps it engaged
    assert [entry["active"] for entry in resumed.history] == [False, True, True, True, False]
    assert resumed.history[:2] == first.history and resumed.history[-1]["event"] == "released"


class ActiveAtEpochStart(L.Callback):
    def __init__(self, balancer: ModalityBalancer) -> None:
        self.balancer = balancer
        self.active: dict[int, bool] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.active[trainer.current_epoch] = self.balancer.active


def test_active_is_restored_from_the_checkpoint_and_a_state_without_it_loads_released() -> None:
    balancer = ModalityBalancer(ENCODERS)
    balancer.load_state_dict({"active": True, "coefficients": {"image": 1.0, "table": 0.2}})
    assert balancer.active is True and balancer.state_dict()["active"] is True
    balancer.load_state_dict({"coefficients": {"image": 1.0, "table": 0.2}})  # no "active": released
    assert balancer.active is False


def test_a_checkpoint_without_balancer_state_starts_with_coefficients_one() -> None:
    balancer = ModalityBalancer(ENCODERS)
    balancer.load_state_dict({})
    assert balancer.coefficients == {"image": 1.0, "table": 1.0} and balancer.history == [] and not balancer.active
    balancer.load_state_dict({"coefficients": {"table": 0.3, "gone": 0.1}})  # a modality no longer balanced
    assert balancer.coefficients == {"image": 1.0, "table": 0.3}


# --- encoders from the monitor -----------------------------------------------------------------------------------


def test_a_balancer_without_encoders_slows_the_encoders_its_monitor_names(tmp_path) -> None:
    monitor = ModalityContributionMonitor(MODALITIES, occlusion="zeros", encoders=ENCODERS)
    before, after = GradRecorder(), GradRecorder()
    balancer = ModalityBalancer(alpha=3.0, min_share=None, dropout=0.0)
    _fit(tmp_path, None, callbacks=[monitor, before, balancer, after], max_epochs=2)

    explicit = ModalityBalancer(ENCODERS)
    explicit.monitor = monitor
    assert balancer.state_key == explicit.state_key  # checkpoints of either spelling load into the other
    shares = monitor.history[0]["shares"]
    want = {m: _ogm(shares[m], [shares[o] for o in shares if o != m], alpha=3.0) for m in shares}
    assert min(want.values()) < 0.99  # far from 1 at rtol=1e-6: the comparisons below can fail
    for step_before, step_after in zip(before.steps[3:], after.steps[3:]):  # epoch 1: the coefficients of check 0
        torch.testing.assert_close(
            step_after["table_branch.weight"], step_before["table_branch.weight"] * want["table"], rtol=1e-6, atol=0.0
        )
        torch.testing.assert_close(
            step_after["image_branch.1.weight"],
            step_before["image_branch.1.weight"] * want["image"],
            rtol=1e-6,
            atol=0.0,
        )


def test_a_balancer_without_encoders_takes_the_ones_its_monitor_found_with_auto(tmp_path) -> None:
    monitor = ModalityContributionMonitor(MODALITIES, occlusion="zeros", encoders="auto")
    balancer = ModalityBalancer(alpha=3.0, min_share=None, dropout=0.0)
    _fit(tmp_path, balancer, monitor=monitor, max_epochs=2)
    assert (
        monitor.encoders == "auto"
        and balancer._encoders == monitor.found_encoders
        and set(balancer._encoders) == {"image", "table"}
    )
    assert [entry["active"] for entry in balancer.history] == [True, True] and min(balancer.coefficients.values()) < 1


def test_setup_fails_when_neither_the_balancer_nor_its_monitor_has_encoders(tmp_path) -> None:
    monitor = ModalityContributionMonitor(MODALITIES, occlusion="zeros")
    assert getattr(monitor, "encoders", None) is None
    with pytest.raises(ValueError, match=r"ModalityBalancer\(encoders=None\) takes its monitor's encoders, but the"):
        _fit(tmp_path, ModalityBalancer(), monitor=monitor, max_epochs=1)


# --- errors ------------------------------------------------------------------------------------------------------


def test_an_unknown_submodule_is_reported_with_the_model_top_level_submodules(tmp_path) -> None:
    balancer = ModalityBalancer({"image": "net.image_encoder", "table": "table_branch"})
    with pytest.raises(ValueError, match=r"no submodule 'net\.image_encoder'") as error:
        _fit(tmp_path, balancer, max_epochs=1)
    assert "['image_branch', 'table_branch', 'head']" in str(error.value)


def test_a_trainer_without_a_monitor_fails_at_setup(tmp_path) -> None:
    with pytest.raises(RuntimeError, match=r"trainer\.callbacks has none"):
        _fit(tmp_path, None, callbacks=[ModalityBalancer(ENCODERS)], max_epochs=1)
    monitors = [ModalityContributionMonitor(MODALITIES), ModalityContributionMonitor(MODALITIES, prefix="mc_b")]
    with pytest.raises(RuntimeError, match="pass the one to read as ModalityBalancer"):
        _fit(tmp_path, None, callbacks=[*monitors, ModalityBalancer(ENCODERS)], max_epochs=1)


def test_setup_refuses_unmeasured_modalities_shared_parameters_and_an_unreachable_release_share(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"names \['audio'\], which the monitor does not measure"):
        _fit(tmp_path, ModalityBalancer({"audio": "image_branch"}), max_epochs=1)
    with pytest.raises(ValueError, match=r"names \['head'\] for more than one modality"):  # at construction
        ModalityBalancer({"image": ["image_branch", "head"], "table": ["table_branch", "head"]})
    shared = ModalityBalancer({"image": ["image_branch"], "table": ["table_branch", "image_branch.1"]})
    with pytest.raises(ValueError, match="share parameters"):  # a module inside another modality's encoder
        _fit(tmp_path, shared, max_epochs=1)
    with pytest.raises(
        ValueError, match=r"release_share=0\.5 can never be reached: the lowest share of the monitor's 2"
    ):
        _fit(tmp_path, ModalityBalancer(ENCODERS, release_share=0.5), max_epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"encoders": {}}, TypeError, "non-empty mapping"),
        ({"encoders": {"image": []}}, ValueError, "submodule name or a non-empty list"),
        ({"alpha": 0.0}, ValueError, "alpha=0.0 must be a positive"),
        ({"min_share": 1.5}, ValueError, r"min_share=1\.5 must be None or a number in \(0, 1\)"),
        ({"release_share": 0.0}, ValueError, r"release_share=0\.0 must be None or a number in \(0, 1\)"),
        ({"min_share": 0.2, "release_share": 0.1}, ValueError, r"release_share=0\.1 must be >= min_share=0\.2"),
        ({"dropout": 2}, ValueError, r"dropout=2 must be a number in \[0, 1\]"),
        ({"warmup_epochs": -1}, ValueError, "warmup_epochs=-1 must be a non-negative int"),
        ({"warmup_epochs": True}, ValueError, "warmup_epochs=True must be a non-negative int"),
        ({"alpha": math.inf}, ValueError, "alpha=inf must be a positive, finite number"),
        ({"seed": 1.5}, ValueError, r"seed=1\.5 must be a non-negative int"),
        ({"seed": -1}, ValueError, "seed=-1 must be a non-negative int"),
        ({"monitor": "mc"}, TypeError, "must be a ModalityContributionMonitor"),
    ],
)
def test_invalid_arguments_are_refused_at_construction(kwargs, error, match) -> None:
    arguments: dict[str, Any] = {"encoders": ENCODERS, **kwargs}
    with pytest.raises(error, match=match):
        ModalityBalancer(**arguments)
