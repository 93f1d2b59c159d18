"""Encoder-aware occlusion: the cached path gives the plain path's numbers, runs each encoder only where it must, and
refuses an ``encoders`` spec whose module also reads another modality."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_mc import ContributionMeasurement, Modality
from lightning_mc.core.modality import resolve_modalities
from lightning_mc.masks import ColumnGroups, Columns, CustomMasks, Patches2d, Tokens, Words

from helpers import assert_same_numbers, coalition_outputs, make_engine

N, COLUMNS = 6, 4
ENCODERS = {"image": "image_encoder", "table": "table_encoder"}


class Counted(nn.Module):
    """A submodule that counts the rows it computes (not those replayed: a replayed module does not run)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rows = 0

    def forward(self, x: Tensor) -> Tensor:
        self.rows += x.shape[0]
        return self.inner(x)


class LateFusion(nn.Module):
    """A CNN for 1×8×8 images, an MLP for a table of ``COLUMNS`` columns, a fusion head; each encoder counts rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image_encoder = Counted(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten()))
        self.table_encoder = Counted(nn.Sequential(nn.Linear(COLUMNS, 8), nn.Tanh()))
        self.head = Counted(nn.Linear(3 * 64 + 8, 3))

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return self.head(torch.cat([self.image_encoder(image), self.table_encoder(table)], dim=1))

    def reset_counts(self) -> None:
        for module in (self.image_encoder, self.table_encoder, self.head):
            module.rows = 0


class FiLM(LateFusion):
    """The table encoder's output is scaled by the image: it is not an encoder of the table alone."""

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        image_features = self.image_encoder(image)
        return self.head(torch.cat([image_features, self.table_encoder(table * image.flatten(1)[:, :1])], 1))


