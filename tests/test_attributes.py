"""Attribute-level results end to end: the monitor's scalars and figures, per-output shares, word spans, padding
read from the batch, attribute counts that stay fixed across batches, and Captum's numbers for column groups."""

from __future__ import annotations

import re

import lightning as L
import numpy as np
import pytest
import torch
from captum.attr import FeatureAblation
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator
from torch import Tensor, nn

from lightning_mc import Modality, ModalityContributionMonitor
from lightning_mc.core.attribute_builders import ColumnGroups, Columns, Patches2d, Tokens, Words
from lightning_mc.functional import modality_contribution
from lightning_mc.views.attribute_figures import MeanImages, attribute_figures, patch_share_map

from helpers import Lambda, ScheduledContributionNet, loader, trainer_kwargs, two_modality_dataset


def _fit_planted(tmp_path, patches: Patches2d, **trainer_overrides) -> tuple[ModalityContributionMonitor, L.Trainer]:
    torch.manual_seed(0)
    model = ScheduledContributionNet([(1.0, 1.0)])  # frozen weights: the numbers do not depend on training
    monitor = ModalityContributionMonitor(
        [
            Modality("image", key=0, attributes=patches),
            Modality("table", key=1, attributes=Columns(["a", "b", "c", "d", "e"])),
        ],
        occlusion="zeros",
        output_transform="softmax",
    )
    data = loader(two_modality_dataset(32))
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[monitor], **trainer_overrides))
    trainer.fit(model, data, data)
    return monitor, trainer


def test_monitor_logs_attribute_scalars_equal_to_the_functional_values(tmp_path) -> None:
    monitor, trainer = _fit_planted(tmp_path, Patches2d((2, 2)))  # 16 patches: still scalars
    expected = modality_contribution(
        trainer.lightning_module,
        loader(two_modality_dataset(32)),
        [Modality("image", key=0, attributes=Patches2d((2, 2))), Modality("table", key=1, attributes=Columns())],
        occlusion="zeros",
        output_transform="softmax",
    )
    latest = monitor.latest
    assert latest is not None
    logged = trainer.callback_metrics
    assert len(latest.attribute_shares["image"]) == 16
    for name, share in latest.attribute_shares["image"].items():
        assert logged[f"mc/attr/image/{name}"].item() == pytest.approx(share, rel=1e-5)
        assert share == pytest.approx(expected.attribute_shares["image"][name], rel=1e-5, abs=1e-9)
    for column, name in enumerate("abcde"):
        assert logged[f"mc/attr/table/{name}"].item() == pytest.approx(
            expected.attribute_shares["table"][str(column)], rel=1e-5
        )
    for modality in ("image", "table"):
        assert sum(latest.attribute_shares[modality].values()) == pytest.approx(latest.shares[modality], rel=1e-5)
        assert sum(latest.attribute_raw[modality].values()) == pytest.approx(latest.raw[modality], rel=1e-5)
    assert latest.shares["image"] == pytest.approx(expected.shares["image"], rel=1e-5)


