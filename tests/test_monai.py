"""MONAI ``MetaTensor`` batches (``monai.data.DataLoader`` + dict transforms) measure as plain tensors do.

A MONAI ``DataLoader`` collates its samples into batched ``MetaTensor``s whose metadata hold one entry per sample.
The engine lays out ``(copies · N)`` rows, ``(h, N, L)`` masks and ``(copies, N, C)`` outputs, so it works on plain
views and hands each forward call a ``MetaTensor`` again, with each row's own metadata. These tests check the
numbers (a planted voxel, pixel and column found in their patch; the numbers of the same batches as plain tensors,
to float32 rounding, for every fill and mask builder), what the model receives, the monitor in a Trainer, and two
DDP processes.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.networks.nets import Regressor
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, ScaleIntensityd
from torch import Tensor, nn

from lightning_mc import Modality, ModalityContributionMonitor
from lightning_mc.core.occlusion import plain_tensor, rows_like
from lightning_mc.functional import modality_contribution
from lightning_mc.masks import ColumnGroups, Columns, CustomMasks, Patches2d, Patches3d, Tokens, Words

from helpers import Lambda, assert_same_numbers, load_example, trainer_kwargs

IMAGE_KEYS = ["volume", "slice"]
TENSOR_KEYS = ["volume", "slice", "table", "tokens", "attention_mask", "word_ids"]
#: The planted model reads one voxel, one pixel and one column, with these weights.
VOXEL, PIXEL, COLUMN = (5, 1, 6), (2, 7), 2
WEIGHTS = {"volume": 2.0, "slice": 3.0, "table": -1.0}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the tensors are tiny, and on a busy 2-core machine two threads made tests 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def monai_dataset(num_samples: int = 10, seed: int = 0) -> Dataset:
    """A MONAI ``Dataset`` of dicts: an 8³ volume (per-sample affine), an 8×8 slice, 4 columns, padded tokens."""
    rng = np.random.default_rng(seed)
    items = []
    for k in range(num_samples):
        length = 2 + k % 4  # 2..5 real tokens of 6
        tokens = np.zeros(6, dtype=np.int64)
        tokens[:length] = rng.integers(1, 10, size=length)
        affine = torch.diag(torch.tensor([k + 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))  # sample k's marker
        items.append(
            {
                "volume": MetaTensor(torch.tensor(rng.normal(size=(8, 8, 8)), dtype=torch.float32), affine=affine),
                "slice": rng.normal(size=(8, 8)).astype(np.float32),
                "table": rng.normal(size=(4,)).astype(np.float32),
                "tokens": tokens,
                "attention_mask": (tokens > 0).astype(np.int64),
                "word_ids": np.where(tokens > 0, np.arange(6) // 2, -1),  # two tokens a word, -1 on padding
                "sample": k,
            }
        )
    transform = Compose(
        [
            EnsureChannelFirstd(keys=IMAGE_KEYS, channel_dim="no_channel"),
            ScaleIntensityd(keys=IMAGE_KEYS),
            EnsureTyped(keys=TENSOR_KEYS),
        ]
    )
    return Dataset(items, transform)


def monai_loader(num_samples: int = 10, batch_size: int = 4, seed: int = 0) -> DataLoader:
    return DataLoader(monai_dataset(num_samples, seed), batch_size=batch_size, shuffle=False)


def as_plain(batch: dict[str, Any]) -> dict[str, Any]:
    """The same batch with every MetaTensor as a plain tensor (a copy of its data)."""
    return {key: value.as_tensor().clone() if isinstance(value, MetaTensor) else value for key, value in batch.items()}


class PlantedModel(nn.Module):
    """Reads one voxel of the volume, one pixel of the slice and one column of the table: nothing else."""

    def forward(self, volume: Tensor, slice_: Tensor, table: Tensor) -> Tensor:
        d, r, c = VOXEL
        return (
            WEIGHTS["volume"] * volume[:, 0, d, r, c : c + 1]
            + WEIGHTS["slice"] * slice_[:, 0, PIXEL[0], PIXEL[1] : PIXEL[1] + 1]
            + WEIGHTS["table"] * table[:, COLUMN : COLUMN + 1]
        )


class FusedNet(nn.Module):
    """A MONAI 3-D ``Regressor`` on the volume, a 2-D conv on the slice, an MLP on the table, embedded tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.volume = Regressor(in_shape=(1, 8, 8, 8), out_shape=(3,), channels=(4, 8), strides=(2, 2))
        self.slice = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(128, 3))
        self.table = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.embedding = nn.Embedding(10, 3)

    def forward(self, volume: Tensor, slice_: Tensor, table: Tensor, tokens: Tensor) -> Tensor:
        return self.volume(volume) + self.slice(slice_) + self.table(table) + self.embedding(tokens).mean(1)


