"""Right or refused: dense outputs, one-sample batches, fills equal to the data, saturated classifiers, dict batches,
wrong keys under the sanity check and resumed random fills each give the right number or say why they cannot.

Every model is built from a config (MONAI's BasicUNet, Hugging Face BERT): nothing is downloaded.
"""

from __future__ import annotations

import re
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from monai.networks.nets import BasicUNet
from torch import Tensor, nn
from transformers import BertForTokenClassification, BertModel

from lightning_mc import ModalityContributionMonitor
from lightning_mc.core.forward import UnmappableBatch
from lightning_mc.functional import modality_contribution

from helpers import (
    MODALITIES,
    LinearSum,
    TwoModalityNet,
    loader,
    tiny_bert_config,
    trainer_kwargs,
    two_modality_dataset,
)


def hand_raw(model: nn.Module, batch: dict[str, Tensor], keys: list[str], transform, fill=torch.zeros_like):
    """``raw_i``: the mean over samples of ``Σ |T(f(x)) − T(f(x with modality i filled))|``, computed directly."""
    with torch.no_grad():
        clean = transform(model(**batch)).flatten(1)
        raw = {}
        for key in keys:
            occluded = transform(model(**{**batch, key: fill(batch[key])})).flatten(1)
            raw[key] = float((clean - occluded).abs().sum(dim=1).mean())
    return raw


def _caught(function) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        function()
    return [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------------ dense outputs


class TwoImageSegmenter(nn.Module):
    """MONAI's BasicUNet on a CT and a PET slice stacked as channels: logits ``(N, 3, 32, 32)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.unet = BasicUNet(spatial_dims=2, in_channels=2, out_channels=3, features=(4, 4, 8, 8, 16, 4))

    def forward(self, ct: Tensor, pet: Tensor) -> Tensor:
        return self.unet(torch.cat([ct, pet], dim=1))


def _slices() -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "ct": torch.randn(3, 1, 32, 32, generator=generator),
        "pet": 2 * torch.randn(3, 1, 32, 32, generator=generator),
    }


def test_segmentation_logits_take_the_per_voxel_softmax_over_the_channel_dim() -> None:
    model, batch = TwoImageSegmenter().eval(), _slices()
    result = modality_contribution(
        model, [batch], {"ct": "ct", "pet": "pet"}, occlusion="zeros", output_transform="softmax:1"
    )
    expected = hand_raw(model, batch, ["ct", "pet"], lambda logits: logits.softmax(dim=1))
    assert result.raw == pytest.approx(expected, rel=1e-4)
    total = sum(expected.values())
    assert result.shares == pytest.approx({k: v / total for k, v in expected.items()}, rel=1e-4)
    # the old path (flatten, then one softmax over every voxel and class) gives other numbers: the test can fail
    flat = hand_raw(model, batch, ["ct", "pet"], lambda logits: logits.flatten(1).softmax(dim=1))
    assert result.raw["ct"] != pytest.approx(flat["ct"], rel=0.05)


def test_a_bare_softmax_on_segmentation_logits_is_refused_naming_the_shape_and_both_answers() -> None:
    with pytest.raises(ValueError, match=r"shape \(9, 3, 32, 32\).*'softmax:1'.*MONAI.*'softmax:-1'.*Hugging Face"):
        modality_contribution(
            TwoImageSegmenter().eval(),
            [_slices()],
            {"ct": "ct", "pet": "pet"},
            occlusion="zeros",
            output_transform="softmax",
        )


def test_a_callable_transform_sees_the_model_shaped_output_and_its_result_is_measured() -> None:
    shapes = []

    def background_probability(logits: Tensor) -> Tensor:
        shapes.append(tuple(logits.shape))
        return logits.softmax(dim=1)[:, 0]

    model, batch = TwoImageSegmenter().eval(), _slices()
    result = modality_contribution(
        model, [batch], {"ct": "ct", "pet": "pet"}, occlusion="zeros", output_transform=background_probability
    )
    assert shapes and all(len(shape) == 4 and shape[1:] == (3, 32, 32) for shape in shapes)
    expected = hand_raw(model, batch, ["ct", "pet"], lambda logits: logits.softmax(dim=1)[:, 0])
    assert result.raw == pytest.approx(expected, rel=1e-4)


def _tokenized(seed: int = 0) -> dict[str, Tensor]:
    """A tokenizer's dict, in a tokenizer's key order: ``input_ids, token_type_ids, attention_mask`` (and labels)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 40, (4, 8), generator=generator)
    token_type_ids = torch.zeros(4, 8, dtype=torch.long)
    token_type_ids[:, 4:] = 1
    attention_mask = torch.ones(4, 8, dtype=torch.long)
    attention_mask[:2, 6:] = 0
    labels = torch.randint(0, 3, (4, 8), generator=generator)
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
        "labels": labels,
    }


