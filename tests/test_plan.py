"""One plan per batch layout: decided once, reused by every batch of it, left alone by a batch that needs its own.

The copies, their masks, their chunks and what each encoder does in each forward call depend on the layout (shapes,
dtypes, device, options) only; which samples each copy changes depends on the values and is tested per batch.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_mc import Modality
from lightning_mc.core.changed_rows import restrict
from lightning_mc.core.encoder_cache import EncoderCache
from lightning_mc.core.layout import BatchView
from lightning_mc.core.occlusion import EncoderInput, resolve_fill
from lightning_mc.core.plan import Planner
from lightning_mc.masks import Columns, Tokens

from helpers import assert_same_numbers, make_engine


class LateFusion(nn.Module):
    """An image encoder, a table encoder, a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image_encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh())
        self.table_encoder = nn.Sequential(nn.Linear(3, 6), nn.Tanh())
        self.head = nn.Linear(6, 4)

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return self.head(self.image_encoder(image) + self.table_encoder(table))


def batches(count: int, size: int = 5) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [
        (torch.randn(size, 3, 4, generator=generator), torch.randn(size, 3, generator=generator)) for _ in range(count)
    ]


MODALITIES = [Modality("image", key=0), Modality("table", key=1, attributes=Columns())]


def test_every_batch_of_a_layout_gets_the_same_plan_and_another_size_gets_its_own() -> None:
    planner = Planner(make_engine(MODALITIES).modalities)
    first, second = (planner.plan(BatchView.of(batch, planner.modalities), clean_given=False) for batch in batches(2))
    smaller = planner.plan(BatchView.of(batches(1, size=2)[0], planner.modalities), clean_given=False)

    assert first is second
    assert smaller is not first and smaller.batch_size == 2
    assert [copy.name for copy in first.copies] == [None, "image", "table/0", "table/1", "table/2"]
    assert planner.plan(BatchView.of(batches(1)[0], planner.modalities), clean_given=True).runs_clean is False


def test_a_batch_whose_fill_equals_a_sample_gets_its_own_plan_and_the_layouts_plan_stays_dense() -> None:
    engine = make_engine(MODALITIES, occlusion="zeros")
    image, table = batches(1)[0]
    image[2] = 0.0  # zeros on zeros: the image copy does not run on sample 2
    view = BatchView.of((image, table), engine.modalities)
    layout = engine.planner.plan(view, clean_given=False)

    own = restrict(layout, view, engine.draws.fill(view))
    dense = restrict(layout, BatchView.of(batches(1)[0], engine.modalities), engine.draws.fill(view))

    assert dense is layout and layout.dense
    assert own is not layout and not own.dense
    assert own.copies[1].samples.tolist() == [0, 1, 3, 4]
    assert all(copy.samples is None for copy in layout.copies)
    assert own.changed()["image"].tolist() == [1]


def test_masks_that_read_the_values_are_built_for_every_batch() -> None:
    modalities = [Modality("tokens", key=0, occlusion=0, attributes=Tokens(4, pad_id=0)), Modality("table", key=1)]
    planner = Planner(make_engine(modalities).modalities)
    short = (torch.tensor([[3, 4, 0, 0], [5, 0, 0, 0]]), torch.ones(2, 3))
    long = (torch.tensor([[3, 4, 5, 6], [5, 6, 7, 0]]), torch.ones(2, 3))

    plans = [planner.plan(BatchView.of(batch, planner.modalities), clean_given=False) for batch in (short, long)]

    assert not planner.keeps_plans and plans[0] is not plans[1]
    assert plans[0].covered.tolist() == [True, True, False, False, True]
    assert plans[1].covered.tolist() == [True] * 5


@pytest.mark.parametrize(
    ("spec", "encoder_input", "draws"),
    [
        ("zeros", EncoderInput.ONE_ROW, False),
        (0.5, EncoderInput.ONE_ROW, False),
        ("mean", EncoderInput.ROWS, False),
        ("noise", EncoderInput.ROWS, True),
        ("permute", EncoderInput.PERMUTED, True),
        (lambda x: x * 0, EncoderInput.ROWS, False),
    ],
)
def test_each_fill_says_once_how_encoders_treat_it_and_whether_it_draws(spec, encoder_input, draws) -> None:
    fill = resolve_fill(spec)
    assert fill.encoder_input is encoder_input
    assert fill.draws_random is draws


def test_a_constant_fill_is_one_element_expanded_to_the_input() -> None:
    value = torch.randn(6, 2, 5)
    for spec, expected in (("zeros", 0.0), (-3.0, -3.0)):
        filled = resolve_fill(spec)(value, torch.Generator())
        assert filled.shape == value.shape and filled.dtype == value.dtype
        assert filled.untyped_storage().nbytes() == value.element_size()  # no batch-sized buffer
        assert torch.equal(filled, torch.full_like(value, expected))


@pytest.mark.parametrize("occlusion", ["zeros", "permute"])
def test_what_each_encoder_does_in_each_call_is_decided_once_per_layout(monkeypatch, occlusion) -> None:
    model, data = LateFusion(), batches(4)
    decided = []
    modes = EncoderCache._modes
    monkeypatch.setattr(EncoderCache, "_modes", lambda self, *args: decided.append(1) or modes(self, *args))
    encoders = {"image": "image_encoder", "table": "table_encoder"}
    cached = make_engine(MODALITIES, occlusion=occlusion, encoders=encoders)
    plain = make_engine(MODALITIES, occlusion=occlusion)

    outputs = [cached.run(model, batch) for batch in data]
    after_first = len(decided)
    more = [cached.run(model, batch) for batch in data]

    assert cached.cache is not None and not cached.cache.choice.plain
    if occlusion == "zeros":  # the second pass over the same layout decided nothing again
        assert len(decided) == after_first
    else:  # a permutation that keeps a sample in place leaves it unchanged: that batch gets (and decides) its own plan
        assert len(decided) > after_first
    for got, batch in zip(outputs + more, data + data):
        want = plain.run(model, batch)
        for name in want.occluded:  # the same draws: both engines saw the same batches in the same order
            assert_same_numbers(got.occluded[name], want.occluded[name])
    assert_same_numbers(more[0].clean, outputs[0].clean)
