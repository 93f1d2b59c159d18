"""An attribute copy runs only on the samples its mask occludes something in; the others are exactly 0 by construction.

A padded token, a word a sample does not have, a patch outside a sample's region: occluding nothing leaves the clean
sample, so its difference is 0 by definition. The engine does not run those rows and gives them the clean row, so
the zero holds on every machine (no float is involved), and a model on short reports runs far fewer rows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_mc import Modality
from lightning_mc.functional import modality_contribution
from lightning_mc.masks import CustomMasks, Tokens, Words

from helpers import assert_same_numbers, make_engine

MAX_LENGTH = 6


class RowCounter(nn.Module):
    """Embeds tokens (mean over real positions), reads a table; counts every row it receives."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 4)
        self.table = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)
        self.rows = 0

    def forward(self, tokens: Tensor, table: Tensor) -> Tensor:
        self.rows += tokens.shape[0]
        return self.head(torch.tanh(self.embed(tokens).mean(1) + self.table(table)))


def text_batch() -> dict[str, Tensor]:
    """Four reports of 6, 4, 2 and 5 real tokens (id 0 pads), and a 3-column table."""
    lengths = torch.tensor([6, 4, 2, 5])
    mask = torch.arange(MAX_LENGTH)[None] < lengths[:, None]
    tokens = torch.where(mask, torch.randint(1, 20, (4, MAX_LENGTH), generator=torch.Generator().manual_seed(1)), 0)
    table = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    return {"tokens": tokens, "attention_mask": mask.long(), "table": table}


def token_modalities(attention_mask: str | None = "attention_mask") -> list[Modality]:
    tokens = Tokens(MAX_LENGTH, attention_mask=attention_mask) if attention_mask else Tokens(MAX_LENGTH)
    return [Modality("tokens", key="tokens", occlusion=0, attributes=tokens), Modality("table", key="table")]


def test_token_copies_run_one_row_per_real_token_and_padding_gets_exactly_zero() -> None:
    model, batch = RowCounter(), text_batch()
    engine = make_engine(token_modalities(), occlusion="zeros")
    outputs = engine.run(model, batch)

    real_tokens = int(batch["attention_mask"].sum())
    assert real_tokens == 17
    assert model.rows == 4 + real_tokens + 4  # clean + one copy per real token + the table's copy
    assert engine.rows_forwarded == model.rows
    # every padded (sample, position) is the clean row itself: the difference is exactly 0 by construction
    padded = batch["attention_mask"] == 0
    occluded = outputs.occluded["tokens"]  # (N, positions, C)
    assert torch.equal(occluded[padded], outputs.clean[:, None].expand_as(occluded)[padded])
    assert (occluded[~padded] - outputs.clean[:, None].expand_as(occluded)[~padded]).abs().sum(-1).min() > 0


def test_the_rows_that_run_give_the_numbers_of_running_every_row() -> None:
    """Without the attention mask the padding is still not run (the fill 0 equals the pad id 0): the numbers match."""
    model, batch = RowCounter(), text_batch()
    skipping = make_engine(token_modalities(), occlusion="zeros").run(model, batch)
    model.rows = 0
    everything = make_engine(token_modalities(None), occlusion="zeros").run(model, batch)
    assert model.rows == 4 + int(batch["attention_mask"].sum()) + 4  # a fill equal to the input runs no row
    real = batch["attention_mask"] == 1
    assert_same_numbers(skipping.occluded["tokens"][real], everything.occluded["tokens"][real])
    assert_same_numbers(skipping.clean, everything.clean)


def test_functional_padding_positions_get_exactly_zero_and_real_tokens_do_not() -> None:
    result = modality_contribution(RowCounter(), [text_batch()], token_modalities(), occlusion="zeros")
    tokens = result.attribute_raw["tokens"]
    # positions 2..5 are padding in sample 2 only, so they still run for the others; none is padding everywhere
    assert all(tokens[f"t{p}"] > 0 for p in range(MAX_LENGTH))
    batch = text_batch()  # now positions 1..5 are padding in every sample
    batch["attention_mask"][:, 1:] = 0
    batch["tokens"][:, 1:] = 0
    model = RowCounter()
    padded = modality_contribution(model, [batch], token_modalities(), occlusion="zeros").attribute_raw["tokens"]
    assert [padded[f"t{p}"] for p in range(1, MAX_LENGTH)] == [0.0] * 5  # exact: those rows never ran
    assert padded["t0"] > 0
    assert model.rows == 4 + 4 + 4  # clean, position 0 of each sample, the table


