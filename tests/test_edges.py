"""No confident wrong number at the edges: each edge case gives the right number, is refused, or warns once naming
the argument and the fix (issue 37).
"""

from __future__ import annotations

import math
import random
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_mc import ContributionMeasurement, Modality, ModalityContributionMonitor
from lightning_mc.functional import modality_contribution

from helpers import LinearSum


def _caught(function) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        function()
    return [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------- two names for one batch item


@pytest.mark.parametrize("forward_fn", [None, lambda model, batch: model(batch["image"], batch["image"][:, :3])])
def test_two_names_for_one_batch_item_are_refused_before_any_batch(forward_fn) -> None:
    batch = {"image": torch.randn(4, 5), "table": torch.randn(4, 3)}
    with pytest.raises(ValueError, match=r"modalities names one batch item twice: 'image' and 'table' both have key="):
        modality_contribution(LinearSum(5, 3, 2), [batch], {"image": "image", "table": "image"}, forward_fn=forward_fn)
    with pytest.raises(ValueError, match=r"'a' and 'b' both have key=0"):
        ModalityContributionMonitor([Modality("a", key=0), Modality("b", key=0, occlusion="mean")])
    # an int index and a str key are different items; getter/setter pairs are not compared
    ModalityContributionMonitor({"a": 0, "b": "0"})
    ModalityContributionMonitor(
        [
            Modality("a", getter=lambda b: b[0][:, :2], setter=lambda b, v: b),
            Modality("b", getter=lambda b: b[0][:, 2:], setter=lambda b, v: b),
        ]
    )


# ---------------------------------------------------------------------------------- the model's floating dtype kept


class _Float64Logit(torch.nn.Module):
    """``[2 + 3e-6·a + 2e-6·b, 0]`` in float64: the occlusions move a probability by ~1e-6, near float32's step."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        logit = 2.0 + 3e-6 * a + 2e-6 * b
        return torch.cat([logit, torch.zeros_like(logit)], dim=1)


def _by_hand_share_a(a: torch.Tensor, b: torch.Tensor, transform) -> float:
    """Algorithm 1 in float64 with the zeros fill: Σ|p⁰ − p_a| / (Σ|p⁰ − p_a| + Σ|p⁰ − p_b|)."""
    model = _Float64Logit()
    clean = transform(model(a, b))
    moved_a = (clean - transform(model(torch.zeros_like(a), b))).abs().sum()
    moved_b = (clean - transform(model(a, torch.zeros_like(b)))).abs().sum()
    return float(moved_a / (moved_a + moved_b))


@pytest.mark.parametrize(
    ("output_transform", "transform"),
    [
        ("sigmoid", torch.sigmoid),
        ("softmax", lambda x: x.softmax(dim=-1)),
        ("log_softmax", lambda x: x.log_softmax(dim=-1)),
        (torch.sigmoid, torch.sigmoid),
        (None, lambda x: x),
    ],
    ids=["sigmoid", "softmax", "log_softmax", "callable", "none"],
)
@pytest.mark.parametrize("normalization", ["ratio_of_sums", "per_sample"])
def test_a_float64_model_keeps_float64_through_the_transform_the_differences_and_the_sums(
    output_transform, transform, normalization
) -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(32, 1, generator=generator, dtype=torch.float64) for _ in range(2))
    result = modality_contribution(
        _Float64Logit(), [{"a": a, "b": b}], {"a": "a", "b": "b"}, occlusion="zeros",
        output_transform=output_transform, normalization=normalization,
    )  # fmt: skip
    if normalization == "ratio_of_sums":
        expected = _by_hand_share_a(a, b, transform)
    else:  # the mean of each sample's share
        model = _Float64Logit()
        clean = transform(model(a, b))
        moved_a = (clean - transform(model(torch.zeros_like(a), b))).abs().sum(1)
        moved_b = (clean - transform(model(a, torch.zeros_like(b)))).abs().sum(1)
        expected = float((moved_a / (moved_a + moved_b)).mean())
    assert result.shares["a"] == pytest.approx(expected, rel=1e-9)
    # the same computation in float32 is off by far more than 1e-9: the test would catch a float32 step anywhere
    a32, b32 = a.float(), b.float()
    float32 = modality_contribution(
        _Float64Logit(), [{"a": a32, "b": b32}], {"a": "a", "b": "b"}, occlusion="zeros",
        output_transform=output_transform, normalization=normalization,
    )  # fmt: skip
    assert abs(float32.shares["a"] - expected) > 1e-4


@pytest.mark.parametrize("output_transform", ["sigmoid", "softmax", "log_softmax", "softmax:1", None])
def test_outputs_are_read_in_full_precision_half_precision_in_float32(output_transform) -> None:
    from lightning_mc.core.metric import absolute_differences
    from lightning_mc.core.outputs import OutputReader

    reader = OutputReader(output_key=None, output_transform=output_transform)
    float64 = reader.transform(torch.zeros(2, 3, dtype=torch.float64), rows=2)
    bf16 = reader.transform(torch.zeros(2, 3, dtype=torch.bfloat16), rows=2)
    assert float64.dtype == torch.float64
    assert bf16.dtype == (torch.bfloat16 if output_transform is None else torch.float32)  # None: the model's own
    assert absolute_differences(bf16, bf16.unsqueeze(1)).dtype == torch.float32
    assert absolute_differences(float64, float64.unsqueeze(1)).dtype == torch.float64


# ------------------------------------------------------------------------------------------ tolerance not reached


class _Sum1(torch.nn.Module):
    """``a + b`` (one output each): with the zeros fill sample ``n`` moves by ``|a_n|`` and ``|b_n|``."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


def _sum_batches(samples: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(samples, 1, generator=generator), 2 * torch.randn(samples, 1, generator=generator)
    return [{"a": a[start : start + 20], "b": b[start : start + 20]} for start in range(0, samples, 20)]


def _by_hand_half_width(batches: list[dict[str, torch.Tensor]]) -> float:
    """The delta-method 95% half-width of share a = Σ|a| / Σ(|a| + |b|), worked out in float64."""
    d = torch.cat([batch["a"] for batch in batches]).double().abs().flatten()
    t = d + torch.cat([batch["b"] for batch in batches]).double().abs().flatten()
    share = d.sum() / t.sum()
    residual = d - share * t
    return float(1.959963984540054 * (residual.var() / len(d)).sqrt() / t.mean())


def test_a_tolerance_not_reached_warns_once_with_the_half_width_and_the_samples_it_would_take() -> None:
    batches = _sum_batches(100, seed=0)
    half_width = _by_hand_half_width(batches)
    needed = math.ceil(100 * (half_width / 0.02) ** 2)
    measurement = ContributionMeasurement({"a": "a", "b": "b"}, occlusion="zeros", tolerance=0.02)
    results = []

    def measure() -> None:
        measurement.reset()
        for batch in batches:
            measurement.update(_Sum1(), batch)
        results.append(measurement.compute())

    first, second = _caught(measure), _caught(measure)  # two measurements with one object: one warning
    assert results[0].share_half_width["a"] == pytest.approx(half_width, rel=1e-6)  # float32 outputs
    assert [message for message in first if "was not reached" in message] == [
        f"tolerance=0.02 was not reached: the widest 95% half-width of the shares is {half_width:.3g} ('a') after "
        f"100 samples; about {needed} samples would reach it (a half-width shrinks as 1/√samples). Measure more "
        "samples (a larger limit_batches or a larger validation set), or pass a larger tolerance; "
        "result.share_half_width holds the half-widths."
    ]
    assert not [message for message in second if "was not reached" in message]
    # the estimate is right: that many samples of the same data reach about the tolerance
    assert _by_hand_half_width(_sum_batches(needed, seed=1)) == pytest.approx(0.02, rel=0.15)
    # reached: nothing said
    reached = _sum_batches(2 * needed, seed=2)
    run = lambda: modality_contribution(_Sum1(), reached, {"a": "a", "b": "b"}, occlusion="zeros", tolerance=0.02)  # noqa: E731
    assert not [message for message in _caught(run) if "was not reached" in message]


def test_a_tolerance_on_fewer_than_50_samples_says_none_was_computed() -> None:
    few = _sum_batches(40, seed=0)
    run = lambda: modality_contribution(_Sum1(), few, {"a": "a", "b": "b"}, occlusion="zeros", tolerance=0.3)  # noqa: E731
    assert [message for message in _caught(run) if "was not reached" in message] == [
        "tolerance=0.3 was not reached: fewer than 50 samples were measured (40), too few for a half-width; at least "
        "50 samples are needed before one is computed. Measure more samples (a larger limit_batches or a larger "
        "validation set), or pass a larger tolerance; result.share_half_width holds the half-widths."
    ]


# ------------------------------------------------------------------------------ NaN in an input, the "mean" fill


class _Imputes(torch.nn.Module):
    """``Σ_j w_j · nan_to_num(a)_j + Σ_j b_j``: missing table values (NaN) are read as 0."""

    weights = (1.0, -2.0, 0.5, 3.0)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (torch.nan_to_num(a) * torch.tensor(self.weights)).sum(1, keepdim=True) + b.sum(1, keepdim=True)


def test_the_mean_fill_skips_nan_entries_as_a_nan_aware_mean() -> None:
    a = torch.tensor([[1.0, float("nan"), 3.0, -1.0], [2.0, 2.0, float("nan"), float("nan")], [0.5, 1.5, -2.0, 4.0]])
    b = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 1.0]])
    result = modality_contribution(_Imputes(), [{"a": a, "b": b}], {"a": "a", "b": "b"}, occlusion="mean")
    # by hand: each sample's fill is the mean of its non-NaN entries
    moved_a, moved_b = [], []
    for row_a, row_b in zip(a.tolist(), b.tolist()):
        present = [x for x in row_a if x == x]
        fill_a, fill_b = sum(present) / len(present), sum(row_b) / len(row_b)
        clean = sum(w * (x if x == x else 0.0) for w, x in zip(_Imputes.weights, row_a)) + sum(row_b)
        moved_a.append(abs(clean - (sum(w * fill_a for w in _Imputes.weights) + sum(row_b))))
        read_a = sum(w * (x if x == x else 0.0) for w, x in zip(_Imputes.weights, row_a))
        moved_b.append(abs(clean - (read_a + 2 * fill_b)))
    assert result.raw["a"] == pytest.approx(sum(moved_a) / 3, rel=1e-6)
    assert result.raw["b"] == pytest.approx(sum(moved_b) / 3, rel=1e-6)
    assert result.shares["a"] == pytest.approx(sum(moved_a) / (sum(moved_a) + sum(moved_b)), rel=1e-6)
    assert result.num_skipped == 0


