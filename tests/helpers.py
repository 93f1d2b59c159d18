"""Tiny models and data shared by the tests (importable by ddp_spawn workers)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import torch
import torch.distributed
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mc.analyses.options import MeasurementOptions
from lightning_mc.core.engine import OcclusionEngine
from lightning_mc.core.modality import ModalitiesSpec, resolve_modalities
from lightning_mc.functional import modality_contribution

NUM_CLASSES = 3

#: Relative tolerance of :func:`assert_same_numbers`: about 80 float32 ulps (eps = 1.2e-7). Two computations of the
#: same number (other chunk sizes, other entry points, MetaTensor or plain, two processes, another library) add the
#: same float32 terms in another order or through other BLAS/SIMD kernels; over the few hundred samples and classes a
#: test uses that moves a share or a raw value by a few ulps. Measured with ``MKL_ENABLE_INSTRUCTIONS=SSE4_2
#: ATEN_CPU_CAPABILITY=default``: of the suite's 419 comparisons 54 were not bit-equal, by at most 5.4e-7 relative and
#: 1.2e-7 absolute (a float32 logged value against a float64 result included), so 1e-5 leaves a factor of ~20. A real
#: mistake (a sample counted twice or missed, a wrong fill, a wrong row) moves a number by 1e-3 or more.
FLOAT32_RTOL = 1e-5
#: Absolute tolerance of :func:`assert_same_numbers`, for values at or near 0 (a raw value of a modality the model
#: barely reads, a difference of two nearly equal probabilities): float32 rounding of outputs of size ~1 is ~6e-8 per
#: operation, and a mean of absolute differences of such outputs stays below 1e-6.
FLOAT32_ATOL = 1e-6


#: The modalities of :class:`TwoModalityNet`'s ``(image, table, label)`` batches.
MODALITIES = {"image": 0, "table": 1}


class TwoModalityNet(L.LightningModule):
    """An image branch (1×8×8) and a table branch (5 columns), summed into ``NUM_CLASSES`` logits."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.image_branch = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, NUM_CLASSES)
        )
        self.table_branch = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, NUM_CLASSES))

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return self.image_branch(image) + self.table_branch(table)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        image, table, label = batch
        return nn.functional.cross_entropy(self(image, table), label)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        image, table, label = batch
        self.log("val_loss", nn.functional.cross_entropy(self(image, table), label))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def fit_then_measure_offline(
    tmp_path: Path,
    monitor: L.Callback,
    modalities: ModalitiesSpec,
    options: Mapping[str, Any],
    *,
    num_train: int,
    num_val: int,
    max_epochs: int,
) -> tuple[L.Trainer, TwoModalityNet, Any]:
    """Fit a seeded :class:`TwoModalityNet` under ``monitor``, then measure its final weights with the functional API.

    The model trains on ``two_modality_dataset(num_train)`` and validates on ``two_modality_dataset(num_val, seed=1)``;
    :func:`~lightning_mc.functional.modality_contribution` measures the same validation samples with ``options``
    (a metric object of their own, not the monitor's). Returns the trainer, the model and the functional result.
    """
    torch.manual_seed(0)
    model = TwoModalityNet()
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_epochs=max_epochs))
    trainer.fit(model, loader(two_modality_dataset(num_train)), loader(two_modality_dataset(num_val, seed=1)))
    offline = modality_contribution(model, loader(two_modality_dataset(num_val, seed=1)), modalities, **options)
    return trainer, model, offline