def test_a_word_a_sample_does_not_have_is_not_run() -> None:
    batch = text_batch()
    # sample k has words 0..k (one token each, then padding ids -1)
    word_ids = torch.full((4, MAX_LENGTH), -1)
    for sample in range(4):
        word_ids[sample, : sample + 1] = torch.arange(sample + 1)
    batch["word_ids"] = word_ids
    model = RowCounter()
    words = Words(max_words=4, word_ids="word_ids")
    modalities = [Modality("tokens", key="tokens", occlusion=0, attributes=words), Modality("table", key="table")]
    engine = make_engine(modalities, occlusion="zeros")
    outputs = engine.run(model, batch)
    # word w runs on the 4 - w samples that have it, but sample 2's third word is a pad id 0, which the fill 0 leaves
    # unchanged: that row does not run either
    assert model.rows == 4 + (1 + 2 + 3 + 4) - 1 + 4
    occluded = outputs.occluded["tokens"]
    for sample in range(4):
        for word in range(sample + 1, 4):
            assert torch.equal(occluded[sample, word], outputs.clean[sample])


def test_a_shared_mask_that_occludes_nothing_runs_no_row_and_a_per_sample_mask_runs_only_its_samples() -> None:
    table = torch.randn(5, 3)
    nothing = torch.zeros(3, dtype=torch.bool)
    first_column = torch.tensor([True, False, False])
    per_sample = torch.zeros(5, 3, dtype=torch.bool)
    per_sample[[1, 3], 2] = True  # only samples 1 and 3 have their third column occluded
    modalities = [
        Modality("a", key=0, attributes=CustomMasks([nothing, first_column], ["none", "c0"])),
        Modality("b", key=1, attributes=CustomMasks([per_sample], ["some"])),
    ]
    calls: list[int] = []

    class Model(nn.Module):
        def forward(self, a: Tensor, b: Tensor) -> Tensor:
            calls.append(a.shape[0])
            return (a * torch.arange(1.0, 4.0)).sum(1, keepdim=True) + b.sum(1, keepdim=True) ** 2

    model = Model()

    engine = make_engine(modalities, occlusion="zeros", max_batch_size=100)
    outputs = engine.run(model, (table, torch.randn(5, 3)))
    assert sum(calls) == 5 + 0 + 5 + 2  # clean, "none" (no row), "c0" (every sample), "some" (samples 1 and 3)
    assert torch.equal(outputs.occluded["a"][:, 0], outputs.clean)
    assert torch.equal(outputs.occluded["b"][[0, 2, 4], 0], outputs.clean[[0, 2, 4]])
    assert (outputs.occluded["b"][[1, 3], 0] != outputs.clean[[1, 3]]).all()


class ImageRowCounter(nn.Module):
    """Sums a 64×64 image (4096 elements per sample: compared with its fill sample by sample) and reads a table."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2)
        self.rows: list[int] = []

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        self.rows.append(image.shape[0])
        return self.head(torch.stack([image.flatten(1).nan_to_num().sum(1), table.sum(1)], dim=1))


def test_a_large_whole_modality_equal_to_its_fill_on_a_sample_runs_no_row_for_it() -> None:
    image = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    image[1] = 0.0  # zeros change nothing here: not run, exactly 0
    image[2, 0, 63, 63] = float("nan")  # NaN != NaN: counts as changed, runs
    image[3] = 0.0
    image[3, 0, 63, 63] = -1.0  # only the last element differs from the fill
    batch = (image, torch.randn(4, 3))
    model = ImageRowCounter()
    engine = make_engine([Modality("image", key=0), Modality("table", key=1)], occlusion="zeros")
    outputs = engine.run(model, batch)
    assert sum(model.rows) == 4 + 3 + 4  # clean, the image copy on samples 0, 2 and 3, the table copy
    assert torch.equal(outputs.occluded["image"][1, 0], outputs.clean[1])
    assert outputs.changed["image"].tolist() == [1]