def fused_modalities(attributes: bool, occlusion: Any) -> list[Modality]:
    """The four modalities; the token ids take the pad id 0 unless the fill is defined for integers."""
    token_fill = occlusion if occlusion in ("zeros", "permute") else 0
    return [
        Modality("volume", key="volume", attributes=Patches3d((4, 4, 4)) if attributes else None),
        Modality("slice", key="slice", attributes=Patches2d((4, 4)) if attributes else None),
        Modality(
            "table", key="table", attributes=ColumnGroups({"ab": [0, 1], "c": [2], "d": [3]}) if attributes else None
        ),
        Modality(
            "tokens",
            key="tokens",
            occlusion=token_fill,
            attributes=Tokens(6, attention_mask="attention_mask") if attributes else None,
        ),
    ]


def halve(value: Tensor) -> Tensor:
    """A user fill: half the value."""
    return value / 2


FILLS = ["zeros", "mean", 0.5, "noise", "permute", halve]


def _result_numbers(result) -> dict[str, Any]:
    return {
        "shares": result.shares,
        "raw": result.raw,
        "attribute_raw": result.attribute_raw,
        "attribute_shares": result.attribute_shares,
        "num_samples": result.num_samples,
    }


@pytest.mark.parametrize("attributes", [False, True], ids=["whole", "attributes"])
@pytest.mark.parametrize("occlusion", FILLS, ids=lambda fill: getattr(fill, "__name__", repr(fill)))
def test_metatensor_batches_give_the_plain_tensor_numbers_for_every_fill_and_mask(attributes, occlusion) -> None:
    loader = monai_loader()
    batches = list(loader)
    assert all(isinstance(batch[key], MetaTensor) and batch[key].is_batch for batch in batches for key in TENSOR_KEYS)
    plain = [as_plain(batch) for batch in batches]
    assert not any(isinstance(batch[key], MetaTensor) for batch in plain for key in TENSOR_KEYS)
    model = FusedNet()
    kwargs = {"forward_fn": _fused_forward, "occlusion": occlusion, "output_transform": "softmax"}
    modalities = fused_modalities(attributes, occlusion)

    from_monai = modality_contribution(model, loader, modalities, **kwargs)
    from_plain = modality_contribution(model, plain, modalities, **kwargs)

    assert_same_numbers(_result_numbers(from_monai), _result_numbers(from_plain), "MetaTensor vs plain")
    assert from_monai.num_samples == 10
    assert all(raw > 0 for raw in from_monai.raw.values())
    if attributes:
        assert len(from_monai.attribute_raw["volume"]) == 8 and len(from_monai.attribute_raw["slice"]) == 4
        # padded token positions are never occluded: position 5 is padding in every sample
        assert from_monai.attribute_raw["tokens"]["t5"] == 0.0


