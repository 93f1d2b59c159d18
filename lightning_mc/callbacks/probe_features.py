"""The features a collapse probe fits: each probed modality's per-sample features and the labels, in a validation run.

:class:`ProbeFeatures` collects on exactly the batches a :class:`~lightning_mc.ModalityContributionMonitor`
measures (its loader, its batch limit, not the samples of ``DistributedSampler``'s padding) and, under DDP, gathers
them from every process in the order of the dataset, so every rank fits the same probe on the same rows as one process
would (:mod:`lightning_mc.analyses.probe`).

The features of a modality are its encoders' outputs when the monitor knows them (``encoders=``): a forward hook keeps
the first output of each encoder in each measured batch, which is the validation step's own forward pass (the monitor's
occluded copies run after it); a batch where an encoder did not run on the batch's rows (a validation step that does
not call the model, the copies stacked into one call) falls back to the modality's input for the whole run. Without
encoders, the features are the input itself. Either way :func:`~lightning_mc.analyses.probe.modality_features`
flattens them and hashes wide ones down to at most 256 columns.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_mc.analyses.perf_drop import TargetSpec, select_target
from lightning_mc.analyses.probe import modality_features
from lightning_mc.callbacks.monitor import ModalityContributionMonitor
from lightning_mc.callbacks.validation_batches import PaddingTrim, unpadded_samples
from lightning_mc.core.encoders import submodule


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
    """Per-sample features of some modalities and the labels, on the batches a monitor measures in one validation run.

    Args:
        labels: Where the labels are in a batch: a dict key, a tuple index or ``batch -> Tensor``.
    """

    def __init__(self, labels: TargetSpec) -> None:
        self.labels = labels
        self._monitor: ModalityContributionMonitor | None = None
        self._names: tuple[str, ...] = ()
        self._padding = PaddingTrim()
        self._inputs: dict[str, list[Tensor]] = {}
        self._encoded: dict[str, list[Tensor]] = {}
        self._targets: list[Tensor] = []
        self._paths: dict[str, tuple[str, ...]] = {}
        self._handles: list[Any] = []
        self._captured: dict[str, Tensor] = {}
        self._rows = 0
        self._measured = False
        self._complete: dict[str, bool] = {}

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callbacks: hook handles are not picklable, and nothing is collected between runs
        state = self.__dict__.copy()
        state.update(_handles=[], _captured={}, _inputs={}, _encoded={}, _targets=[])
        return state

    @property
    def names(self) -> tuple[str, ...]:
        """The modalities collected in this run."""
        return self._names

    def start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        monitor: ModalityContributionMonitor,
        names: tuple[str, ...],
    ) -> None:
        """A validation run starts: collect ``names`` (none: collect nothing) on the batches ``monitor`` measures."""
        self.stop()
        self._monitor, self._names = monitor, names
        self._inputs = {name: [] for name in names}
        self._encoded = {name: [] for name in names}
        self._targets = []
        self._padding.start(unpadded_samples(trainer, monitor.dataloader_idx) if names else None)
        encoders = monitor.encoders
        self._paths = {name: encoders[name] for name in names if isinstance(encoders, dict) and name in encoders}
        self._complete = dict.fromkeys(self._paths, True)
        for name, paths in self._paths.items():
            for path in paths:
                module = submodule(pl_module, path, f"encoders[{name!r}]")
                self._handles.append(module.register_forward_hook(self._hook(path)))

    def batch_start(self, trainer: pl.Trainer, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        """Before the validation step: whether the monitor measures this batch, and if so, catch the encoders."""
        self._measured = bool(self._names) and self._monitor is not None
        self._measured = self._measured and self._monitor.schedule.measures(trainer, batch_idx, dataloader_idx)
        self._captured = {}
        if self._measured:
            self._rows = self._monitor.modalities[0].select(batch).shape[0]

    def batch_end(self, batch: Any) -> None:
        """After the validation step: keep this batch's real rows (the sampler's padding left out)."""
        if not self._measured:
            return
        self._measured = False
        keep = self._padding.remaining
        self._padding.advance(self._rows)
        keep = self._rows if keep is None else min(keep, self._rows)
        modalities = {modality.name: modality for modality in self._monitor.modalities}
        with torch.inference_mode(False), torch.no_grad():
            for name in self._names:
                self._inputs[name].append(modality_features(modalities[name].select(batch)[:keep]).cpu().clone())
                paths = self._paths.get(name, ())
                if paths and all(path in self._captured for path in paths):
                    encoded = torch.cat([self._captured[path][:keep] for path in paths], dim=1)
                    self._encoded[name].append(modality_features(encoded).cpu().clone())
                elif paths:
                    self._complete[name] = False
            targets = select_target(batch, self.labels)
            self._targets.append(targets[:keep].detach().cpu().clone())
        self._captured = {}

    def stop(self) -> None:
        """Remove the encoders' hooks (the collected rows stay until the next :meth:`start`)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured = {}
        self._measured = False

    def clear(self) -> None:
        """Drop the collected rows."""
        self.stop()
        self._names = ()
        self._inputs, self._encoded, self._targets = {}, {}, []

    def gather(self, trainer: pl.Trainer) -> tuple[dict[str, Tensor], Tensor, dict[str, str]]:
        """The features of each collected modality, the labels and what the features are, from every process.

        Under DDP every rank must call it at the same check; the rows come back in the order of the dataset
        (``DistributedSampler`` deals sample ``i`` to rank ``i % world_size``), the same on every rank.
        """
        targets = torch.cat(self._targets) if self._targets else torch.zeros(0, dtype=torch.long)
        targets = _gather_rows(trainer, targets)
        features, sources = {}, {}
        for name in self._names:
            encoded = self._complete.get(name, False) and self._encoded[name]
            chunks = self._encoded[name] if encoded else self._inputs[name]
            local = torch.cat(chunks) if chunks else torch.zeros(0, 1)
            # every rank must use the same source: the encoders' outputs only where every rank caught them all
            everywhere = trainer.strategy.reduce_boolean_decision(bool(encoded), all=True) if self._paths else False
            if everywhere != bool(encoded):
                local = torch.cat(self._inputs[name]) if self._inputs[name] else torch.zeros(0, 1)
            features[name] = _gather_rows(trainer, local)
            paths = ", ".join(repr(path) for path in self._paths.get(name, ()))
            sources[name] = f"encoder output ({paths})" if everywhere else "input"
        return features, targets, sources

    def _hook(self, path: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self._measured or path in self._captured:
                return
            found: list[Tensor] = []
            apply_to_collection(output, Tensor, lambda tensor: found.append(tensor) or tensor)
            floating = [tensor for tensor in found if tensor.is_floating_point() and tensor.dim() > 0]
            if floating and floating[0].shape[0] == self._rows:
                self._captured[path] = floating[0].detach().reshape(self._rows, -1)

        return hook


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