def test_token_logits_take_the_softmax_over_the_class_last_dim() -> None:
    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_bert_config(num_labels=3)).eval()
    batch = _tokenized()
    modalities = {"input_ids": "input_ids", "token_type_ids": "token_type_ids"}
    options = dict(occlusion=0, output_key="logits")
    named = modality_contribution(model, [batch], modalities, output_transform="softmax:-1", **options)
    called = modality_contribution(model, [batch], modalities, output_transform=lambda o: o.softmax(dim=-1), **options)
    assert named.raw == pytest.approx(called.raw, rel=1e-5)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    expected = hand_raw(lambda **b: model(**b).logits, inputs, list(modalities), lambda o: o.softmax(dim=-1))
    assert named.raw == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------------ occlusions that change nothing


def _batch(n: int, seed: int, b: Tensor | None = None) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 4, generator=generator)
    return {"a": a, "b": torch.randn(n, 3, generator=generator) if b is None else b}


def test_permute_on_one_sample_batches_gives_exactly_0_and_warns_once_naming_the_modality() -> None:
    torch.manual_seed(0)
    model = LinearSum(4, 3, 2)
    batches = [_batch(1, seed) for seed in range(4)]
    results = []

    def measure_twice() -> None:
        for _ in range(2):
            results.append(modality_contribution(model, batches, {"a": "a", "b": "b"}, occlusion="permute"))

    messages = [m for m in _caught(measure_twice) if "changed no input" in m]
    assert all(result.raw == {"a": 0.0, "b": 0.0} for result in results)  # exactly 0, by construction
    assert len([m for m in messages if "modality 'a'" in m]) == 2  # once per measurement (two calls)
    assert all("'permute' on one sample is the identity" in m and "at least 2 samples" in m for m in messages)


def test_the_monitor_warns_once_per_fit_about_one_volume_batches_with_permute(tmp_path) -> None:
    monitor = ModalityContributionMonitor(MODALITIES, occlusion="permute")
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_epochs=3))
    messages = _caught(
        lambda: trainer.fit(
            TwoModalityNet(), loader(two_modality_dataset(16)), loader(two_modality_dataset(4, seed=1), batch_size=1)
        )
    )
    assert len([m for m in messages if "Occluding modality 'image' changed no input" in m]) == 1
    assert all(entry["raw"] == {"image": 0.0, "table": 0.0} for entry in monitor.history)


def test_a_zeros_fill_on_an_all_zero_modality_gives_exactly_0_says_so_and_measures_the_other() -> None:
    torch.manual_seed(0)
    model = LinearSum(4, 3, 2)
    batches = [_batch(6, seed, b=torch.zeros(6, 3)) for seed in range(2)]
    results = []
    messages = _caught(
        lambda: results.append(modality_contribution(model, batches, {"a": "a", "b": "b"}, occlusion="zeros"))
    )
    (result,) = results
    assert result.raw["b"] == 0.0 and result.raw["a"] > 0.0
    assert result.shares == {"a": 1.0, "b": 0.0}
    (message,) = [m for m in messages if "changed no input" in m]
    assert "modality 'b'" in message and "'zeros' on an input that is already all zeros" in message


# -------------------------------------------------------------------------------------------------- saturation


class Confident(nn.Module):
    """A linear model's logits with class 0 ahead by ``2 · scale``: large scales saturate float32 softmax to 0 and 1
    (no occlusion moves the logits enough to change the winner)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = LinearSum(4, 3, 2)

    def forward(self, a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
        return self.inner(a, b) + scale[:, None] * torch.tensor([1.0, -1.0])


def _saturation(scale: Tensor, transform: str) -> tuple[object, list[str]]:
    results = []
    batch = {**_batch(8, 3), "scale": scale}
    messages = _caught(
        lambda: results.append(
            modality_contribution(
                Confident(),
                [batch],
                {"a": "a", "b": "b"},
                output_transform=transform,
                forward_fn=lambda model, b: model(b["a"], b["b"], b["scale"]),
            )
        )
    )
    return results[0], [m for m in messages if "saturated outputs" in m]


def test_saturated_softmax_is_named_with_its_fraction_and_log_softmax_measures_instead() -> None:
    every = torch.full((8,), 1e4)
    result, messages = _saturation(every, "softmax")
    (message,) = messages
    assert message.startswith("100% of the samples have saturated outputs")
    assert "every share is NaN for this reason" in message and "output_transform='log_softmax'" in message
    assert all(share != share for share in result.shares.values())
    result, messages = _saturation(every, "log_softmax")
    assert not messages and all(0.0 < share < 1.0 for share in result.shares.values())


def test_when_half_the_samples_saturate_the_warning_says_half() -> None:
    # the `a` occlusion keeps the saturated samples' probabilities; the shares would come from the other half
    half = torch.tensor([1e4] * 4 + [0.0] * 4)
    _, messages = _saturation(half, "softmax")
    (message,) = messages
    assert re.match(r"50% of the samples", message) and "come mostly from the other samples" in message
    _, none = _saturation(torch.zeros(8), "softmax")
    assert not none


# ------------------------------------------------------------------------------------------------- dict batches


class BertEncoder(nn.Module):
    """BERT's pooled output through a 3-class head; ``forward(input_ids, attention_mask, token_type_ids)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bert = BertModel(tiny_bert_config())
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None):
        return self.head(self.bert(input_ids, attention_mask, token_type_ids).pooler_output)