@pytest.mark.parametrize("occlusion", ["mean", "permute"])
def test_words_and_custom_masks_on_metatensors_give_the_plain_tensor_numbers(occlusion) -> None:
    loader = monai_loader()
    plain = [as_plain(batch) for batch in loader]
    centre = torch.zeros(8, 8, 8, dtype=torch.bool)
    centre[2:6, 2:6, 2:6] = True
    modalities = [
        Modality("volume", key="volume", attributes=CustomMasks([centre, ~centre], ["centre", "border"])),
        Modality("slice", key="slice"),
        Modality("table", key="table", attributes=Columns()),
        Modality("tokens", key="tokens", occlusion="permute" if occlusion == "permute" else 0,
                 attributes=Words(3, word_ids="word_ids", attention_mask="attention_mask")),
    ]  # fmt: skip
    kwargs = {"forward_fn": _fused_forward, "occlusion": occlusion, "output_transform": "softmax"}
    from_monai = modality_contribution(FusedNet(), loader, modalities, **kwargs)
    from_plain = modality_contribution(FusedNet(), plain, modalities, **kwargs)

    assert _result_numbers(from_monai) == _result_numbers(from_plain)
    assert set(from_monai.attribute_raw["tokens"]) == {"w0", "w1", "w2"}
    assert from_monai.attribute_raw["volume"]["centre"] > 0 and from_monai.attribute_raw["tokens"]["w0"] > 0


def _fused_forward(model: FusedNet, batch: dict[str, Tensor]) -> Tensor:
    return model(batch["volume"], batch["slice"], batch["table"], batch["tokens"])


@pytest.mark.parametrize("occlusion", ["zeros", "mean"])
def test_a_planted_voxel_pixel_and_column_are_found_in_their_patch_exactly(occlusion) -> None:
    loader = monai_loader()
    modalities = [
        Modality("volume", key="volume", attributes=Patches3d((4, 4, 4))),
        Modality("slice", key="slice", attributes=Patches2d((4, 4))),
        Modality("table", key="table", attributes=Columns(names=["a", "b", "c", "d"])),
    ]
    result = modality_contribution(PlantedModel(), loader, modalities, occlusion=occlusion)

    planted = {"volume": "d1r0c1", "slice": "r0c1", "table": "c"}  # (5, 1, 6) // 4, (2, 7) // 4, column 2
    for name, attribute in planted.items():
        shares = result.attribute_shares[name]
        # the whole of the modality's share, in that one patch (a patch copy and the whole-modality copy: other rows)
        assert_same_numbers(shares[attribute], result.shares[name], f"{name} share of {attribute}")
        assert_same_numbers(result.attribute_raw[name][attribute] / result.raw[name], 1.0, f"{name} raw ratio")
        assert all(share == 0.0 for other, share in shares.items() if other != attribute)
    # independent computation: raw = mean over samples of |w · (x − fill(x))| at the planted element
    data = [monai_dataset()[k] for k in range(10)]
    element = {"volume": (0, *VOXEL), "slice": (0, *PIXEL), "table": (COLUMN,)}
    for name, index in element.items():
        x = torch.stack([sample[name].as_tensor() for sample in data])
        fill = torch.zeros(10) if occlusion == "zeros" else x.reshape(10, -1).mean(1)
        expected = (WEIGHTS[name] * (x[(slice(None), *index)] - fill)).abs().mean()
        assert result.raw[name] == pytest.approx(expected.item(), rel=1e-6)


class Recorder(nn.Module):
    """Wraps the fused net and records, for each forward call, what the model received."""

    def __init__(self) -> None:
        super().__init__()
        self.net = FusedNet()
        self.calls: list[dict[str, Any]] = []

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        volume = batch["volume"]
        self.calls.append(
            {
                "types": {key: type(batch[key]) for key in TENSOR_KEYS},
                "is_batch": volume.is_batch,
                "affine_marker": volume.meta["affine"][:, 0, 0].tolist(),
                "sample": batch["sample"].tolist(),
                "volume": volume.as_tensor().clone(),
                "meta": volume.meta,
            }
        )
        return self.net(volume, batch["slice"], batch["table"], batch["tokens"])


