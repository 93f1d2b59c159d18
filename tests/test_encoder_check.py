"""The safety check of ``encoders=`` runs once per fit on one row of each copy, replayed inputs are never copied, and
where caching cannot pay the plain path is chosen (from the first batch's clean pass and cached copies) and said
once."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from test_encoders import ENCODERS, FiLM, LateFusion, N, batch, modalities
from torch import Tensor

from lightning_mc import ContributionMeasurement, Modality, ModalityContributionMonitor
from lightning_mc.core import path_choice
from lightning_mc.core.encoder_cache import EncoderCache, check_copies
from lightning_mc.core.layout import Copy
from lightning_mc.masks import Columns

from helpers import TwoModalityNet, assert_same_numbers, loader, make_engine, trainer_kwargs, two_modality_dataset

COLUMNS = [
    Modality("image", key=0, occlusion="zeros"),
    Modality("table", key=1, occlusion="zeros", attributes=Columns()),
]


@pytest.fixture
def counted_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per safety check run, by any cache."""
    calls: list[int] = []
    check = EncoderCache._check

    def counting(self, *args, **kwargs):
        calls.append(1)
        return check(self, *args, **kwargs)

    monkeypatch.setattr(EncoderCache, "_check", counting)
    return calls


def test_the_monitor_checks_the_encoders_once_per_fit(tmp_path, counted_checks) -> None:
    monitor = ModalityContributionMonitor(
        {"image": 0, "table": 1}, encoders={"image": "image_branch", "table": "table_branch"}
    )
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_epochs=3))
    trainer.fit(TwoModalityNet(), loader(two_modality_dataset(16)), loader(two_modality_dataset(32, seed=1), 8))
    assert len(monitor.history) == 3 and len(counted_checks) == 1  # 3 checks of 4 batches each, one safety check
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(TwoModalityNet(), loader(two_modality_dataset(16)), loader(two_modality_dataset(32, seed=1), 8))
    assert len(counted_checks) == 2  # a new fit checks again


def test_a_measurement_checks_again_only_for_another_model(counted_checks) -> None:
    measurement = ContributionMeasurement(modalities(), encoders=ENCODERS)
    model = LateFusion().eval()
    for _ in range(2):
        measurement.reset()
        measurement.update(model, batch(0))
        measurement.update(model, batch(1))
    assert len(counted_checks) == 1
    other = LateFusion().eval()
    measurement.reset()
    measurement.update(other, batch(0))
    assert len(counted_checks) == 2


@pytest.mark.usefixtures("no_spot_check")  # counts the cached path's own rows
def test_the_check_runs_one_row_of_each_copy_on_samples_other_than_its_position() -> None:
    model = LateFusion().eval()
    engine = make_engine(modalities(attributes=True), occlusion="zeros", encoders=ENCODERS)
    engine.run(model, batch(0))
    first = model.head.rows
    model.reset_counts()
    engine.run(model, batch(1))
    copies = 4 + 4  # 4 image patches, 4 table columns
    # the check: one row of each copy through the plain path, and through the cached path with the inputs its
    # encoders replay stood in for by one expanded row and with their rows built (they must agree bit for bit)
    assert first - model.head.rows == 3 * copies
    # the k-th copy is checked on its (k + 1)-th sample: attribute copies' rows are not sample 0, 1, 2, ... in order
    subset = Copy("table/c1", frozenset({1}), torch.ones(1, 4, dtype=torch.bool), torch.tensor([0, 2, 5]))
    chosen = check_copies([Copy("image", frozenset({0})), subset, subset], N, torch.device("cpu"))
    assert [copy.samples.tolist() for copy in chosen] == [[1], [5], [0]]


@pytest.mark.parametrize("model_class", [FiLM], ids=["FiLM"])
def test_one_row_per_copy_still_refuses_an_encoder_that_reads_another_modality(model_class) -> None:
    engine = make_engine(modalities(attributes=True), occlusion="zeros", encoders=ENCODERS)
    with pytest.raises(ValueError, match="'table_encoder' \\(given for modality 'table'\\) is not an encoder"):
        engine.run(model_class().eval(), batch(0))


class StorageSpy(LateFusion):
    """Notes the rows of the image input of each forward call, their stride and the memory they are in."""

    def __init__(self, reads_image_outside: bool = False) -> None:
        super().__init__()
        self.calls: list[tuple[int, int, int]] = []
        self.reads_image_outside = reads_image_outside

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        self.calls.append((image.shape[0], image.stride(0), image.untyped_storage().data_ptr()))
        output = super().forward(image, table)
        return output + image.mean((1, 2, 3))[:, None] if self.reads_image_outside else output