def batch(seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(N, 1, 8, 8, generator=generator), torch.randn(N, COLUMNS, generator=generator)


def modalities(attributes: bool = False, occlusion=None) -> tuple[Modality, ...]:
    return resolve_modalities(
        [
            Modality("image", key=0, occlusion=occlusion, attributes=Patches2d((4, 4)) if attributes else None),
            Modality("table", key=1, occlusion=occlusion, attributes=Columns() if attributes else None),
        ]
    )


def halve(value: Tensor) -> Tensor:
    return value / 2


FILLS = ["zeros", "mean", 0.5, "noise", "permute", halve]


@pytest.mark.parametrize("attributes", [False, True], ids=["whole", "attributes"])
@pytest.mark.parametrize("fill", FILLS, ids=str)
def test_cached_encoders_give_the_plain_outputs_under_every_fill(fill, attributes) -> None:
    """Same seed, so "noise" and "permute" draw the same fills on both paths; two batches: the check, then none."""
    model = LateFusion().eval()
    plain = make_engine(modalities(attributes), occlusion=fill, max_batch_size=10)
    cached = make_engine(modalities(attributes), occlusion=fill, max_batch_size=10, encoders=ENCODERS)
    for seed in (0, 1):
        expected, actual = plain.run(model, batch(seed)), cached.run(model, batch(seed))
        assert_same_numbers(actual.clean, expected.clean, what="clean")
        assert_same_numbers(actual.occluded, expected.occluded, what=f"occluded, fill {fill!r}")


@pytest.mark.usefixtures("no_spot_check")  # counts the cached path's own rows
def test_each_encoder_runs_only_on_the_rows_it_must() -> None:
    """Rows each module computes on a batch after the first (the first also runs the check)."""
    model = LateFusion().eval()
    # zeros: the encoder's row for the constant fill was computed on the first batch and is kept for the measurement
    for fill, image_rows, table_rows in [("zeros", N, N), ("mean", N + N, N + N), ("permute", N, N)]:
        engine = make_engine(modalities(), occlusion=fill, encoders=ENCODERS)
        engine.run(model, batch(0))
        model.reset_counts()
        engine.run(model, batch(1))
        # clean: both encoders; image occluded: the image encoder (zeros: none, the first batch's row expanded;
        # mean: every row; permute: none, the recorded rows permuted), the table encoder replays; table occluded: the
        # other way round
        assert (model.image_encoder.rows, model.table_encoder.rows) == (image_rows, table_rows), fill
        assert model.head.rows == 3 * N  # the fusion head runs on every copy

    engine = make_engine(modalities(attributes=True), occlusion="zeros", encoders=ENCODERS)
    engine.run(model, batch(0))
    model.reset_counts()
    engine.run(model, batch(1))
    # 4 patches and 4 columns: each attribute copy runs its own modality's encoder on its rows only
    assert (model.image_encoder.rows, model.table_encoder.rows) == (N + 4 * N, N + COLUMNS * N)
    assert model.head.rows == (1 + 4 + COLUMNS) * N


def test_the_plain_path_runs_every_encoder_on_every_copy() -> None:
    model = LateFusion().eval()
    make_engine(modalities(attributes=True), occlusion="zeros").run(model, batch(1))
    assert model.image_encoder.rows == model.table_encoder.rows == model.head.rows == (1 + 4 + COLUMNS) * N


@pytest.mark.usefixtures("no_spot_check")  # counts the cached path's own rows
def test_coalitions_replay_every_encoder_outside_the_coalition() -> None:
    model = LateFusion().eval()
    coalitions = [frozenset({0}), frozenset({1}), frozenset({0, 1})]
    expected = coalition_outputs(make_engine(modalities(), occlusion="mean"), model, batch(), coalitions)
    cached = make_engine(modalities(), occlusion="mean", encoders=ENCODERS)
    coalition_outputs(cached, model, batch(1), coalitions)
    model.reset_counts()
    actual = coalition_outputs(cached, model, batch(), coalitions)
    assert_same_numbers(actual, expected)
    assert (model.image_encoder.rows, model.table_encoder.rows) == (N + 2 * N, N + 2 * N)


@pytest.mark.usefixtures("no_spot_check")  # counts the cached path's own rows
def test_reused_clean_outputs_and_recorded_encoders_never_run_the_clean_batch_again() -> None:
    model = LateFusion().eval()
    engine = make_engine(modalities(), occlusion="mean", encoders=ENCODERS)
    engine.run(model, batch(1))
    expected = make_engine(modalities(), occlusion="mean").run(model, batch())
    model.reset_counts()
    with torch.no_grad(), engine.recording_encoders(model) as recording:
        clean = model(*batch())  # what the validation step computes
    model.reset_counts()
    actual = engine.run(model, batch(), clean=clean, encoder_outputs=recording)
    assert_same_numbers(actual.occluded, expected.occluded)
    assert (model.image_encoder.rows, model.table_encoder.rows, model.head.rows) == (N, N, 2 * N)


def test_an_encoder_that_also_reads_another_modality_is_refused_by_name() -> None:
    model = FiLM().eval()
    engine = make_engine(modalities(), occlusion="mean", encoders=ENCODERS)
    with pytest.raises(
        ValueError, match=r"'table_encoder' \(given for modality 'table'\).*also depends on modality 'image'"
    ):
        engine.run(model, batch())
    # the user's module is left as it was: its own forward, no replaying one
    assert "forward" not in vars(model.table_encoder) and "forward" not in vars(model.image_encoder)
    make_engine(modalities(), occlusion="mean", encoders={"image": "image_encoder"}).run(model, batch())


def test_an_exception_in_the_model_restores_the_encoders() -> None:
    class Failing(LateFusion):
        def forward(self, image: Tensor, table: Tensor) -> Tensor:
            if (table == 0).all():
                raise RuntimeError("no zeros here")
            return super().forward(image, table)

    model = Failing().eval()
    with pytest.raises(RuntimeError, match="no zeros here"):
        make_engine(modalities(), occlusion="zeros", encoders=ENCODERS).run(model, batch())
    assert "forward" not in vars(model.table_encoder) and "forward" not in vars(model.image_encoder)


@pytest.mark.parametrize(
    ("encoders", "error", "message"),
    [
        ({"image": "nope"}, ValueError, r"encoders\['image'\]: LateFusion has no submodule 'nope'. Its top-level"),
        ({"audio": "image_encoder"}, ValueError, "encoders names modality 'audio'; the modalities are"),
        ({"image": ""}, ValueError, r"encoders\['image'\]='' must be a submodule name or a non-empty list"),
        ({"image": [1]}, TypeError, r"encoders\['image'\]=\[1\] must be a submodule name or a non-empty list"),
        ({"image": "head", "table": ["head"]}, ValueError, "names \\['head'\\] for more than one modality"),
        (["image_encoder"], TypeError, "must be None, 'auto' or a non-empty mapping modality -> submodule name"),
    ],
)
def test_a_wrong_encoders_spec_is_refused_with_the_argument_and_what_is_valid(encoders, error, message) -> None:
    with pytest.raises(error, match=message):
        make_engine(modalities(), encoders=encoders).run(LateFusion(), batch())


def test_auto_finds_the_outermost_module_of_each_modality_alone_and_gives_the_plain_numbers() -> None:
    model = LateFusion().eval()
    engine = make_engine(modalities(attributes=True), occlusion="zeros", encoders="auto")
    expected = make_engine(modalities(attributes=True), occlusion="zeros").run(model, batch())
    actual = engine.run(model, batch())
    # the Counted wrappers, not their inner Sequential or its layers; never the head, which reads both
    assert engine.cache.found == {"image": ("image_encoder",), "table": ("table_encoder",)}
    assert_same_numbers(actual.occluded, expected.occluded)


def test_auto_leaves_out_a_module_that_also_reads_another_modality() -> None:
    engine = make_engine(modalities(), occlusion="mean", encoders="auto")
    engine.run(FiLM().eval(), batch())
    assert engine.cache.found == {"image": ("image_encoder",)}  # the FiLM-conditioned table encoder is not the table's


def test_auto_on_an_early_fusion_model_finds_nothing_and_runs_the_plain_path() -> None:
    class EarlyFusion(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(64 + COLUMNS, 3)

        def forward(self, image: Tensor, table: Tensor) -> Tensor:
            return self.net(torch.cat([image.flatten(1), table], dim=1))

    engine = make_engine(modalities(), encoders="auto")
    with pytest.warns(UserWarning, match="encoders='auto' found no submodule"):
        engine.run(EarlyFusion().eval(), batch())
    assert engine.cache.found is None


@pytest.mark.usefixtures("no_spot_check")  # counts the cached path's own rows
def test_a_constant_fill_runs_its_encoder_on_one_row_per_measurement_and_again_when_the_weights_change() -> None:
    model = LateFusion().eval()
    engine = make_engine(modalities(), occlusion="zeros", encoders=ENCODERS)
    engine.run(model, batch(0))  # the first batch: one row for each constant fill (and the check)
    model.reset_counts()
    engine.run(model, batch(1))
    assert model.image_encoder.rows == N  # the clean rows only: the zeros row is kept
    with torch.no_grad():
        model.image_encoder.inner[0].weight.mul_(1.5)  # an optimizer step: the kept row is stale
    model.reset_counts()
    actual = engine.run(model, batch(2))
    assert model.image_encoder.rows == N + 1
    expected = make_engine(modalities(), occlusion="zeros").run(model, batch(2))
    assert_same_numbers(actual.occluded, expected.occluded)
    engine.cache.check_again()  # a new measurement: computed again
    model.reset_counts()
    engine.run(model, batch(2))
    assert model.image_encoder.rows > N + 1  # the row again, and the check's plain path


class TokensAndTable(nn.Module):
    """An embedding bag over token ids (0 pads) and an MLP over a table, fused by a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens_encoder = nn.EmbeddingBag(20, 6, mode="mean", padding_idx=0)
        self.table_encoder = nn.Linear(COLUMNS, 6)
        self.head = nn.Linear(12, 3)

    def forward(self, tokens: Tensor, table: Tensor) -> Tensor:
        return self.head(torch.cat([self.tokens_encoder(tokens), self.table_encoder(table)], dim=1))


def token_batch() -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(4)
    lengths = torch.tensor([6, 3, 5, 2, 6, 4])
    real = torch.arange(6)[None] < lengths[:, None]
    tokens = torch.where(real, torch.randint(1, 20, (N, 6), generator=generator), 0)
    word_ids = torch.where(real, torch.arange(6)[None] // 2, -1)  # words of two tokens
    table = torch.randn(N, COLUMNS, generator=generator)
    return {"tokens": tokens, "mask": real.long(), "word_ids": word_ids, "table": table}


@pytest.mark.parametrize(
    "builders",
    [
        (Tokens(6, attention_mask="mask"), ColumnGroups({"ab": [0, 1], "cd": [2, 3]})),
        (Words(3, word_ids="word_ids", attention_mask="mask"), CustomMasks([torch.tensor([True, False] * 2)], ["odd"])),
    ],
    ids=["tokens+column_groups", "words+custom_masks"],
)
def test_cached_encoders_give_the_plain_outputs_under_every_attribute_builder(builders) -> None:
    token_builder, table_builder = builders
    modalities_ = resolve_modalities(
        [
            Modality("tokens", key="tokens", occlusion=0, attributes=token_builder),
            Modality("table", key="table", occlusion="mean", attributes=table_builder),
        ]
    )
    model = TokensAndTable().eval()
    encoders = {"tokens": "tokens_encoder", "table": "table_encoder"}
    expected = make_engine(modalities_, max_batch_size=7).run(model, token_batch())
    actual = make_engine(modalities_, max_batch_size=7, encoders=encoders).run(model, token_batch())
    assert_same_numbers(actual.occluded, expected.occluded)


def test_a_recording_of_two_forward_calls_cannot_be_replayed_so_the_clean_batch_runs_again_with_a_warning() -> None:
    model = LateFusion().eval()
    engine = make_engine(modalities(), occlusion="mean", encoders=ENCODERS)
    with torch.no_grad(), engine.recording_encoders(model) as recording:
        clean = model(*batch())
        model(*batch())  # a validation step that runs the model twice
    with pytest.warns(UserWarning, match="'image_encoder' ran 2 times in 1 forward calls.*the clean batch runs again"):
        actual = engine.run(model, batch(), clean=clean, encoder_outputs=recording)
    expected = make_engine(modalities(), occlusion="mean").run(model, batch())
    assert_same_numbers(actual.occluded, expected.occluded)


@pytest.mark.usefixtures("no_spot_check")  # counts the cached path's own rows
def test_a_constant_fills_row_is_kept_across_measurements_while_the_weights_hold_their_values() -> None:
    model = LateFusion().eval()
    measurement = ContributionMeasurement(modalities(), occlusion="zeros", encoders=ENCODERS)
    measurement.update(model, batch(0))  # the check, and the zeros row of each encoder
    rows = []
    for change in (None, "data", None):
        if change == "data":
            model.image_encoder.inner[0].weight.data.copy_(torch.ones(3, 1, 3, 3))  # moves no version counter
        measurement.reset()
        model.reset_counts()
        measurement.update(model, batch(1))
        rows.append(model.image_encoder.rows)
    assert rows == [N, N + 1, N]  # the clean rows; after the write, the zeros row once more
    expected = ContributionMeasurement(modalities(), occlusion="zeros")
    expected.update(model, batch(1))
    assert_same_numbers(measurement.compute().raw, expected.compute().raw)
