"""Every kind of bad input gets an error naming the argument, the value and what is valid, or a documented warning.

The messages asserted here are the ones listed in the README's "Reliability" section.
"""

import math
import re

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from lightning_mc import Modality, ModalityContributionMonitor
from lightning_mc.functional import modality_contribution

from helpers import LinearSum, PlantedModule, TwoModalityNet, loader, trainer_kwargs, two_modality_dataset


class Sum(LinearSum):
    """Two outputs: a linear read of ``a`` and of ``b``."""

    def __init__(self) -> None:
        super().__init__(4, 3, 2)


def _dict_batches(n: int = 6) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"a": torch.randn(n, 4, generator=generator), "b": torch.randn(n, 3, generator=generator)}]


def _tuple_batches(n: int = 6) -> list[tuple[Tensor, ...]]:
    return [(batch["a"], batch["b"], torch.zeros(n)) for batch in _dict_batches(n)]


def test_an_unknown_dict_key_names_the_modality_the_key_and_the_batch_keys() -> None:
    with pytest.raises(
        KeyError, match=re.escape("Modality 'b': key 'B' is not in the batch; the batch has keys ['a', 'b']")
    ):
        modality_contribution(Sum(), _dict_batches(), {"a": "a", "b": "B"})


def test_an_index_out_of_range_names_the_modality_the_index_and_the_valid_range() -> None:
    with pytest.raises(
        IndexError, match=re.escape("Modality 'b': index 5 is out of range for a batch of 3 items (valid: 0..2)")
    ):
        modality_contribution(Sum(), _tuple_batches(), {"a": 0, "b": 5})


def test_duplicate_names_and_fewer_than_two_modalities_fail_at_construction() -> None:
    with pytest.raises(ValueError, match=re.escape("modalities has duplicate names ['a']")):
        ModalityContributionMonitor([Modality("a", key=0), Modality("a", key=1)])
    with pytest.raises(ValueError, match=re.escape("modalities needs at least 2 modalities to compare, got 1: ['a']")):
        ModalityContributionMonitor({"a": 0})
    with pytest.raises(TypeError, match=re.escape("modalities['b']=2.5 (float) must be a dict key (str)")):
        ModalityContributionMonitor({"a": 0, "b": 2.5})


def test_a_modality_that_is_not_a_tensor_is_named_with_its_type() -> None:
    batches = [{"a": torch.randn(6, 4), "b": [[0.0] * 3] * 6}]
    with pytest.raises(TypeError, match=re.escape("Modality 'b' is a list in the batch, expected a torch.Tensor")):
        modality_contribution(Sum(), batches, {"a": "a", "b": "b"})


@pytest.mark.parametrize("wrap", [lambda out: {"logits": out}, lambda out: (out, out)], ids=["dict", "tuple"])
def test_a_model_output_that_is_not_a_tensor_asks_for_forward_fn(wrap) -> None:
    class Wrapped(Sum):
        def forward(self, a: Tensor, b: Tensor):
            return wrap(super().forward(a, b))

    with pytest.raises(
        TypeError, match=r"The model returned a (dict|tuple of 2 items), not a tensor\. Name the prediction tensor"
    ):
        modality_contribution(Wrapped(), _dict_batches(), {"a": "a", "b": "b"})
    selected = modality_contribution(
        Wrapped(),
        _dict_batches(),
        {"a": "a", "b": "b"},
        forward_fn=lambda m, batch: Sum.forward(m, batch["a"], batch["b"]),
    )
    assert sum(selected.shares.values()) == pytest.approx(1.0)