@pytest.mark.usefixtures("no_spot_check")  # counts the cached path's own rows
def test_the_cached_path_builds_no_rows_of_inputs_it_replays() -> None:
    model = StorageSpy().eval()
    engine = make_engine(COLUMNS, encoders=ENCODERS)
    engine.run(model, batch(0))
    model.calls.clear()
    image = batch(1)[0]
    engine.run(model, (image, batch(1)[1]))
    # calls: the clean batch, the image copy (its zeros rows), the 4 table columns: 4 × N rows of the image that are
    # the batch's first row, expanded in place (stride 0, the batch's own memory: nothing copied)
    assert [rows for rows, _, _ in model.calls] == [N, N, 4 * N]
    assert model.calls[-1][1:] == (0, image.untyped_storage().data_ptr())
    assert model.calls[1][1] == 0  # the image copy's zeros: the fill's row, expanded (its encoder runs it once)
    plain = make_engine(COLUMNS)
    assert_same_numbers(engine.run(model, batch(1)).occluded, plain.run(model, batch(1)).occluded)


def test_a_model_that_reads_a_replayed_input_outside_its_encoder_gets_its_rows_built() -> None:
    model = StorageSpy(reads_image_outside=True).eval()
    engine = make_engine(COLUMNS, encoders=ENCODERS)
    actual = engine.run(model, batch(0))
    assert engine.cache is not None and not engine.cache.stand_ins
    expected = make_engine(COLUMNS).run(model, batch(0))
    assert_same_numbers(actual.occluded, expected.occluded)


def test_where_caching_does_not_pay_the_plain_path_is_chosen_and_said_once(monkeypatch) -> None:
    monkeypatch.setattr(path_choice, "PLAIN_IF_DEARER", 1.0)
    model = LateFusion().eval()
    measurement = ContributionMeasurement(modalities(), occlusion="zeros", encoders=ENCODERS)
    cache = measurement.engine.cache
    # the clean pass of the batch after the check takes 1 s (one forward call: the plain path runs the 2 copies' 2N
    # rows in one), its 2 cached copies 5 s
    ticks = iter([0.0, 1.0, 10.0, 15.0])  # read on that batch only: no batch runs the plain path to be timed
    cache.choice.clock = lambda: next(ticks)
    with pytest.warns(UserWarning, match="the encoders are too small for caching to pay") as said:
        measurement.update(model, batch(0))  # the check
        measurement.update(model, batch(1))  # the clean pass and the cached copies timed
        assert cache.choice.plain
        measurement.update(model, batch(2))
    assert cache.choice.plain and len([w for w in said if "caching to pay" in str(w.message)]) == 1
    model.reset_counts()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        measurement.update(model, batch(3))
    assert model.image_encoder.rows == model.table_encoder.rows == 3 * N  # every copy runs the whole model
    plain = ContributionMeasurement(modalities(), occlusion="zeros")
    for seed in range(4):
        plain.update(model, batch(seed))
    assert_same_numbers(measurement.compute().raw, plain.compute().raw)


def test_where_caching_pays_the_cached_path_is_kept(monkeypatch) -> None:
    monkeypatch.setattr(path_choice, "PLAIN_IF_DEARER", 1.0)
    model = LateFusion().eval()
    engine = make_engine(modalities(), occlusion="zeros", encoders=ENCODERS)
    ticks = iter([0.0, 5.0, 10.0, 11.0])  # the clean pass (as one plain call of 2N rows): 5 s; the cached copies: 1 s
    engine.cache.choice.clock = lambda: next(ticks)
    for seed in range(3):
        engine.run(model, batch(seed))
    model.reset_counts()
    engine.run(model, batch(3))
    assert not engine.cache.choice.plain
    assert (model.image_encoder.rows, model.table_encoder.rows) == (N, N)


def test_with_the_clean_pass_given_the_batch_after_the_first_times_the_plain_path(monkeypatch) -> None:
    monkeypatch.setattr(path_choice, "PLAIN_IF_DEARER", 1.0)
    model = LateFusion().eval()
    engine = make_engine(modalities(), occlusion="zeros", encoders=ENCODERS)
    # no clean pass of the engine's own (reuse_outputs): batch 1's 2 cached copies (2N rows) take 5 s, batch 2 on the
    # plain path 1 s for its 2N rows (batch 0 is the check's, never timed)
    ticks = iter([0.0, 5.0, 10.0, 11.0])
    engine.cache.choice.clock = lambda: next(ticks)
    rows = []
    with pytest.warns(UserWarning, match="µs on the next batch: the encoders are too small for caching to pay"):
        for seed in range(4):
            with torch.no_grad(), engine.recording_encoders(model) as recording:
                clean = model(*batch(seed))  # what the validation step computes
            model.reset_counts()
            engine.run(model, batch(seed), clean=clean, encoder_outputs=recording)
            rows.append((engine.cache.choice.plain, model.image_encoder.rows, model.table_encoder.rows))
    assert [plain for plain, _, _ in rows[:2]] == [False, False]
    assert rows[2:] == [(True, 2 * N, 2 * N)] * 2  # the plain path from batch 2 on: every copy runs the whole model