def test_more_than_16_attributes_go_to_a_tensorboard_heatmap_not_scalars(tmp_path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    monitor, trainer = _fit_planted(tmp_path, Patches2d((1, 1)), logger=logger)  # 64 patches
    assert monitor.latest is not None and len(monitor.latest.attribute_shares["image"]) == 64
    assert not [key for key in trainer.callback_metrics if key.startswith("mc/attr/image/")]
    assert trainer.callback_metrics["mc/attr/table/a"].item() == pytest.approx(
        monitor.latest.attribute_shares["table"]["a"], rel=1e-5
    )
    events = event_accumulator.EventAccumulator(logger.log_dir, size_guidance={event_accumulator.IMAGES: 0}).Reload()
    assert "mc_attributes/image" in events.Tags()["images"]
    image = events.Images("mc_attributes/image")[-1]
    assert image.step == trainer.global_step and image.width > 100 and image.height > 100


def test_attribute_figures_pick_the_figure_kind_and_mean_images_average_samples_and_channels() -> None:
    images = MeanImages([Modality("image", key=0, attributes=Patches2d((2, 2))), Modality("text", key=1)])
    first = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    images.update((first, torch.zeros(2, 5)))
    images.update((torch.zeros(5, 3, 4, 4), torch.zeros(5, 5)), num_samples=2)  # only 2 of these 5 count
    expected = first.mean(dim=(0, 1)) * 2 / 4
    assert torch.allclose(images.means()["image"], expected)

    result = modality_contribution(
        Lambda(lambda im, ids, tb: im.flatten(1).sum(1, keepdim=True) + ids.float().sum(1, keepdim=True) + tb),
        [(torch.randn(3, 1, 10, 10), torch.randint(1, 9, (3, 20)), torch.randn(3, 1))],
        [
            Modality("image", key=0, attributes=Patches2d((2, 2))),
            Modality("ids", key=1, occlusion=0, attributes=Tokens(20)),
            Modality("table", key=2),
        ],
        occlusion="zeros",
    )
    modalities = [
        Modality("image", key=0, attributes=Patches2d((2, 2))),
        Modality("ids", key=1, attributes=Tokens(20)),
        Modality("table", key=2),
    ]
    figures = attribute_figures(result, modalities, {"image": torch.zeros(10, 10)})
    assert sorted(figures) == ["mc_attributes/ids", "mc_attributes/image"]  # 1 table attribute: no figure
    assert figures["mc_attributes/image"].axes[0].get_title().startswith("image: share per patch")
    assert len(figures["mc_attributes/ids"].axes[1].patches) == 10  # top-10 bars


def test_patch_share_map_places_partial_edge_patches_at_k_times_size() -> None:
    shares = {f"r{r}c{c}": 10.0 * r + c for r in range(3) for c in range(2)}
    values = patch_share_map(shares, Patches2d((3, 4)), (7, 6))  # 3 x 2 patches, the last row/column partial
    assert values[0:3, 0:4].tolist() == [[0.0] * 4] * 3
    assert values[3:6, 4:6].tolist() == [[11.0] * 2] * 3
    assert values[6:7, 0:4].tolist() == [[20.0] * 4]
    assert values[6, 5] == 21.0
    assert not np.isnan(values).any()


class TwoHeads(ScheduledContributionNet):
    """Output 0 reads the image only, output 1 the table only."""

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return torch.stack([image.flatten(1).sum(1), table.sum(1)], dim=1) + self.bias[:2]

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self(batch[0], batch[1]).pow(2).mean()


@pytest.mark.parametrize(("per_output", "output_names"), [(True, ["0", "1"]), (["benign", "malignant"], None)])
def test_per_output_shares_through_the_monitor_follow_the_outputs(tmp_path, per_output, output_names) -> None:
    output_names = output_names or per_output
    monitor = ModalityContributionMonitor(
        [Modality("image", key=0, attributes=Patches2d((4, 4))), Modality("table", key=1)],
        occlusion="zeros",
        per_output=per_output,
    )
    data = loader(two_modality_dataset(16))
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[monitor]))
    trainer.fit(TwoHeads([(1.0, 1.0)]), data, data)
    assert monitor.latest is not None
    assert monitor.latest.per_output_shares == {"image": [1.0, 0.0], "table": [0.0, 1.0]}
    logged = {key: value.item() for key, value in trainer.callback_metrics.items() if key.startswith("mc/output_")}
    image_output, table_output = output_names
    assert logged == {
        f"mc/output_share/{image_output}/image": 1.0,
        f"mc/output_share/{image_output}/table": 0.0,
        f"mc/output_share/{table_output}/image": 0.0,
        f"mc/output_share/{table_output}/table": 1.0,
    }