# -------------------------------------------------------------------------- reused outputs on the model's scale


class _Returns(L.LightningModule):
    """``A·a + B·b`` (3 logits, fixed weights); ``validation_step`` returns the logits or their softmax."""

    def __init__(self, returns: str) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(4, 3, generator=generator))
        self.b = torch.nn.Parameter(0.5 * torch.randn(2, 3, generator=generator))
        self.returns = returns

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ self.a + b @ self.b

    def training_step(self, batch, batch_idx):
        return self(batch[0], batch[1]).sum() * 0.0

    def validation_step(self, batch, batch_idx):
        logits = self(batch[0], batch[1])
        return logits if self.returns == "logits" else logits.softmax(dim=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _returns_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    return DataLoader(
        TensorDataset(torch.randn(24, 4, generator=generator), torch.randn(24, 2, generator=generator)), 8
    )


def _fit_reusing(model: L.LightningModule, tmp_path) -> ModalityContributionMonitor:
    monitor = ModalityContributionMonitor(
        {"a": 0, "b": 1}, occlusion="zeros", output_transform="softmax", reuse_outputs=True
    )
    trainer = L.Trainer(
        max_epochs=1, callbacks=[monitor], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, _returns_loader(), _returns_loader())
    return monitor


def test_reused_outputs_that_are_probabilities_are_refused_and_logits_give_the_hand_computed_shares(tmp_path) -> None:
    with pytest.raises(ValueError) as refused:
        _fit_reusing(_Returns("probabilities"), tmp_path)
    assert str(refused.value) == (
        "reuse_outputs=True: validation_step returns the model's outputs after output_transform='softmax' (they equal "
        "the transformed output of the model's own forward call on this batch), and the measurement applies the "
        "transform to the clean outputs again while the occluded copies get it once. Return the model's prediction "
        "before the transform from validation_step (e.g. the logits, with the probabilities computed from them "
        "elsewhere), or set reuse_outputs=False."
    )
    monitor = _fit_reusing(_Returns("logits"), tmp_path)
    # by hand: Algorithm 1 on the softmax of A·a + B·b, zeros fill
    model = _Returns("logits")
    a, b = (torch.cat(parts) for parts in zip(*_returns_loader()))
    with torch.no_grad():
        clean = model(a, b).softmax(1)
        moved_a = (clean - model(torch.zeros_like(a), b).softmax(1)).abs().sum()
        moved_b = (clean - model(a, torch.zeros_like(b)).softmax(1)).abs().sum()
    assert monitor.latest.shares["a"] == pytest.approx(float(moved_a / (moved_a + moved_b)), rel=1e-5)


def test_reused_logits_of_another_computation_are_refused_naming_the_gap(tmp_path) -> None:
    class Shifted(_Returns):
        def validation_step(self, batch, batch_idx):
            return super().validation_step(batch, batch_idx) * 2.0

    with pytest.raises(ValueError, match=r"reuse_outputs=True: the prediction validation_step returns differs from the "
                       r"model's own output on this batch \(forward_fn and output_key, before "
                       r"output_transform='softmax'\) by 1 \(relative\)"):  # fmt: skip
        _fit_reusing(Shifted("logits"), tmp_path)


# ------------------------------------------------------------------- NaN shares: NaN outputs or nothing moved


class _NanWhenEvaluated(_Returns):
    """Trains as ``_Returns`` and gives NaN outputs in eval mode (a model that diverged, seen by validation)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = super().forward(a, b)
        return out if self.training else out * float("nan")


class _Silent(_Returns):
    """Outputs that ignore both inputs: no occlusion moves them."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 0.0 * super().forward(a, b) + 1.0


@pytest.mark.parametrize(
    ("model", "cause"),
    [
        (_NanWhenEvaluated, "the model gave NaN or inf outputs on every sample, so none was measured"),
        (_Silent, "no occlusion moved any output"),
    ],
    ids=["nan_outputs", "nothing_moved"],
)
def test_a_nan_share_says_whether_the_outputs_were_nan_or_nothing_moved(model, cause, tmp_path) -> None:
    from lightning_mc import CollapseEarlyStopping, ModalityBalancer

    monitor = ModalityContributionMonitor({"a": 0, "b": 1}, occlusion="zeros")
    stopper = CollapseEarlyStopping(min_share=0.1, patience=2)
    trainer = L.Trainer(
        max_epochs=1, callbacks=[monitor, stopper], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
        default_root_dir=tmp_path,
    )  # fmt: skip
    messages = _caught(lambda: trainer.fit(model("logits"), _returns_loader(), _returns_loader()))
    assert monitor.history[0]["num_samples"] == (0 if model is _NanWhenEvaluated else 24)
    assert (
        f"CollapseEarlyStopping: mc/share/a, mc/share/b NaN at epoch 0 ({cause}); this check neither counts towards "
        "patience=2 nor resets the counts (a: 0, b: 0)."
    ) in messages
    balancer = ModalityBalancer({"a": "a", "b": "b"}, min_share=None, dropout=0.0)
    balanced = _caught(lambda: balancer._update(monitor.history[0]))  # what the balancer reads of a check
    assert balanced == [
        f"ModalityBalancer: a mc/share is NaN at epoch 0 ({cause}); the balancer stays released and the coefficients "
        "stay as they are ({'a': 1.0, 'b': 1.0})."
    ]


# --------------------------------------------------------------------------------- a tuple output and output_key


class _TupleOut(torch.nn.Module):
    """Returns ``(logits, features)``, as a Hugging Face model with ``return_dict=False`` does."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.cat([a.sum(1, keepdim=True), 2.0 * b.sum(1, keepdim=True)], dim=1)
        return logits, torch.ones(a.shape[0], 5)


def test_a_tuple_output_is_read_by_index_and_its_messages_say_so() -> None:
    generator = torch.Generator().manual_seed(0)
    batch = {"a": torch.randn(8, 3, generator=generator), "b": torch.randn(8, 2, generator=generator)}
    modalities = {"a": "a", "b": "b"}
    with pytest.raises(TypeError) as no_key:
        modality_contribution(_TupleOut(), [batch], modalities)
    assert str(no_key.value) == (
        "The model returned a tuple of 2 items, not a tensor. Name the prediction tensor by its index with output_key "
        "(e.g. output_key=0 for the first item) or pass a forward_fn that returns it."
    )
    with pytest.raises(KeyError) as named:
        modality_contribution(_TupleOut(), [batch], modalities, output_key="logits")
    assert named.value.args[0] == (
        "output_key='logits' names a key, but the model's output is a tuple of 2 items, which has none. Pass the "
        "prediction's index instead, e.g. output_key=0 for the first item."
    )
    with pytest.raises(KeyError, match=r"output_key=2 is out of range: .* tuple of 2 items\. .* 0 to 1\."):
        modality_contribution(_TupleOut(), [batch], modalities, output_key=2)
    # output_key=0 (and -2) reads the logits: zeros fill, by hand raw_a = mean |Σa|, raw_b = mean |2 Σb|
    for key in (0, -2):
        result = modality_contribution(_TupleOut(), [batch], modalities, output_key=key, occlusion="zeros")
        assert result.raw["a"] == pytest.approx(float(batch["a"].sum(1).abs().mean()), rel=1e-6)
        assert result.raw["b"] == pytest.approx(float((2.0 * batch["b"].sum(1)).abs().mean()), rel=1e-6)


# --------------------------------------------------------------------- per-token outputs over dynamic padding


class _TokenTagger(torch.nn.Module):
    """Per-token logits ``(N, L, 2)``: an embedding of each id plus the table, as a token-classification head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 2)
        self.table = torch.nn.Linear(3, 2)

    def forward(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) + self.table(table)[:, None, :]