def test_the_model_receives_metatensors_with_each_rows_own_metadata_and_the_users_clean_rows() -> None:
    batch = next(iter(monai_loader(batch_size=4)))
    recorder = Recorder()
    modalities = fused_modalities(attributes=True, occlusion="mean")
    modality_contribution(recorder, [batch], modalities, forward_fn=lambda model, b: model(b), occlusion="mean")

    # clean + 8 + 4 + 3 attribute copies of 4 rows, and one row per real token (padding is not run), 16 rows a call
    rows = 4 * (1 + 8 + 4 + 3) + int(batch["attention_mask"].sum())
    assert int(batch["attention_mask"].sum()) < 4 * 6  # the batch has padding, so token copies skip rows
    assert sum(len(call["sample"]) for call in recorder.calls) == rows
    assert len(recorder.calls) == -(-rows // 16)
    for call in recorder.calls:
        assert set(call["types"].values()) == {MetaTensor} and call["is_batch"]
        # every row, clean or occluded, carries the metadata of the sample it was made from (affine[0, 0] = k + 1)
        assert call["affine_marker"] == [sample + 1.0 for sample in call["sample"]]
        assert len(call["meta"]["space"]) == len(call["sample"])
    first = recorder.calls[0]
    assert first["sample"][:4] == [0, 1, 2, 3]
    assert torch.equal(first["volume"][:4], batch["volume"].as_tensor())  # the clean rows are the user's values

    # one copy per call: the clean call gets the user's batch as it is, metadata included
    recorder.calls.clear()
    modality_contribution(
        recorder, [batch], modalities, forward_fn=lambda model, b: model(b), occlusion="mean", max_batch_size=4
    )
    clean = recorder.calls[0]
    assert torch.equal(clean["volume"], batch["volume"].as_tensor())
    assert set(clean["meta"]) == set(batch["volume"].meta)
    assert torch.equal(clean["meta"]["affine"], batch["volume"].meta["affine"])
    assert clean["meta"]["space"] == batch["volume"].meta["space"]
    assert isinstance(batch["volume"], MetaTensor) and batch["volume"].meta["affine"].shape == (4, 4, 4)  # untouched


class MonaiModule(L.LightningModule):
    """The fused net in Lightning, on MONAI dict batches; ``validation_step`` returns the prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.net = FusedNet()

    def forward(self, volume: Tensor, slice_: Tensor, table: Tensor, tokens: Tensor) -> Tensor:
        return self.net(volume, slice_, table, tokens)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return _fused_forward(self, batch).logsumexp(1).mean()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return _fused_forward(self, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def monitors() -> list[ModalityContributionMonitor]:
    """Two monitors on one Trainer: one runs the clean pass, one reuses the validation step's MetaTensor output."""
    modalities = fused_modalities(attributes=True, occlusion="mean")
    return [
        ModalityContributionMonitor(modalities, forward_fn=_fused_forward, output_transform="softmax"),
        ModalityContributionMonitor(
            modalities, forward_fn=_fused_forward, output_transform="softmax", prefix="reuse", reuse_outputs=True
        ),
    ]


def test_the_monitor_in_a_trainer_measures_metatensor_batches_as_the_functional_api_does(tmp_path) -> None:
    model = MonaiModule()
    trainer = L.Trainer(callbacks=monitors(), **trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=2))
    trainer.fit(model, monai_loader(8, seed=1), monai_loader(10, seed=2))

    plain = [as_plain(batch) for batch in monai_loader(10, seed=2)]
    expected = modality_contribution(
        model.net,
        plain,
        fused_modalities(attributes=True, occlusion="mean"),
        forward_fn=lambda net, b: net(b["volume"], b["slice"], b["table"], b["tokens"]),
        output_transform="softmax",
    )
    logged = {key: value.item() for key, value in trainer.callback_metrics.items()}
    for prefix in ("mc", "reuse"):
        for name in ("volume", "slice", "table", "tokens"):
            assert_same_numbers(logged[f"{prefix}/share/{name}"], expected.shares[name], f"{prefix}/share/{name}")
            assert_same_numbers(logged[f"{prefix}/raw/{name}"], expected.raw[name], f"{prefix}/raw/{name}")
        for patch, share in expected.attribute_shares["volume"].items():
            assert_same_numbers(logged[f"{prefix}/attr/volume/{patch}"], share, f"{prefix}/attr/volume/{patch}")