class CountingForward:
    """A ``forward_fn`` for two-input batches that counts the forward calls and the model rows the monitor runs.

    Importable by ``ddp_spawn`` workers, so each rank can report its own counts.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.rows = 0

    def __call__(self, model: nn.Module, batch: Any) -> Any:
        self.calls += 1
        self.rows += batch[0].shape[0]
        return model(batch[0], batch[1])


class LinearSum(nn.Module):
    """``a(a) + weight_b · b(b)`` with ``a``, ``b`` linear maps to ``outputs`` values (``weight_b=0``: ``b`` unread)."""

    def __init__(self, a_features: int, b_features: int, outputs: int, weight_b: float = 1.0) -> None:
        super().__init__()
        self.a = nn.Linear(a_features, outputs)
        self.b = nn.Linear(b_features, outputs)
        self.weight_b = weight_b

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.a(a) + self.weight_b * self.b(b)


def make_engine(modalities: ModalitiesSpec, **options: Any) -> OcclusionEngine:
    """An engine with ``options`` resolved as a measurement resolves them (monitor → measurement → engine)."""
    return OcclusionEngine(resolve_modalities(modalities), MeasurementOptions(**options).engine)


def coalition_outputs(
    engine: OcclusionEngine, model: nn.Module, batch: Any, coalitions: list[frozenset[int]]
) -> tuple[Tensor, Tensor]:
    """``(clean (N, C), occluded (N, K, C))``: the outputs with each of ``coalitions`` occluded, in their order."""
    outputs = engine.run(model, batch, coalitions=coalitions)
    return outputs.clean, torch.stack([outputs.coalitions[members] for members in coalitions], dim=1)


def two_modality_dataset(num_samples: int = 48, seed: int = 0) -> TensorDataset:
    """Images, tables and labels where both modalities carry some signal about the label."""
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
    image = torch.randn(num_samples, 1, 8, 8, generator=generator)
    image[:, 0, label, :] += 1.0  # rows 0..2 light up with the class
    table = torch.randn(num_samples, 5, generator=generator)
    table[torch.arange(num_samples), label] += 1.0
    return TensorDataset(image, table, label)


def planted_dataset(num_samples: int, seed: int = 0, image: float = 2.0, table: float = 0.0) -> TensorDataset:
    """Images, tables and labels where each modality carries a planted amount of the label (0: it is pure noise).

    The image's pixel row ``label`` and the table's column ``label`` are shifted by ``image`` and ``table``.
    """
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
    images = torch.randn(num_samples, 1, 8, 8, generator=generator)
    images[torch.arange(num_samples), 0, label, :] += image
    tables = torch.randn(num_samples, 5, generator=generator)
    tables[torch.arange(num_samples), label] += table
    return TensorDataset(images, tables, label)


def loader(dataset: TensorDataset, batch_size: int = 16) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


class CleanExitDDPSpawn(DDPStrategy):
    """Lightning's ``"ddp_spawn"`` strategy, whose workers destroy their process group before they exit.

    With torch 2.13 and gloo a ``ddp_spawn`` worker that exits with its process group alive sometimes dies in the
    interpreter's shutdown with ``terminate called without an active exception`` (SIGABRT), after the fit finished;
    a plain Lightning fit with no lightning-mc callback does it too (upstream behaviour, see
    docs/how-to/ddp-mixed-precision.md). Destroying the group in the worker's teardown ends it cleanly. The strategy's
    teardown is the last place Lightning talks to the group: what runs after it (``on_fit_end``, the callbacks'
    ``teardown``) runs on each rank alone.
    """

    strategy_name = "ddp_spawn_clean_exit"

    def __init__(self) -> None:
        super().__init__(start_method="spawn")

    def teardown(self) -> None:
        """Lightning's teardown, then the process group destroyed (in a worker; the parent process has none)."""
        super().teardown()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def trainer_kwargs(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A fast, quiet CPU trainer configuration; ``strategy="ddp_spawn"`` becomes :class:`CleanExitDDPSpawn`."""
    kwargs: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    kwargs.update(overrides)
    if kwargs.get("strategy") == "ddp_spawn":
        kwargs["strategy"] = CleanExitDDPSpawn()
    return kwargs


class PlantedModule(L.LightningModule):
    """The Lightning boilerplate of the tests' planted models; a subclass defines ``forward`` and its parameters.

    Training: cross-entropy of ``self(*inputs)`` on ``(*inputs, label)`` batches, SGD with learning rate :attr:`lr` on
    the parameters that require gradients. Validation computes nothing itself: only the monitor's passes run.
    """

    #: Learning rate of the SGD step.
    lr = 0.1

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        *inputs, label = batch
        return nn.functional.cross_entropy(self(*inputs), label)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class ScheduledContributionNet(PlantedModule):
    """Frozen linear branches whose weights follow a per-epoch schedule: the shares are planted, not learned.

    ``forward = image_scale · A(image) + table_scale · B(table)`` with ``A``, ``B`` fixed linear maps and
    ``(image_scale, table_scale) = schedule[current_epoch]`` (the last entry repeats). With ``occlusion="zeros"``
    and no output transform each modality's raw value is proportional to its scale, so the image share at an
    epoch is ``s_i·r_i / (s_i·r_i + s_t·r_t)`` with ``r_i``, ``r_t`` the shares' values at scales (1, 1).
    """

    def __init__(self, schedule: list[tuple[float, float]]) -> None:
        super().__init__()
        self.schedule = schedule
        self.image_scale, self.table_scale = schedule[0]
        self.image_head = nn.Linear(64, NUM_CLASSES)
        self.table_head = nn.Linear(5, NUM_CLASSES)
        self.bias = nn.Parameter(torch.zeros(NUM_CLASSES))  # the only trainable parameter, and it stays: lr = 0
        self.lr = 0.0
        for parameter in (*self.image_head.parameters(), *self.table_head.parameters()):
            parameter.requires_grad_(False)

    def on_train_epoch_start(self) -> None:
        self.image_scale, self.table_scale = self.schedule[min(self.current_epoch, len(self.schedule) - 1)]

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return (
            self.image_scale * self.image_head(image.flatten(1)) + self.table_scale * self.table_head(table) + self.bias
        )


def fit_scheduled(
    tmp_path: Path,
    schedule: list[tuple[float, float]],
    *callbacks: L.Callback,
    ckpt_path: str | None = None,
    data: tuple[TensorDataset, TensorDataset] | None = None,
    monitor: L.Callback | None = None,
    model: L.LightningModule | None = None,
    **overrides: Any,
) -> tuple[L.Trainer, Any]:
    """Fit a :class:`ScheduledContributionNet` with a zeros-fill monitor first, then ``callbacks``, seeded.

    Returns the trainer and the monitor. ``data`` is ``(train, val)`` (default: :func:`two_modality_dataset` of 32
    samples, seeds 0 and 1), ``monitor`` replaces the zeros-fill one, ``model`` the scheduled net (whose ``schedule``
    is then unused). ``overrides`` go to :func:`trainer_kwargs` (``max_epochs`` defaults to the schedule's length).
    """
    from lightning_mc import ModalityContributionMonitor

    monitor = monitor or ModalityContributionMonitor({"image": 0, "table": 1}, occlusion="zeros")
    kwargs = trainer_kwargs(tmp_path, **{"max_epochs": len(schedule), **overrides})
    trainer = L.Trainer(callbacks=[monitor, *callbacks], **kwargs)
    L.seed_everything(0, verbose=False)
    train, val = data or (two_modality_dataset(32, seed=0), two_modality_dataset(32, seed=1))
    trainer.fit(model or ScheduledContributionNet(schedule), loader(train), loader(val), ckpt_path=ckpt_path)
    return trainer, monitor


def tiny_bert_config(**overrides: Any) -> Any:
    """A one-layer BERT of width 16 (built from this config, nothing is downloaded); ``overrides`` replace fields."""
    from transformers import BertConfig

    options = dict(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        initializer_range=0.5,
    )
    return BertConfig(**{**options, **overrides})


class Lambda(nn.Module):
    """A module that calls ``function``: a model written as one expression (``Lambda(lambda a, b: a.sum(1))``)."""

    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.function(*inputs)


def assert_same_numbers(
    actual: Any, expected: Any, what: str = "value", rtol: float = FLOAT32_RTOL, atol: float = FLOAT32_ATOL
) -> None:
    """``actual`` and ``expected`` are the same numbers, computed two different ways, to float32 rounding.

    Use it wherever two *different* computations of one number are compared (other chunk sizes or
    ``max_batch_size``, other entry points, MetaTensor or plain tensors, DDP or one process, Captum or ours): they run
    other kernels or add in another order, so their floats may differ in the last bits on another CPU. Use ``==`` only
    where the same kernel provably runs on the same rows (and say so in a comment).

    Walks dataclasses, mappings (same keys, in the same order), lists and tuples (same length). Floats and tensors are
    compared with ``|actual - expected| <= atol + rtol * |expected|`` (``torch.testing.assert_close``), NaN equal to
    NaN, an infinity to the same infinity; ints, bools, strings and ``None`` must be equal, and of the same type.

    Args:
        actual: What the computation under test gave.
        expected: What the reference computation gave.
        what: The name of the compared value, for the failure message (e.g. ``"monitor.latest"``).
        rtol: Relative tolerance; the default :data:`FLOAT32_RTOL` is explained there.
        atol: Absolute tolerance; the default :data:`FLOAT32_ATOL` is explained there.
    """
    if dataclasses.is_dataclass(expected) and not isinstance(expected, type):
        assert type(actual) is type(expected), f"{what}: {type(actual).__name__} is not {type(expected).__name__}"
        for field in dataclasses.fields(expected):
            assert_same_numbers(
                getattr(actual, field.name), getattr(expected, field.name), f"{what}.{field.name}", rtol, atol
            )
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{what}: {actual!r} is not a mapping"
        assert list(actual) == list(expected), f"{what}: keys {list(actual)} != {list(expected)}"
        for key, value in expected.items():
            assert_same_numbers(actual[key], value, f"{what}[{key!r}]", rtol, atol)
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)), f"{what}: {actual!r} is not a sequence"
        assert len(actual) == len(expected), f"{what}: length {len(actual)} != {len(expected)}"
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same_numbers(a, e, f"{what}[{index}]", rtol, atol)
    elif isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), f"{what}: {actual!r} is not a tensor"
        torch.testing.assert_close(
            actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda message: f"{what}: {message}"
        )
    elif isinstance(expected, float):
        assert isinstance(actual, float), f"{what}: {actual!r} is not a float"
        if math.isnan(expected):
            assert math.isnan(actual), f"{what}: {actual!r} != nan"
        elif math.isinf(expected):  # an unbounded half-width, say: the same infinity, no tolerance
            assert actual == expected, f"{what}: {actual!r} != {expected!r}"
        else:
            assert abs(actual - expected) <= atol + rtol * abs(expected), (
                f"{what}: {actual!r} != {expected!r} (tolerance {atol} + {rtol} * |expected|)"
            )
    else:  # counts, labels, flags, None: exact
        assert type(actual) is type(expected) and actual == expected, f"{what}: {actual!r} != {expected!r}"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (not a package) so a test can use its builders and functions."""
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module
