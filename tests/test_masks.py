"""Attribute masks (lightning_mc.core.attribute_builders) through the engine and the metric: planted known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from captum.attr import FeatureAblation
from torch import Tensor, nn

from lightning_mc import Modality, ModalityContribution
from lightning_mc.core.attribute_builders import ColumnGroups, Columns, CustomMasks, Patches2d, Patches3d, Tokens, Words
from lightning_mc.functional import modality_contribution

from helpers import Lambda

#: The worked example of Gapp et al.'s Algorithm 1 with every expected number, kept inside the repository.
GOLDEN_PATH = Path(__file__).resolve().parent / "data" / "algorithm1_example.json"


def _measure(function, batch, modalities, **kwargs):
    kwargs.setdefault("occlusion", "zeros")
    return modality_contribution(Lambda(function), [batch], modalities, **kwargs)


@pytest.mark.parametrize(("size", "pixel"), [((2, 2), (3, 5)), ((4, 4), (7, 0)), ((3, 3), (7, 7)), ((3, 5), (4, 6))])
def test_pixel_reader_puts_everything_on_its_patch(size: tuple[int, int], pixel: tuple[int, int]) -> None:
    row, col = pixel
    image, table = torch.randn(6, 1, 8, 8), torch.randn(6, 3)
    result = _measure(
        lambda im, tb: 2.0 * im[:, 0, row, col : col + 1] + 0.0 * tb[:, :1],
        (image, table),
        [Modality("image", key=0, attributes=Patches2d(size)), Modality("table", key=1)],
    )
    grid = (math.ceil(8 / size[0]), math.ceil(8 / size[1]))
    expected_name = f"r{row // size[0]}c{col // size[1]}"
    raw = result.attribute_raw["image"]
    assert len(raw) == grid[0] * grid[1]  # partial edge patches are kept
    assert raw[expected_name] == pytest.approx(2.0 * image[:, 0, row, col].abs().mean().item(), rel=1e-6)
    assert all(value == 0.0 for name, value in raw.items() if name != expected_name)
    assert result.attribute_shares["image"][expected_name] == pytest.approx(1.0)
    assert result.shares == {"image": 1.0, "table": 0.0}


@pytest.mark.parametrize(("size", "voxel"), [((2, 2, 2), (1, 3, 5)), ((3, 3, 3), (4, 4, 4)), ((2, 3, 4), (3, 5, 2))])
def test_voxel_reader_puts_everything_on_its_patch(size: tuple[int, int, int], voxel: tuple[int, int, int]) -> None:
    depth, row, col = voxel
    volume, table = torch.randn(5, 1, 5, 6, 6), torch.randn(5, 2)
    result = _measure(
        lambda v, tb: v[:, 0, depth, row, col].unsqueeze(1) + 0.0 * tb[:, :1],
        (volume, table),
        [Modality("volume", key=0, attributes=Patches3d(size)), Modality("table", key=1)],
    )
    counts = [math.ceil(extent / step) for extent, step in zip((5, 6, 6), size)]
    expected_name = f"d{depth // size[0]}r{row // size[1]}c{col // size[2]}"
    raw = result.attribute_raw["volume"]
    assert len(raw) == math.prod(counts)
    assert raw[expected_name] == pytest.approx(volume[:, 0, depth, row, col].abs().mean().item(), rel=1e-6)
    assert all(value == 0.0 for name, value in raw.items() if name != expected_name)
    assert result.attribute_shares["volume"][expected_name] == pytest.approx(1.0)


def test_patches_cover_every_pixel_once_with_offsets_k_times_size() -> None:
    masks = Patches2d((3, 3))(torch.zeros(1, 2, 8, 8))
    assert masks.masks.shape == (9, 1, 1, 8, 8)
    assert torch.equal(masks.masks.sum(dim=0), torch.ones(1, 1, 8, 8, dtype=torch.long))
    r1c2 = masks.masks[masks.names.index("r1c2"), 0, 0]
    assert r1c2.nonzero().tolist() == [[r, c] for r in range(3, 6) for c in range(6, 8)]


@pytest.mark.parametrize("column", [0, 3, 4])
def test_column_reader_puts_everything_on_its_column(column: int) -> None:
    image, table = torch.randn(7, 1, 4, 4), torch.randn(7, 5)
    names = ["age", "sex", "bmi", "ldl", "hdl"]
    result = _measure(
        lambda im, tb: 3.0 * tb[:, column : column + 1] + 0.0 * im.flatten(1)[:, :1],
        (image, table),
        [Modality("image", key=0), Modality("table", key=1, attributes=Columns(names))],
    )
    raw = result.attribute_raw["table"]
    assert raw[names[column]] == pytest.approx(3.0 * table[:, column].abs().mean().item(), rel=1e-6)
    assert all(value == 0.0 for name, value in raw.items() if name != names[column])
    assert result.attribute_shares["table"] == {name: float(name == names[column]) for name in names}


def test_group_is_one_occlusion_with_its_columns_joint_effect() -> None:
    table, other = torch.randn(9, 4), torch.randn(9, 2)

    def model(tb: Tensor, ot: Tensor) -> Tensor:  # non-additive in columns 0 and 1
        return ((tb[:, 0] + tb[:, 1]) ** 2 + tb[:, 2] + ot[:, 0]).unsqueeze(1)

    result = _measure(
        model,
        (table, other),
        [Modality("table", key=0, attributes=ColumnGroups({"pair": [0, 1], "third": [2]})), Modality("o", key=1)],
    )
    joint = table.clone()
    joint[:, :2] = 0.0
    expected_joint = (model(table, other) - model(joint, other)).abs().mean().item()
    only0, only1 = table.clone(), table.clone()
    only0[:, 0] = 0.0
    only1[:, 1] = 0.0
    separate = (model(table, other) - model(only0, other)).abs() + (model(table, other) - model(only1, other)).abs()
    assert result.attribute_raw["table"]["pair"] == pytest.approx(expected_joint, rel=1e-6)
    assert abs(separate.mean().item() - expected_joint) > 1e-2  # the group is not the sum of single columns
    assert result.attribute_raw["table"]["third"] == pytest.approx(table[:, 2].abs().mean().item(), rel=1e-6)


def _token_model(weights: Tensor):
    def model(ids: Tensor, table: Tensor) -> Tensor:
        return (ids.float() * weights[: ids.shape[1]]).sum(1, keepdim=True) + table[:, :1]

    return model


@pytest.mark.parametrize("padded", [False, True])
def test_tokens_last_token_counts_and_pads_get_exactly_zero(padded: bool) -> None:
    max_length, length = 7, 5
    weights = torch.arange(1.0, max_length + 1.0)
    ids = torch.randint(1, 50, (4, length))
    lengths = torch.tensor([5, 3, 1, 4]) if padded else torch.full((4,), length)
    real = torch.arange(length)[None] < lengths[:, None]
    ids = ids.where(real, torch.zeros_like(ids))  # pad id 0
    table = torch.randn(4, 2)
    result = _measure(
        _token_model(weights),
        (ids, table),
        [Modality("text", key=0, occlusion=99, attributes=Tokens(max_length, pad_id=0)), Modality("table", key=1)],
        max_batch_size=3,  # per-sample masks cut across forward chunks
    )
    raw = result.attribute_raw["text"]
    assert list(raw) == [f"t{p}" for p in range(max_length)]  # stable count: max_length
    for position in range(max_length):
        if position >= length:
            expected = 0.0
        else:
            change = (weights[position] * (ids[:, position] - 99).float()).abs() * real[:, position]
            expected = change.mean().item()
        assert raw[f"t{position}"] == pytest.approx(expected, rel=1e-6, abs=0.0)
    for sample, n in enumerate(lengths.tolist()):  # the last real token of every sample moves its output
        alone = _measure(
            _token_model(weights),
            (ids[sample : sample + 1], table[sample : sample + 1]),
            [Modality("text", key=0, occlusion=99, attributes=Tokens(max_length, pad_id=0)), Modality("t", key=1)],
        ).attribute_raw["text"]
        assert alone[f"t{n - 1}"] > 0.0
        assert all(alone[f"t{p}"] == 0.0 for p in range(n, max_length))  # pad positions: exactly 0


def test_tokens_attention_mask_callable_matches_pad_id() -> None:
    ids = torch.tensor([[3, 4, 0], [5, 0, 0]])
    by_id = Tokens(3, pad_id=0)(ids).masks
    by_mask = Tokens(3, attention_mask=lambda x: x != 0)(ids).masks
    assert torch.equal(by_id, by_mask)
    assert by_id.sum().item() == 3  # one mask per real token, nothing on padding


def test_per_output_shares_follow_the_outputs() -> None:
    a, b = torch.randn(8, 3), torch.randn(8, 2)
    result = _measure(
        lambda x, y: torch.stack([x.sum(1), y.sum(1)], dim=1),
        (a, b),
        [Modality("A", key=0, attributes=Columns()), Modality("B", key=1, attributes=Columns())],
    )
    assert result.per_output_shares["A"] == [1.0, 0.0]
    assert result.per_output_shares["B"] == [0.0, 1.0]
    for output in range(2):
        assert sum(shares[output] for shares in result.per_output_shares.values()) == pytest.approx(1.0)


def test_worked_example_attribute_values_and_sums() -> None:
    golden = json.loads(GOLDEN_PATH.read_text())
    expected = golden["expected"]
    names = list(golden["outputs_occluded"])
    metric = ModalityContribution({name: ("l0", "l1") for name in names}, num_outputs=2)
    metric.update(
        torch.tensor(golden["outputs_clean"], dtype=torch.float64),
        {name: torch.tensor(golden["outputs_occluded"][name], dtype=torch.float64) for name in names},
    )
    values = metric.compute()
    attribute_raw = values["attribute_raw"].view(len(names), 2)
    attribute_shares = values["attribute_shares"].view(len(names), 2)
    for index, name in enumerate(names):
        assert attribute_raw[index].tolist() == pytest.approx(expected["attribute_raw"][name], abs=1e-6)
        assert attribute_shares[index].tolist() == pytest.approx(expected["attribute_share_of_total"][name], abs=1e-6)
        assert attribute_shares[index].sum().item() == pytest.approx(values["shares"][index].item(), abs=1e-6)
        assert values["shares"][index].item() == pytest.approx(expected["share_ratio_of_sums"][name], abs=1e-6)


def test_same_numbers_as_captum_feature_ablation() -> None:
    torch.manual_seed(3)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Tanh())
            self.table = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
            self.head = nn.Linear(6, 3)

        def forward(self, image: Tensor, table: Tensor) -> Tensor:
            return self.head(self.image(image) * self.table(table) + self.image(image))

    model = Net().eval()
    image, table = torch.randn(10, 1, 8, 8), torch.randn(10, 5)
    patches = Patches2d((3, 3))
    patch_masks = patches(image)
    result = modality_contribution(
        model,
        [(image, table)],
        [Modality("image", key=0, attributes=patches), Modality("table", key=1, attributes=Columns())],
        occlusion="zeros",
    )
    # Captum feature ids: one per attribute, patches first then the columns.
    image_ids = (patch_masks.masks[:, 0].long() * torch.arange(len(patch_masks.names)).view(-1, 1, 1, 1)).sum(0)
    table_ids = (torch.arange(5) + len(patch_masks.names)).view(1, 5)
    ablation = FeatureAblation(model)
    total = torch.zeros(len(patch_masks.names) + 5)
    for target in range(3):
        image_attr, table_attr = ablation.attribute(
            (image, table), baselines=(0.0, 0.0), target=target, feature_mask=(image_ids[None], table_ids)
        )
        for feature in range(len(patch_masks.names)):
            position = (image_ids == feature).nonzero()[0].tolist()  # any element of the feature holds its value
            total[feature] += image_attr[(slice(None), *position)].abs().mean()
        total[len(patch_masks.names) :] += table_attr.abs().mean(0)
    ours = list(result.attribute_raw["image"].values()) + list(result.attribute_raw["table"].values())
    assert ours == pytest.approx(total.tolist(), abs=1e-5)
    assert sum(result.attribute_shares["image"].values()) == pytest.approx(result.shares["image"], abs=1e-6)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Patches2d((0, 2)), r"size=\(0, 2\) must be a tuple of 2 positive ints"),
        (lambda: Patches3d((2, 2)), r"size=\(2, 2\) must be a tuple of 3 positive ints"),
        (lambda: Tokens(0, pad_id=0), "max_length=0 must be a positive int"),
        (lambda: Tokens(4, pad_id=0, attention_mask=lambda x: x), "pad_id or attention_mask, not both"),
        (lambda: ColumnGroups({"labs": []}), r"groups\['labs'\] is empty"),
        (lambda: ColumnGroups({"labs": [0, -1]}), "non-negative int column indices"),
        (lambda: Columns(["a", "a"]), "duplicates"),
        (lambda: CustomMasks([torch.ones(3, dtype=torch.bool)], ["a", "b"]), "1 masks but 2 names"),
        (lambda: CustomMasks([torch.ones(3)], ["a"]), "expected a boolean tensor"),
        (lambda: Tokens(4, attention_mask=2.5), "attention_mask=2.5 must be a batch key"),
        (lambda: Words(0, word_ids="word_ids"), "max_words=0 must be a positive int"),
        (lambda: Words(3, word_ids=None), "word_ids=None must be a batch key"),
    ],
)
def test_bad_arguments_name_the_argument(build, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        build()


@pytest.mark.parametrize(
    ("builder", "value", "message"),
    [
        (Columns(["a", "b"]), torch.zeros(2, 3), "got 2 names but the modality has 3 columns"),
        (ColumnGroups({"g": [0, 5]}), torch.zeros(2, 3), r"column 5 but the modality has 3 columns \(valid: 0..2\)"),
        (Tokens(3, pad_id=0), torch.zeros(2, 5, dtype=torch.long), "5 positions .* but max_length=3"),
        (CustomMasks([torch.ones(4, dtype=torch.bool)], ["a"]), torch.zeros(2, 3), r"do not broadcast"),
        (Patches2d((2, 2)), torch.zeros(4, 4), "at least 3 dimensions"),
    ],
)
def test_bad_modality_shapes_are_reported(builder, value: Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        builder(value)


@pytest.mark.parametrize(
    ("builder", "batch", "message"),
    [
        (Tokens(3, attention_mask="mask"), None, "attention_mask='mask' is a batch key but no batch was given"),
        (Tokens(3, attention_mask="mask"), {"ids": 0}, r"'mask' is not in the batch \(dict with \['ids'\]"),
        (Tokens(3, attention_mask="mask"), {"mask": torch.ones(2, 2)}, r"shape \(N, L\) = \(2, 3\)"),
        (Words(2, word_ids="w"), {"w": torch.tensor([[0, 1, 2], [0, 0, 1]])}, "word id 2 but max_words=2"),
        (Words(2, word_ids="w"), {"w": torch.zeros(2, 3)}, "expected an integer tensor of shape"),
    ],
)
def test_bad_batch_entries_of_token_builders_are_reported(builder, batch, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        builder(torch.ones(2, 3, dtype=torch.long), batch=batch)


def test_custom_masks_match_the_equivalent_builder() -> None:
    image, table = torch.randn(6, 1, 8, 8), torch.randn(6, 3)
    patches = Patches2d((4, 4))
    stacked = patches(image)
    custom = CustomMasks([mask[0, 0] for mask in stacked.masks], list(stacked.names))

    def model(im: Tensor, tb: Tensor) -> Tensor:
        return torch.stack([im.pow(2).sum((1, 2, 3)), (im[:, 0, :2, :2].sum((1, 2)) * tb[:, 0])], dim=1)

    ours = _measure(model, (image, table), [Modality("image", key=0, attributes=patches), Modality("t", key=1)])
    theirs = _measure(model, (image, table), [Modality("image", key=0, attributes=custom), Modality("t", key=1)])
    assert ours.attribute_raw == theirs.attribute_raw  # bit-equal: the same masks give the same copies and rows