def test_an_output_shape_that_changes_under_occlusion_is_an_error() -> None:
    def forward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        out = model(batch["a"], batch["b"])
        return out if (batch["b"] != 0).any() else torch.cat([out, out], dim=1)  # wider when b is zeroed

    expected = (
        "The model returned [2, 4] outputs per sample in different passes: 2 in the call holding the clean batch "
        "but 4 in the call holding 'b' occluded."
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        modality_contribution(
            Sum(), _dict_batches(), {"a": "a", "b": "b"}, forward_fn=forward, occlusion="zeros", max_batch_size=6
        )


def test_nan_and_inf_outputs_skip_those_samples_with_a_warning_and_count_them() -> None:
    batch = _dict_batches(8)[0]

    def forward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        out = model(batch["a"], batch["b"])
        poisoned = batch["a"][:, 0] > 1e3  # samples whose first feature was set huge below
        return torch.where(poisoned.unsqueeze(1), torch.tensor([math.nan, math.inf]), out)

    poisoned = {"a": batch["a"].clone(), "b": batch["b"]}
    poisoned["a"][[1, 5], 0] = 1e4
    modalities, model = {"a": "a", "b": "b"}, Sum()
    with pytest.warns(UserWarning, match=re.escape("skipped 2 sample(s) whose model outputs were NaN or inf")):
        result = modality_contribution(model, [poisoned], modalities, forward_fn=forward, occlusion="zeros")
    keep = [0, 2, 3, 4, 6, 7]
    finite_only = modality_contribution(
        model, [{"a": batch["a"][keep], "b": batch["b"][keep]}], modalities, forward_fn=forward, occlusion="zeros"
    )
    assert result.num_skipped == 2
    assert result.num_samples == 6
    assert result.shares == pytest.approx(finite_only.shares, abs=1e-6)


class TwoLoaderNet(TwoModalityNet):
    """Validation with several dataloaders needs ``dataloader_idx`` in ``validation_step``."""

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().validation_step(batch, batch_idx)


class Constant(PlantedModule):
    """Ignores its inputs: no occlusion moves its outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TwoModalityNet()

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return 0.0 * self.net(image, table) + 1.0


def test_when_nothing_moves_shares_are_nan_with_a_warning_and_the_raw_values_are_logged(tmp_path) -> None:
    monitor = ModalityContributionMonitor({"image": 0, "table": 1})
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.warns(UserWarning, match="shares are undefined"):
        trainer.fit(Constant(), loader(two_modality_dataset(16)), loader(two_modality_dataset(16, seed=1)))
    metrics = trainer.callback_metrics
    assert math.isnan(metrics["mc/share/image"].item())
    assert math.isnan(metrics["mc/share/table"].item())
    assert math.isnan(metrics["mc/balance"].item())
    assert metrics["mc/raw/image"].item() == 0.0
    assert metrics["mc/raw/table"].item() == 0.0


def test_fills_that_cannot_fill_integer_token_ids_are_refused() -> None:
    tokens = [(torch.randn(4, 4), torch.randint(0, 9, (4, 3)))]

    def forward(model: nn.Module, batch) -> Tensor:
        return model(batch[0], batch[1].float())

    with pytest.raises(
        TypeError, match=re.escape("Modality 'b': occlusion=0.5 is a float but the modality has dtype torch.int64")
    ):
        modality_contribution(
            Sum(), tokens, [Modality("a", key=0), Modality("b", key=1, occlusion=0.5)], forward_fn=forward
        )
    with pytest.raises(TypeError, match=re.escape("Modality 'b': occlusion='mean' cannot fill a torch.int64 tensor")):
        modality_contribution(Sum(), tokens, {"a": 0, "b": 1}, forward_fn=forward, occlusion="mean")
    pad_id = modality_contribution(Sum(), tokens, {"a": 0, "b": 1}, forward_fn=forward, occlusion=0)
    assert sum(pad_id.shares.values()) == pytest.approx(1.0)


def test_a_fill_callable_returning_the_wrong_shape_or_dtype_is_refused() -> None:
    def first_row(value: Tensor) -> Tensor:
        return value[:1, :2]

    def as_double(value: Tensor) -> Tensor:
        return value.double()

    modalities = {"a": "a", "b": "b"}
    with pytest.raises(
        ValueError,
        match=re.escape("Modality 'a': occlusion=first_row returned shape (1, 2) for a modality of shape (6, 4)"),
    ):
        modality_contribution(Sum(), _dict_batches(), modalities, occlusion=first_row)
    with pytest.raises(
        TypeError,
        match=re.escape(
            "Modality 'a': occlusion=as_double returned dtype torch.float64 for a modality of dtype torch.float32"
        ),
    ):
        modality_contribution(Sum(), _dict_batches(), modalities, occlusion=as_double)


@pytest.mark.parametrize(("transform", "always"), [("softmax", 1), ("log_softmax", 0), ("softmax:1", 1)])
def test_softmax_on_a_single_output_model_is_refused_pointing_to_sigmoid(transform: str, always: int) -> None:
    class OneLogit(Sum):
        def forward(self, a: Tensor, b: Tensor) -> Tensor:
            return super().forward(a, b)[:, :1]

    with pytest.raises(ValueError) as refused:  # 6 samples and their 2 occluded copies: one call of 18 rows
        modality_contribution(OneLogit(), _dict_batches(), {"a": "a", "b": "b"}, output_transform=transform)
    assert str(refused.value).startswith(
        f"output_transform={transform!r} on outputs of shape (18, 1): one class, and the {transform.split(':')[0]} of "
        f"one logit is always {always}, so no occlusion could move it (every share would be NaN). Use "
        "output_transform='sigmoid' for a binary model with a single logit"
    )


def test_a_forward_fn_failing_on_an_occluded_batch_names_the_modality_and_the_functional_reproduction() -> None:
    def forward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        if (batch["b"] == 0).all(dim=1).any():
            raise ValueError("b must not be all zeros")
        return model(batch["a"], batch["b"])

    modalities = {"a": "a", "b": "b"}
    with pytest.raises(RuntimeError) as one_copy_per_call:
        modality_contribution(
            Sum(), _dict_batches(), modalities, forward_fn=forward, occlusion="zeros", max_batch_size=6
        )
    message = str(one_copy_per_call.value)
    assert "raised ValueError while occluding modality 'b' (one call of 6 stacked rows: 'b' occluded)" in message
    assert "b must not be all zeros" in message
    assert "lightning_mc.functional.modality_contribution(model, [batch], modalities, forward_fn=forward_fn" in message
    assert "max_batch_size=6" in message
    assert isinstance(one_copy_per_call.value.__cause__, ValueError)
    # one call holding the clean batch and both occluded copies names every modality occluded in it
    with pytest.raises(
        RuntimeError,
        match=re.escape("'a', 'b' (one call of 18 stacked rows: the clean batch, 'a' occluded, 'b' occluded)"),
    ):
        modality_contribution(Sum(), _dict_batches(), modalities, forward_fn=forward, occlusion="zeros")


def test_a_failure_inside_the_monitor_leaves_no_half_written_state(tmp_path) -> None:
    def forward(pl_module: L.LightningModule, batch) -> Tensor:
        image, table, _ = batch
        if pl_module.current_epoch == 1 and (table == 0).all(dim=1).any():
            raise ValueError("the table branch cannot take an all-zero row")
        return pl_module(image, table)

    monitor = ModalityContributionMonitor(
        {"image": 0, "table": 1}, forward_fn=forward, occlusion="zeros", max_batch_size=16
    )
    model = TwoModalityNet()
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_epochs=3))
    with pytest.raises(RuntimeError, match="raised ValueError while occluding modality 'table'"):
        trainer.fit(model, loader(two_modality_dataset(32)), loader(two_modality_dataset(32, seed=1)))
    assert [entry["epoch"] for entry in monitor.history] == [0]  # epoch 1's partial sums never became an entry
    assert monitor.measurement.num_updates == 0
    assert not monitor.schedule.measuring
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    # the functional reproduction the message points to fails the same way on the same batch
    with pytest.raises(RuntimeError, match="while occluding modality 'table'"):
        modality_contribution(
            model,
            [next(iter(loader(two_modality_dataset(32, seed=1))))],
            {"image": 0, "table": 1},
            forward_fn=lambda m, b: forward(m, b),
            occlusion="zeros",
            max_batch_size=16,
        )


def test_a_dataloader_idx_beyond_the_trainer_loaders_names_the_valid_range(tmp_path) -> None:
    monitor = ModalityContributionMonitor({"image": 0, "table": 1}, dataloader_idx=2)
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_epochs=1))
    val = [loader(two_modality_dataset(16, seed=1)), loader(two_modality_dataset(16, seed=2))]
    with pytest.raises(
        ValueError, match=re.escape("dataloader_idx=2 but the trainer has 2 validation dataloader(s); valid: 0..1")
    ):
        trainer.fit(TwoLoaderNet(), loader(two_modality_dataset(16)), val)