def test_a_tokenizer_dict_goes_to_berts_parameters_by_keyword() -> None:
    model, batch = BertEncoder().eval(), _tokenized()
    modalities = {"input_ids": "input_ids", "token_type_ids": "token_type_ids"}
    default = modality_contribution(model, [batch], modalities, occlusion=0)
    explicit = modality_contribution(
        model,
        [batch],
        modalities,
        occlusion=0,
        forward_fn=lambda m, b: m(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]
        ),
    )
    assert default.raw == pytest.approx(explicit.raw, rel=1e-5)
    # in key order, token_type_ids would land in attention_mask: other numbers, so the test can fail
    positional = modality_contribution(
        model, [batch], modalities, occlusion=0, forward_fn=lambda m, b: m(b["input_ids"], b["token_type_ids"])
    )
    assert default.raw["token_type_ids"] != pytest.approx(positional.raw["token_type_ids"], rel=1e-3)


class MaskFirst(nn.Module):
    def forward(self, mask: Tensor, a: Tensor) -> Tensor:
        return mask[:, :2] + a[:, :2]


def test_a_dict_the_default_call_cannot_map_is_refused_not_called_in_key_order() -> None:
    with pytest.raises(UnmappableBatch, match=r"MaskFirst.forward\(mask, a\).*'a' would go to 'mask'.*forward_fn"):
        modality_contribution(MaskFirst(), [_batch(6, 0)], {"a": "a", "b": "b"})


# -------------------------------------------------------------------------------- wrong keys fail before training


class CountSteps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


@pytest.mark.parametrize(
    "modalities", [{"image": 0, "table": 7}, {"image": 0, "table": "clinical"}], ids=["index", "key"]
)
@pytest.mark.parametrize("sanity_steps", [2, 0])
def test_a_wrong_index_or_key_fails_before_the_first_training_step(tmp_path, modalities, sanity_steps) -> None:
    steps = CountSteps()
    monitor = ModalityContributionMonitor(modalities, every_n_epochs=5)  # the first check would come at epoch 4
    options = trainer_kwargs(tmp_path, max_epochs=1, num_sanity_val_steps=sanity_steps)
    trainer = L.Trainer(callbacks=[monitor, steps], **options)
    wrong = str(modalities["table"])
    with pytest.raises((IndexError, KeyError, TypeError, ValueError), match=re.escape(wrong)):
        trainer.fit(TwoModalityNet(), loader(two_modality_dataset(16)), loader(two_modality_dataset(8, seed=1)))
    assert steps.steps == (0 if sanity_steps else 1)  # without a sanity check: the first validation batch, epoch 0


# ------------------------------------------------------------------------------------------ resumed random fills


def _fit(tmp_path, max_epochs: int, occlusion: str, ckpt_path=None) -> ModalityContributionMonitor:
    torch.manual_seed(0)
    monitor = ModalityContributionMonitor(MODALITIES, occlusion=occlusion, output_transform="softmax")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    options = trainer_kwargs(tmp_path, max_epochs=max_epochs, enable_checkpointing=True)
    trainer = L.Trainer(callbacks=[monitor, checkpoint], **options)
    val = loader(two_modality_dataset(32, seed=1), batch_size=8)
    trainer.fit(TwoModalityNet(), loader(two_modality_dataset(48)), val, ckpt_path=ckpt_path)
    return monitor


@pytest.mark.parametrize("occlusion", ["permute", "noise"])
def test_a_resumed_fit_with_random_fills_ends_with_the_uninterrupted_history(tmp_path, occlusion) -> None:
    straight = _fit(tmp_path / "straight", 4, occlusion)
    _fit(tmp_path / "split", 2, occlusion)
    resumed = _fit(tmp_path / "split", 4, occlusion, ckpt_path=tmp_path / "split" / "ckpt" / "last.ckpt")
    assert [entry["epoch"] for entry in resumed.history] == [0, 1, 2, 3]
    for ours, theirs in zip(resumed.history, straight.history):
        assert ours["shares"] == pytest.approx(theirs["shares"], abs=1e-6)
        assert ours["raw"] == pytest.approx(theirs["raw"], rel=1e-5)
