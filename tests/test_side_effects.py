"""The monitor leaves no trace: batch, module modes, requires_grad, gradients, RNG streams and memory are untouched."""

import gc
import random
import weakref
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_mc import Modality, ModalityContributionMonitor
from lightning_mc.core.occlusion import AttributeMasks

from helpers import TwoModalityNet, loader, make_engine, trainer_kwargs, two_modality_dataset

MODALITIES = {"image": 0, "table": 1}


class DropoutNet(TwoModalityNet):
    """Dropout draws from the global RNG in training: any draw the monitor took would change the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.3)
        self.frozen = nn.Linear(5, 5)  # frozen and kept in eval by the user
        self.frozen.requires_grad_(False)

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return self.image_branch(self.dropout(image)) + self.table_branch(self.frozen(table))

    def on_train_epoch_start(self) -> None:
        self.frozen.eval()


class Columns:
    """Each table column is an attribute."""

    def __call__(self, value: Tensor) -> AttributeMasks:
        masks = torch.eye(value.shape[1], dtype=torch.bool).unsqueeze(1)
        return AttributeMasks(masks, tuple(f"c{i}" for i in range(value.shape[1])))


@pytest.mark.parametrize("fill", ["zeros", "mean", "noise", "permute", -9.0, lambda v: v.flip(0)])
def test_the_batch_is_bit_identical_and_the_global_rngs_untouched_after_the_engine(fill) -> None:
    batch = {"image": torch.randn(6, 1, 8, 8), "table": torch.randn(6, 5), "label": torch.arange(6), "meta": "x"}
    before = {key: value.clone() for key, value in batch.items() if isinstance(value, Tensor)}
    pointers = {key: value.data_ptr() for key, value in batch.items() if isinstance(value, Tensor)}
    modalities = [Modality("image", key="image"), Modality("table", key="table", attributes=Columns())]
    engine = make_engine(modalities, occlusion=fill, max_batch_size=10)
    model = TwoModalityNet()
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    engine.run(model, batch)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    assert set(batch) == {"image", "table", "label", "meta"}
    for key, value in before.items():
        assert torch.equal(batch[key], value)
        assert batch[key].data_ptr() == pointers[key]


def test_modes_requires_grad_and_gradients_are_restored_by_the_engine() -> None:
    model = DropoutNet()
    model.train()
    model.frozen.eval()
    model(torch.randn(4, 1, 8, 8), torch.randn(4, 5)).sum().backward()
    modes = [m.training for m in model.modules()]
    requires = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    make_engine(MODALITIES).run(model, (torch.randn(4, 1, 8, 8), torch.randn(4, 5)))
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == requires
    for grad, p in zip(grads, model.parameters()):
        assert (grad is None and p.grad is None) or torch.equal(grad, p.grad)


class Snapshot(L.Callback):
    """Before the monitor: the batch, modes, requires_grad and gradients as validation left them."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.batch = {key: value.clone() for key, value in batch.items()}
        self.modes = [m.training for m in pl_module.modules()]
        self.requires = [p.requires_grad for p in pl_module.parameters()]
        self.grads = [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()]


class Check(L.Callback):
    """After the monitor: everything the snapshot saw is unchanged."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.checked = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        assert batch.keys() == self.snapshot.batch.keys()
        assert all(torch.equal(batch[key], value) for key, value in self.snapshot.batch.items())
        assert [m.training for m in pl_module.modules()] == self.snapshot.modes
        assert [p.requires_grad for p in pl_module.parameters()] == self.snapshot.requires
        for grad, p in zip(self.snapshot.grads, pl_module.parameters()):
            assert (grad is None and p.grad is None) or torch.equal(grad, p.grad)
        self.checked += 1


def _dict_loader(num_samples: int, seed: int, shuffle: bool = False) -> DataLoader:
    image, table, label = two_modality_dataset(num_samples, seed=seed).tensors
    samples = [{"image": image[i], "table": table[i], "label": label[i]} for i in range(num_samples)]
    return DataLoader(samples, batch_size=8, shuffle=shuffle)


class DictDropoutNet(DropoutNet):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return super().training_step((batch["image"], batch["table"], batch["label"]), batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step((batch["image"], batch["table"], batch["label"]), batch_idx)


def _seeded_fit(tmp_path, callbacks: list[L.Callback]) -> DictDropoutNet:
    L.seed_everything(7)
    model = DictDropoutNet()
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=3))
    trainer.fit(model, _dict_loader(40, seed=0, shuffle=True), _dict_loader(24, seed=1))
    return model


def test_a_seeded_fit_ends_with_identical_weights_with_and_without_the_monitor(tmp_path) -> None:
    without = _seeded_fit(tmp_path, [])
    snapshot = Snapshot()
    check = Check(snapshot)
    monitor = ModalityContributionMonitor(  # both fills that draw random numbers (from the monitor's own generator)
        [
            Modality("image", key="image", occlusion="noise"),
            Modality("table", key="table", occlusion="permute", attributes=Columns()),
        ]
    )
    with_monitor = _seeded_fit(tmp_path, [snapshot, monitor, check])
    assert check.checked == 9  # 3 epochs × 3 validation batches, each checked after the monitor ran
    assert len(monitor.history) == 3
    for name, weight in without.state_dict().items():
        assert torch.equal(weight, with_monitor.state_dict()[name]), name


def test_nothing_the_check_computed_outlives_it(tmp_path) -> None:
    alive: list[weakref.ref] = []

    def forward(pl_module: L.LightningModule, batch: Any) -> Tensor:
        output = pl_module(batch[0], batch[1])
        alive.append(weakref.ref(output))
        return output

    class AfterEpoch(L.Callback):
        def __init__(self) -> None:
            self.leftovers: list[int] = []

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            gc.collect()
            self.leftovers.append(sum(ref() is not None for ref in alive))

    monitor = ModalityContributionMonitor(MODALITIES, forward_fn=forward, max_batch_size=8)
    after = AfterEpoch()
    trainer = L.Trainer(callbacks=[monitor, after], **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(TwoModalityNet(), loader(two_modality_dataset(32)), loader(two_modality_dataset(16, seed=1), 8))
    assert len(alive) == 2 * 2 * 3  # 2 epochs × 2 batches × (clean + 2 occluded copies of 8 rows)
    assert after.leftovers == [0, 0]
    assert monitor.measurement.num_updates == 0
    assert all(isinstance(value, float) for value in monitor.history[-1]["shares"].values())