def test_per_output_names_must_match_the_outputs_and_many_outputs_warn(tmp_path) -> None:
    data = loader(two_modality_dataset(16))
    monitor = ModalityContributionMonitor({"image": 0, "table": 1}, per_output=["only_one"])
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[monitor]))
    with pytest.raises(ValueError, match=re.escape("per_output names 1 outputs (['only_one']) but the model has 2")):
        trainer.fit(TwoHeads([(1.0, 1.0)]), data, data)

    class ManyOutputs(TwoHeads):
        def forward(self, image: Tensor, table: Tensor) -> Tensor:
            return torch.cat([image.flatten(1)[:, :10], table.repeat(1, 2)], dim=1) + self.bias.sum()

    monitor = ModalityContributionMonitor({"image": 0, "table": 1}, occlusion="zeros", per_output=True)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[monitor]))
    with pytest.warns(UserWarning, match="the model has 20 outputs; per-output shares are logged for at most 16"):
        trainer.fit(ManyOutputs([(1.0, 1.0)]), data, data)
    assert not any(key.startswith("mc/output_share/") for key in trainer.callback_metrics)
    assert monitor.latest is not None and len(monitor.latest.per_output_shares["image"]) == 20


def _word_model(ids: Tensor, table: Tensor) -> Tensor:
    # reads only the tokens of word 1 (positions 2 and 3 of every sequence below), and not additively
    return (ids[:, 2].float() * ids[:, 3].float()).unsqueeze(1) + 0.0 * table


def test_words_occlude_all_tokens_of_a_word_together() -> None:
    ids = torch.tensor([[101, 5, 6, 7, 8, 102], [101, 9, 4, 3, 102, 0]])
    word_ids = torch.tensor([[-1, 0, 1, 1, 2, -1], [-1, 0, 1, 1, -1, -1]])  # [CLS]/[SEP]/[PAD]: no word
    batch = {"ids": ids, "word_ids": word_ids, "table": torch.randn(2, 1)}
    result = modality_contribution(
        Lambda(_word_model),
        [batch],
        [Modality("text", key="ids", occlusion=1, attributes=Words(4, word_ids="word_ids")), Modality("t", "table")],
        forward_fn=lambda model, b: model(b["ids"], b["table"]),
    )
    raw = result.attribute_raw["text"]
    assert list(raw) == ["w0", "w1", "w2", "w3"]
    # word 1 occluded as one: 6·7 → 1·1 and 4·3 → 1·1; occluding a single token would give |6·7 − 7| etc.
    assert raw["w1"] == pytest.approx(((6 * 7 - 1) + (4 * 3 - 1)) / 2)
    assert raw["w0"] == raw["w2"] == raw["w3"] == 0.0
    masks = Words(4, word_ids="word_ids")(ids, batch=batch).masks
    assert masks[:, 1, 4:].sum().item() == 0  # the [SEP] and pad of sample 1 are in no word
    assert masks[3].sum().item() == 0  # nobody has a fourth word
    assert masks.sum(dim=0).tolist() == (word_ids >= 0).long().tolist()  # each word token in exactly one mask


def test_tokens_read_the_attention_mask_from_the_batch_even_when_the_pad_id_is_a_real_token() -> None:
    ids = torch.tensor([[0, 4, 0, 2], [3, 0, 0, 0]])  # id 0 is a real token here; padding is known only from the mask
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    batch = {"ids": ids, "attention_mask": attention, "table": torch.randn(2, 1)}

    def model(ids: Tensor, table: Tensor) -> Tensor:
        return ((ids.float() + 1.0) * weights).sum(1, keepdim=True) + 0.0 * table

    result = modality_contribution(
        Lambda(model),
        [batch],
        [
            Modality("text", key="ids", occlusion=7, attributes=Tokens(6, attention_mask="attention_mask")),
            Modality("table", key="table"),
        ],
        forward_fn=lambda m, b: m(b["ids"], b["table"]),
        max_batch_size=3,  # per-sample masks cut across forward chunks
    )
    raw = result.attribute_raw["text"]
    expected = [
        (abs(0 - 7) * 1 + abs(3 - 7) * 1) / 2,  # t0: both samples
        (abs(4 - 7) * 2 + abs(0 - 7) * 2) / 2,  # t1: the second sample's real token 0 (its last real token) counts
        (abs(0 - 7) * 3) / 2,  # t2: only the first sample; the second's is padding
        (abs(2 - 7) * 4) / 2,  # t3: the first sample's last token
        0.0,
        0.0,  # t4, t5: beyond the batch's length
    ]
    assert list(raw.values()) == pytest.approx(expected)
    masks = Tokens(6, attention_mask="attention_mask")(ids, batch=batch).masks
    assert masks.sum(dim=0).tolist() == attention.tolist()  # every real position once, padding never


