"""The samples a collapse probe fits: features and labels of a validation run and the epoch's training batches.

:class:`ProbeFeatures` collects validation rows on exactly the batches a
:class:`~lightning_mc.ModalityContributionMonitor` measures (its loader, its batch limit, not the samples of
``DistributedSampler``'s padding) and training rows in a seeded reservoir of the current epoch
(:class:`~lightning_mc.callbacks.probe_reservoir.TrainingReservoir`: no extra forward call, the rows stay on their
device until the check). Under DDP both are gathered from every process, so every rank fits the same probe on the same
rows.

The features of a modality are its encoders' outputs when the monitor knows them (``encoders=``): a forward hook keeps
the first output of each encoder in each collected batch, which is the training or validation step's own forward pass
(the monitor's occluded copies run after it); where an encoder did not run on a batch's rows (a validation step that
does not call the model, the copies stacked into one call) the modality's input is used instead, for every row of that
check. Without encoders, the features are the input itself. Either way
:func:`~lightning_mc.analyses.probe.modality_features` flattens them and hashes wide ones down to at most 256 columns.

Every ``labels=`` problem (a key that is not in the batch, an index out of range, a callable of the wrong length, labels
of no kind the probe knows) is raised by :meth:`ProbeFeatures.check` on the first batch Lightning runs, before any
training step.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_mc.analyses.label_kinds import LabelKind, read_labels
from lightning_mc.analyses.probe import SEED, modality_features
from lightning_mc.callbacks.monitor import ModalityContributionMonitor
from lightning_mc.callbacks.probe_reservoir import TrainingReservoir, index_on
from lightning_mc.callbacks.validation_batches import PaddingTrim, unpadded_samples
from lightning_mc.core.encoders import submodule
from lightning_mc.core.modality import TargetSpec


def select_labels(batch: Any, labels: TargetSpec, rows: int) -> Tensor:
    """The labels of ``batch`` that ``labels=`` selects, one per sample of the batch's ``rows`` samples.

    Raises:
        ValueError: If the key is not in the batch, the index is out of range, or the labels are not one per sample;
            the message names ``labels=`` and the batch's keys or length.
        TypeError: If what is selected is not a tensor.

    Example:
        >>> select_labels((torch.zeros(2, 3), torch.tensor([0, 1])), 1, rows=2)
        tensor([0, 1])
    """
    spec = getattr(labels, "__name__", repr(labels)) if callable(labels) else repr(labels)
    try:
        value = labels(batch) if callable(labels) else batch[labels]
    except KeyError:
        keys = list(batch.keys()) if hasattr(batch, "keys") else None
        raise ValueError(f"labels={spec} is not a key of the batch; the batch's keys: {keys!r}.") from None
    except IndexError:
        length = len(batch) if hasattr(batch, "__len__") else None
        raise ValueError(
            f"labels={spec} is out of range: the batch has {length} items (indices 0 to {(length or 1) - 1})."
        ) from None
    except TypeError as err:
        raise ValueError(
            f"labels={spec} cannot select from a {type(batch).__name__} batch ({err}); pass a key of a dict batch, "
            "an index of a tuple batch, or a callable batch -> Tensor."
        ) from None
    if not isinstance(value, Tensor):
        raise TypeError(f"labels={spec} selected a {type(value).__name__}; expected a tensor of labels.")
    if value.dim() == 0 or value.shape[0] != rows:
        found = "a scalar" if value.dim() == 0 else f"{value.shape[0]} rows (shape {tuple(value.shape)})"
        raise ValueError(
            f"labels={spec} selected {found}; the batch has {rows} samples (the modalities' first dimension): "
            "labels= must select one label per sample."
        )
    return value


def check_labels(labels: Any) -> None:
    """Raise a ``TypeError`` unless ``labels`` is ``None``, a dict key, a tuple index or a callable ``batch -> Tensor``.

    Example:
        >>> check_labels("label")
    """
    if labels is None or callable(labels) or (isinstance(labels, (str, int)) and not isinstance(labels, bool)):
        return
    raise TypeError(
        f"labels={labels!r} must be None, a dict key, a tuple index or a callable batch -> Tensor (spelled as the "
        "monitor's target=)."
    )


class ProbeFeatures:
    """Per-sample features of some modalities and the labels: a validation run's rows and the epoch's training rows.

    Args:
        labels: Where the labels are in a batch: a dict key, a tuple index or ``batch -> Tensor``.
        label_kind: What the labels are (:func:`~lightning_mc.analyses.label_kinds.read_labels`).
    """

    def __init__(self, labels: TargetSpec, label_kind: LabelKind = "auto") -> None:
        self.labels = labels
        self.label_kind = label_kind
        self._monitor: ModalityContributionMonitor | None = None
        self._names: tuple[str, ...] = ()
        self._train_names: tuple[str, ...] = ()
        self._padding = PaddingTrim()
        self._inputs: dict[str, list[Tensor]] = {}
        self._encoded: dict[str, list[Tensor]] = {}
        self._targets: list[Tensor] = []
        self._reservoir = TrainingReservoir()  # each modality's input rows, and its encoders' under _encoded_key
        self._paths: dict[str, tuple[str, ...]] = {}
        self._handles: list[Any] = []
        self._captured: dict[str, Tensor] = {}
        self._values: dict[str, Tensor] = {}
        self._rows = 0
        self._capturing = False
        self._complete: dict[str, bool] = {}
        self._train_complete: dict[str, bool] = {}
        self.checked: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callbacks: hook handles are not picklable, and nothing is collected between runs
        state = self.__dict__.copy()
        state.update(_handles=[], _captured={}, _values={}, _inputs={}, _encoded={}, _targets=[])
        return state

    @property
    def names(self) -> tuple[str, ...]:
        """The modalities collected in this validation run."""
        return self._names

    def check(self, monitor: ModalityContributionMonitor, batch: Any, where: str) -> None:
        """Raise on a ``labels=`` problem in ``batch`` (a ``where`` batch: "training" or "validation"), once each."""
        if where in self.checked:
            return
        rows = monitor.modalities[0].select(batch).shape[0]
        read_labels(select_labels(batch, self.labels, rows), self.label_kind)
        self.checked.add(where)

    # -- training rows ------------------------------------------------------------------------------------------------

    def train_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        monitor: ModalityContributionMonitor,
        names: tuple[str, ...],
    ) -> None:
        """A training epoch starts: keep a reservoir of ``names``' rows (none: keep nothing)."""
        self._stop_hooks()
        self._monitor, self._train_names = monitor, names
        seed = SEED + 7919 * trainer.global_rank + 104729 * trainer.current_epoch
        self._reservoir.start(seed)
        self._hook_encoders(pl_module, monitor, names)
        self._train_complete = dict.fromkeys(self._paths, True)

    def train_batch_start(self, batch: Any) -> None:
        """Before the training step: catch the encoders' outputs of this batch."""
        self._start_batch(self._train_names, batch)

    def train_batch_end(self, batch: Any) -> None:
        """After the training step: keep this batch's rows that the reservoir draws."""
        if not self._capturing:
            return
        self._capturing = False
        rows, slots = self._reservoir.slots(self._rows)
        if isinstance(rows, slice) or len(rows):
            with torch.no_grad():  # training runs outside inference mode
                labels = select_labels(batch, self.labels, self._rows)
                labels = labels[index_on(rows, labels.device)].detach()
                inputs, encoded = self._features(self._train_names, rows)
                for name in self._train_names:
                    if name in self._paths and name not in encoded:
                        self._train_complete[name] = False
                # the inputs too where the encoders' are kept: a check where some batch missed them uses the inputs
                self._reservoir.store(slots, {**inputs, **{_encoded_key(n): v for n, v in encoded.items()}}, labels)
        self._captured, self._values = {}, {}

    def train_stop(self) -> None:
        """The training epoch ends: remove the hooks (the reservoir stays until the next epoch)."""
        self._stop_hooks()
        self._capturing = False

    # -- validation rows ----------------------------------------------------------------------------------------------

    def start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        monitor: ModalityContributionMonitor,
        names: tuple[str, ...],
    ) -> None:
        """A validation run starts: collect ``names`` (none: collect nothing) on the batches ``monitor`` measures."""
        self._stop_hooks()
        self._monitor, self._names = monitor, names
        self._inputs = {name: [] for name in names}
        self._encoded = {name: [] for name in names}
        self._targets = []
        self._padding.start(unpadded_samples(trainer, monitor.dataloader_idx) if names else None)
        self._hook_encoders(pl_module, monitor, names)
        self._complete = dict.fromkeys(self._paths, True)

    def batch_start(self, trainer: pl.Trainer, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        """Before the validation step: whether the monitor measures this batch, and if so, catch the encoders."""
        measured = self._monitor is not None and self._monitor.schedule.measures(trainer, batch_idx, dataloader_idx)
        self._start_batch(self._names if measured else (), batch)

    def batch_end(self, batch: Any) -> None:
        """After the validation step: keep this batch's real rows (the sampler's padding left out)."""
        if not self._capturing:
            return
        self._capturing = False
        keep = self._padding.remaining
        self._padding.advance(self._rows)
        keep = self._rows if keep is None else min(keep, self._rows)
        with torch.inference_mode(False), torch.no_grad():
            inputs, encoded = self._features(self._names, slice(0, keep))
            for name in self._names:
                self._inputs[name].append(inputs[name].cpu().clone())
                if name in encoded:
                    self._encoded[name].append(encoded[name].cpu().clone())
                elif name in self._paths:
                    self._complete[name] = False
            self._targets.append(select_labels(batch, self.labels, self._rows)[:keep].detach().cpu().clone())
        self._captured, self._values = {}, {}

    def stop(self) -> None:
        """Remove the encoders' hooks (the collected rows stay until the next :meth:`start`)."""
        self._stop_hooks()
        self._capturing = False

    def clear(self) -> None:
        """Drop the collected validation rows."""
        self.stop()
        self._names = ()
        self._inputs, self._encoded, self._targets = {}, {}, []

    def gather(self, trainer: pl.Trainer) -> tuple[dict[str, tuple[Tensor, Tensor | None, str]], Tensor, Tensor | None]:
        """Each collected modality's validation and training features and the labels, from every process.

        Returns:
            ``(features, labels, train_labels)``: ``features[name] = (validation rows, training rows or None, source)``;
            the validation labels; the training labels (``None``: no training rows). Under DDP every rank must call it
            at the same check; every rank gets the same rows.
        """
        targets = torch.cat(self._targets) if self._targets else torch.zeros(0, dtype=torch.long)
        targets = _gather_rows(trainer, targets)
        train_labels = self._reservoir.labels()
        have_train = trainer.strategy.reduce_boolean_decision(train_labels is not None, all=True)
        train_labels = _gather_rows(trainer, train_labels) if have_train and train_labels is not None else None
        found: dict[str, tuple[Tensor, Tensor | None, str]] = {}
        for name in self._names:
            encoded = bool(self._complete.get(name, False) and self._encoded[name])
            encoded = encoded and (not have_train or self._train_complete.get(name, False))
            encoded = encoded and (not have_train or self._reservoir.features(_encoded_key(name)) is not None)
            # every rank must use the same source: the encoders' outputs only where every rank caught them all
            everywhere = trainer.strategy.reduce_boolean_decision(encoded, all=True) if self._paths else False
            chunks = self._encoded[name] if everywhere else self._inputs[name]
            val = _gather_rows(trainer, torch.cat(chunks) if chunks else torch.zeros(0, 1))
            train = None
            if have_train:
                local = self._reservoir.features(_encoded_key(name) if everywhere else name)
                if trainer.strategy.reduce_boolean_decision(local is not None, all=True) and local is not None:
                    train = _gather_rows(trainer, local.cpu())
            paths = ", ".join(repr(path) for path in self._paths.get(name, ()))
            found[name] = (val, train, f"encoder output ({paths})" if everywhere else "input")
        return found, targets, train_labels

    # -- both ---------------------------------------------------------------------------------------------------------

    def _hook_encoders(
        self, pl_module: pl.LightningModule, monitor: ModalityContributionMonitor, names: tuple[str, ...]
    ) -> None:
        encoders = monitor.encoders
        self._paths = {name: encoders[name] for name in names if isinstance(encoders, dict) and name in encoders}
        for name, paths in self._paths.items():
            for path in paths:
                module = submodule(pl_module, path, f"encoders[{name!r}]")
                self._handles.append(module.register_forward_hook(self._hook(path)))

    def _start_batch(self, names: tuple[str, ...], batch: Any) -> None:
        self._captured = {}
        self._capturing = bool(names) and self._monitor is not None
        if self._capturing:  # each modality selected once per batch: the step does not replace the batch's tensors
            modalities = {modality.name: modality for modality in self._monitor.modalities}
            self._values = {name: modalities[name].select(batch) for name in names}
            self._rows = self._values[names[0]].shape[0]

    def _features(self, names: tuple[str, ...], rows: Tensor | slice) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The input features and, where every encoder of a modality ran on the batch, the encoders' features."""
        inputs, encoded = {}, {}
        for name in names:
            values = self._values[name]
            inputs[name] = modality_features(values[index_on(rows, values.device)].detach())
            paths = self._paths.get(name, ())
            if paths and all(path in self._captured for path in paths):
                outputs = torch.cat(
                    [self._captured[path][index_on(rows, self._captured[path].device)] for path in paths], 1
                )
                encoded[name] = modality_features(outputs)
        return inputs, encoded

    def _stop_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured = {}

    def _hook(self, path: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self._capturing or path in self._captured:
                return
            found: list[Tensor] = []
            apply_to_collection(output, Tensor, lambda tensor: found.append(tensor) or tensor)
            floating = [tensor for tensor in found if tensor.is_floating_point() and tensor.dim() > 0]
            if floating and floating[0].shape[0] == self._rows:
                self._captured[path] = floating[0].detach().reshape(self._rows, -1)

        return hook


def _encoded_key(name: str) -> str:
    """Where the reservoir keeps the encoders' outputs of modality ``name`` (beside its input, under ``name``)."""
    return f"{name} (encoded)"


def _gather_rows(trainer: pl.Trainer, local: Tensor) -> Tensor:
    """``local`` rows of every process, interleaved as ``DistributedSampler`` dealt them (one process: ``local``)."""
    world_size = trainer.world_size
    if world_size == 1:
        return local
    device = trainer.strategy.root_device
    count = torch.tensor([local.shape[0]], device=device)
    counts = trainer.strategy.all_gather(count).reshape(world_size).cpu()
    most = int(counts.max())
    padded = torch.zeros(most, *local.shape[1:], dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    every = trainer.strategy.all_gather(padded).reshape(world_size, most, *local.shape[1:]).cpu()
    # rank r's row i is sample i * world_size + r of the dataset
    real = torch.arange(most)[:, None] < counts[None, :]
    return every.transpose(0, 1)[real]  # row-major over (row, rank): the order of ``position``