class RecordRank(L.Callback):
    """After the monitor: each rank writes what it logged and rank 0 the final weights."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        logged = {key: value.item() for key, value in trainer.callback_metrics.items() if key.startswith("mc/")}
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(logged))

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), self.directory / "weights.pt")


def test_two_ddp_processes_on_metatensor_batches_log_the_single_process_numbers(tmp_path) -> None:
    monitor = ModalityContributionMonitor(
        fused_modalities(attributes=True, occlusion="mean"), forward_fn=_fused_forward, output_transform="softmax"
    )
    trainer = L.Trainer(
        callbacks=[monitor, RecordRank(tmp_path)],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=1, limit_train_batches=1),
    )
    # 9 validation samples: DistributedSampler gives each rank 5, rank 1's last a repeat that must not count
    trainer.fit(MonaiModule(), monai_loader(8, seed=1), monai_loader(9, batch_size=3, seed=2))

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == pytest.approx(ranks[1], abs=1e-7) and set(ranks[0]) == set(ranks[1])
    model = MonaiModule()
    model.load_state_dict(torch.load(tmp_path / "weights.pt"))
    single = modality_contribution(
        model, monai_loader(9, batch_size=3, seed=2), monitor.modalities, forward_fn=_fused_forward,
        output_transform="softmax",
    )  # fmt: skip
    for name in ("volume", "slice", "table", "tokens"):
        assert_same_numbers(ranks[0][f"mc/share/{name}"], single.shares[name], f"mc/share/{name}")
        assert_same_numbers(ranks[0][f"mc/raw/{name}"], single.raw[name], f"mc/raw/{name}")


# bad and unusual inputs ----------------------------------------------------------------------------------------------


def test_a_metatensor_whose_batched_metadata_do_not_split_warns_and_still_measures_the_plain_numbers() -> None:
    volume = MetaTensor(torch.randn(4, 1, 8, 8, 8), meta={"affine": torch.eye(4).repeat(3, 1, 1)})  # 3 for 4 samples
    volume.is_batch = True
    batch = {"volume": volume, "table": torch.randn(4, 4)}
    modalities = [Modality("volume", key="volume", attributes=Patches3d((4, 4, 4))), Modality("table", key="table")]
    model = lambda v, t: v.flatten(1)[:, :5].sum(1, keepdim=True) + t[:, :1]  # noqa: E731

    with pytest.warns(UserWarning, match=r"MetaTensor of shape \(4, 1, 8, 8, 8\) has metadata that do not split"):
        result = modality_contribution(Lambda(model), [batch], modalities)
    plain = modality_contribution(Lambda(model), [{**batch, "volume": volume.as_tensor()}], modalities)
    assert _result_numbers(result) == _result_numbers(plain)
    # the batch itself is broken: MONAI's own slice of its rows 2:4 raises
    with pytest.raises(ValueError, match="Inconsistent batched metadata"):
        volume[2:4]


class Tagged(torch.Tensor):
    """A stateless subclass: torch's own operations keep it."""