def test_token_attributes_stay_fixed_across_batches_of_different_lengths() -> None:
    short, long = torch.randint(1, 9, (3, 2)), torch.randint(1, 9, (2, 5))

    def model(ids: Tensor, table: Tensor) -> Tensor:
        return ids.float().sum(1, keepdim=True) + table

    result = modality_contribution(
        Lambda(model),
        [(short, torch.zeros(3, 1)), (long, torch.zeros(2, 1))],
        [Modality("text", key=0, occlusion=0, attributes=Tokens(5, pad_id=0)), Modality("table", key=1)],
        occlusion="zeros",
    )
    raw = result.attribute_raw["text"]
    assert list(raw) == ["t0", "t1", "t2", "t3", "t4"]
    short_sums = short.sum(0).tolist() + [0.0] * 3  # the short batch adds 0 beyond its 2 positions
    for position in range(5):  # mean over all 5 samples of both batches
        total = short_sums[position] + long[:, position].sum().item()
        assert raw[f"t{position}"] == pytest.approx(total / 5)


def test_column_groups_match_captum_feature_ablation_with_the_same_groups() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
    table = torch.randn(12, 6)
    groups = {"labs": [0, 1, 2], "age+sex": [3, 4], "bmi": [5]}

    class Split(nn.Module):  # two modalities: the table and a constant second input the model ignores
        def forward(self, table: Tensor, other: Tensor) -> Tensor:
            return model(table) + 0.0 * other

    result = modality_contribution(
        Split(),
        [(table, torch.zeros(12, 1))],
        [Modality("table", key=0, attributes=ColumnGroups(groups)), Modality("other", key=1)],
        occlusion="zeros",
    )
    feature_mask = torch.tensor([[0, 0, 0, 1, 1, 2]])
    ablation = FeatureAblation(model)
    expected = torch.zeros(3)
    for target in range(2):
        attribution = ablation.attribute(table, baselines=0.0, target=target, feature_mask=feature_mask)
        expected += attribution[:, [0, 3, 5]].abs().mean(dim=0)
    assert list(result.attribute_raw["table"].values()) == pytest.approx(expected.tolist(), abs=1e-6)
    assert result.attribute_raw["other"]["all"] == pytest.approx(0.0, abs=1e-6)  # batched-BLAS rounding only


@pytest.mark.parametrize(("max_batch_size", "calls"), [(None, 6), (88, 1), (40, 3)])
def test_all_attribute_copies_run_in_as_few_forward_calls_as_the_budget_allows(max_batch_size, calls: int) -> None:
    seen: list[int] = []

    def model(image: Tensor, table: Tensor) -> Tensor:
        seen.append(image.shape[0])
        return image.flatten(1).sum(1, keepdim=True) + table.sum(1, keepdim=True)

    result = modality_contribution(
        Lambda(model),
        [(torch.randn(4, 1, 8, 8), torch.randn(4, 5))],
        [Modality("image", key=0, attributes=Patches2d((2, 2))), Modality("table", key=1, attributes=Columns())],
        occlusion="zeros",
        max_batch_size=max_batch_size,
    )
    rows = (1 + 16 + 5) * 4  # the clean batch and one copy per attribute, 4 samples each
    assert sum(seen) == rows and len(seen) == calls  # None: 4 copies (16 rows) per call
    assert len(result.attribute_raw["image"]) == 16 and len(result.attribute_raw["table"]) == 5