def _token_batch(length: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(1, 10, (4, length), generator=generator)
    if pad_to is not None:
        ids = torch.nn.functional.pad(ids, (0, pad_to - length), value=0)
    return {"ids": ids, "table": torch.randn(4, 3, generator=generator)}


def test_dynamically_padded_per_token_outputs_are_told_to_pad_to_a_fixed_length() -> None:
    from lightning_mc.masks import Tokens

    modalities = [Modality("ids", key="ids", occlusion=0, attributes=Tokens(max_length=8, pad_id=0)), Modality(
        "table", key="table", occlusion="zeros")]  # fmt: skip
    options = {"output_transform": "softmax:-1"}
    with pytest.raises(ValueError) as refused:
        modality_contribution(_TokenTagger(), [_token_batch(5), _token_batch(7)], modalities, **options)
    tokens = tuple(f"t{p}" for p in range(8))
    assert str(refused.value) == (
        f"This batch has attributes {{'ids': {tokens}, 'table': ('all',)}} and 14 outputs on cpu; the earlier batches "
        f"of this measurement had {{'ids': {tokens}, 'table': ('all',)}} and 10 on cpu. Every batch of one "
        "measurement needs the same attributes and outputs, and their number follows the input's shape, which "
        "changed. For sequences padded per batch (dynamic padding), pad every batch to one fixed length (a "
        "tokenizer's padding='max_length' with max_length=..., or a collate_fn that pads to it), or give per-token "
        "attributes a fixed count (Tokens(max_length=...), Words(max_words=...)). Between measurements of different "
        "data, call reset()."
    )
    # the fix: both batches padded to 8 measure together; the pad positions are never occluded (exactly 0)
    padded = [_token_batch(5, pad_to=8), _token_batch(7, pad_to=8)]
    result = modality_contribution(_TokenTagger(), padded, modalities, **options)
    assert result.attribute_raw["ids"]["t7"] == 0.0 and result.attribute_raw["ids"]["t0"] > 0.0


# ---------------------------------------------------------------------- the encoder check keeps watching


class _FiLMImage(torch.nn.Module):
    """An image encoder with a FiLM term: its output is scaled by ``1 + flag``, a table column the model hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.flag = torch.zeros(1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.linear(image) * (1.0 + self.flag)


class _Gated(L.LightningModule):
    """Late fusion whose image encoder reads the table's first column (a flag) through its FiLM term."""

    def __init__(self, reads_flag: bool = True) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.image_encoder, self.table_encoder = _FiLMImage(), torch.nn.Linear(2, 3)
        self.head = torch.nn.Linear(6, 2)
        for parameter in self.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator)
        self.reads_flag = reads_flag

    def forward(self, image: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        self.image_encoder.flag = table[:, :1] if self.reads_flag else torch.zeros(1, 1)
        return self.head(torch.cat([self.image_encoder(image), self.table_encoder(table)], dim=1))

    def training_step(self, batch, batch_idx):
        return self(batch[0], batch[1]).sum() * 0.0

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _flag_loader() -> DataLoader:
    """24 samples in batches of 8; the table flag (column 0) is 0 in the first batch and 1 after it."""
    generator = torch.Generator().manual_seed(2)
    image, table = torch.randn(24, 4, generator=generator), torch.randn(24, 2, generator=generator)
    table[:, 0] = (torch.arange(24) >= 8).float()
    return DataLoader(TensorDataset(image, table), batch_size=8)


GATED_ENCODERS = {"image": "image_encoder", "table": "table_encoder"}


def test_an_encoder_reading_a_flag_that_turns_on_after_the_first_batch_is_caught_within_3_measurements(tmp_path):
    monitor = ModalityContributionMonitor({"image": 0, "table": 1}, occlusion="zeros", encoders=GATED_ENCODERS)
    trainer = L.Trainer(
        max_epochs=3, callbacks=[monitor], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(ValueError) as caught:
        trainer.fit(_Gated(), _flag_loader(), _flag_loader())
    assert len(monitor.history) < 3  # within 3 measurements (here the first: its second batch)
    message = str(caught.value)
    assert message.startswith(
        "encoders: 'image_encoder' (given for modality 'image') is not an encoder of 'image' alone: with 'table' "
        "occluded its output differs from its replayed output by "
    )
    spot = "(the spot check of batch 1 of this measurement; the first batch's full check passed), so it also "
    assert spot in message
    # what it protects: the plain path's shares, by hand (zeros fill: occluding the table also zeroes the flag)
    model = _Gated()
    image, table = (torch.cat(parts) for parts in zip(*_flag_loader()))
    with torch.no_grad():
        clean = model(image, table)
        moved_image = (clean - model(torch.zeros_like(image), table)).abs().sum()
        moved_table = (clean - model(image, torch.zeros_like(table))).abs().sum()
    plain = modality_contribution(_Gated(), _flag_loader(), {"image": 0, "table": 1}, occlusion="zeros")
    assert plain.shares["table"] == pytest.approx(float(moved_table / (moved_image + moved_table)), rel=1e-5)


def test_a_late_fusion_model_passes_a_spot_check_in_every_measurement(tmp_path) -> None:
    monitor = ModalityContributionMonitor({"image": 0, "table": 1}, occlusion="zeros", encoders=GATED_ENCODERS)
    trainer = L.Trainer(
        max_epochs=3, callbacks=[monitor], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(_Gated(reads_flag=False), _flag_loader(), _flag_loader())
    assert monitor.engine.cache is not None and monitor.engine.cache.spot.runs == 3
    plain = modality_contribution(_Gated(reads_flag=False), _flag_loader(), {"image": 0, "table": 1}, occlusion="zeros")
    assert monitor.latest.shares["table"] == pytest.approx(plain.shares["table"], rel=1e-5)


# ------------------------------------------------------------- resume with dropout and a shuffled training loader


class _KeepRandomState(L.Callback):
    """The recipe of docs/how-to/ddp-mixed-precision.md: the global random states kept in checkpoints."""

    def state_dict(self):
        return {"torch": torch.get_rng_state(), "python": random.getstate()}

    def load_state_dict(self, state_dict):
        torch.set_rng_state(state_dict["torch"])
        random.setstate(state_dict["python"])


class _Dropping(_Gated):
    """``_Gated`` (no flag read) with dropout on the table branch, trained (lr > 0)."""

    def __init__(self) -> None:
        super().__init__(reads_flag=False)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, image: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.image_encoder(image), self.drop(self.table_encoder(table))], dim=1)
        return self.head(features)

    def training_step(self, batch, batch_idx):
        return self(batch[0], batch[1]).logsumexp(1).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_dropping(root, epochs: int, keep: bool, ckpt_path=None) -> list:
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    monitor = ModalityContributionMonitor({"image": 0, "table": 1}, occlusion="zeros")
    callbacks = [monitor, ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)]
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=callbacks + ([_KeepRandomState()] if keep else []), logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
        default_root_dir=root,
    )  # fmt: skip
    train = DataLoader(_flag_loader().dataset, batch_size=8, shuffle=True)
    trainer.fit(_Dropping(), train, _flag_loader(), ckpt_path=ckpt_path)
    return monitor.history


@pytest.mark.parametrize("keep", [False, True], ids=["lightning_alone", "random_state_kept"])
def test_a_resumed_fit_with_dropout_and_shuffling_matches_once_the_random_state_is_kept(keep, tmp_path) -> None:
    straight = _fit_dropping(tmp_path / "straight", 3, keep)
    _fit_dropping(tmp_path / "split", 2, keep)
    resumed = _fit_dropping(tmp_path / "split", 3, keep, ckpt_path=tmp_path / "split" / "ckpt" / "last.ckpt")
    gap = abs(resumed[-1]["shares"]["image"] - straight[2]["shares"]["image"])
    if keep:  # bit for bit: the same masks, the same order, the same weights
        assert resumed[-1]["shares"] == straight[2]["shares"]
    else:  # Lightning's checkpoint lacks the global random state: other masks and order (not the monitor's doing)
        assert gap > 1e-4