class Stateful(torch.Tensor):
    """A subclass with state that its ``__torch_function__`` needs: it cannot be rebuilt from plain rows."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if any(isinstance(a, Stateful) and not hasattr(a, "unit") for a in args):
            raise RuntimeError("a Stateful tensor lost its unit")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_other_tensor_subclasses_measure_as_plain_tensors_and_reach_the_model_as_torch_would_give_them() -> None:
    received: list[type] = []

    def model(image: Tensor, table: Tensor) -> Tensor:
        received.append(type(image))
        return image.flatten(1)[:, :3].sum(1, keepdim=True) * table[:, :1]

    image, table = torch.randn(4, 1, 4, 4), torch.randn(4, 3)
    modalities = [
        Modality("image", key=0, attributes=Patches2d((2, 2))),
        Modality("table", key=1, attributes=Columns()),
    ]
    plain = modality_contribution(Lambda(model), [(image, table)], modalities)
    tagged = modality_contribution(Lambda(model), [(image.as_subclass(Tagged), table)], modalities)
    assert set(received[len(received) // 2 :]) == {Tagged}
    stateful = image.as_subclass(Stateful)
    stateful.unit = "HU"
    received.clear()
    with_state = modality_contribution(Lambda(model), [(stateful, table)], modalities)
    assert set(received) == {torch.Tensor}  # plain rows: a Stateful rebuilt without its unit would raise
    assert _result_numbers(tagged) == _result_numbers(plain) == _result_numbers(with_state)


def test_plain_views_share_storage_and_rows_like_rebuilds_metadata_of_the_rows_samples() -> None:
    batch = next(iter(monai_loader(batch_size=4)))
    volume = batch["volume"]
    view = plain_tensor(volume)
    assert type(view) is torch.Tensor and view.data_ptr() == volume.data_ptr()
    rows = torch.cat([view[2:4], view[0:1]])
    rebuilt = rows_like(volume, rows, [(2, 4), (0, 1)])
    assert isinstance(rebuilt, MetaTensor) and rebuilt.is_batch
    assert rebuilt.meta["affine"][:, 0, 0].tolist() == [3.0, 4.0, 1.0]
    assert [op for op in rebuilt.applied_operations] == [volume.applied_operations[i] for i in (2, 3, 0)]
    # a MetaTensor that is not a batch: every row gets a copy of its one metadata dict
    single = MetaTensor(torch.zeros(3, 2), affine=torch.diag(torch.tensor([7.0, 1, 1, 1])))
    copied = rows_like(single, torch.ones(5, 2), [(0, 3), (0, 2)])
    assert isinstance(copied, MetaTensor) and not copied.is_batch and copied.affine[0, 0] == 7.0
    assert copied.meta is not single.meta
    # a batch built by hand, with one affine per sample and no applied_operations recorded: split without a warning
    affines = torch.diag_embed(torch.tensor([[1.0, 1, 1, 1], [2.0, 1, 1, 1], [3.0, 1, 1, 1]], dtype=torch.float64))
    hand = MetaTensor(torch.zeros(3, 2), meta={"affine": affines})
    hand.is_batch = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rebuilt = rows_like(hand, torch.ones(4, 2), [(2, 3), (0, 3)])
    assert rebuilt.meta["affine"][:, 0, 0].tolist() == [3.0, 1.0, 2.0, 3.0] and rebuilt.applied_operations == []
    # masks built from a MetaTensor (a padding mask of a MONAI batch) are kept as plain tensors: their first
    # dimension counts attributes, not the samples MONAI's metadata belong to
    padding = next(iter(monai_loader(batch_size=4)))["attention_mask"]
    masks = Tokens(6, attention_mask="attention_mask")(plain_tensor(padding), batch={"attention_mask": padding})
    assert isinstance(padding, MetaTensor) and type(masks.masks) is torch.Tensor and masks.masks.shape == (6, 4, 6)


def test_example_runs_quick_and_its_patch_maps_find_the_lesions(tmp_path, capsys) -> None:
    example = load_example("monai_ct_clinical")
    example.main(["--quick", "--log-dir", str(tmp_path)])  # sets one intra-op thread: _one_thread restores it
    out = capsys.readouterr().out

    assert "batches: monai.data.meta_tensor.MetaTensor (16, 1, 24, 24, 24)" in out
    rows = [line.split("|") for line in out.splitlines() if line[:5].strip().isdigit() and "|" in line]
    assert [int(row[0]) for row in rows] == [0, 1, 2]  # one row per epoch of the quick run
    for row in rows:
        ct, clinical = float(row[1]), float(row[2])
        assert ct + clinical == pytest.approx(1.0, abs=2e-3)  # printed with 3 decimals
        assert sum(float(value) for value in row[5].split()) == pytest.approx(clinical, abs=4e-3)
    # the top-3 patches of the quick model's maps hold lesion voxels far more often than a random map's would
    line = next(line for line in out.splitlines() if line.startswith("top-3 hit="))
    top, chance = (float(part.split("=")[1]) for part in line.split()[1:3])
    assert chance == pytest.approx(0.180, abs=1e-3)  # from the lesion masks alone: 46 of 4 x 64 patches
    assert top >= 2 * chance
    assert list(tmp_path.rglob("events.out.tfevents.*"))
