"""Modality Contribution Monitor: how much each input modality contributes, measured on validation epochs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torchmetrics import Metric
from typing_extensions import override

from lightning_mc.analyses.options import DEFAULT_MAX_CI_SAMPLES, MeasurementOptions, document_options
from lightning_mc.callbacks import monitor_keys
from lightning_mc.callbacks.reuse_outputs import ReuseOutputs, ValidationStepReuse
from lightning_mc.callbacks.validation_batches import (
    DUPLICATES_MESSAGE,
    SCHEDULE_DOCS,
    UNKNOWN_LENGTH_MESSAGE,
    CheckSchedule,
)
from lightning_mc.core.encoders import EncodersSpec, ResolvedEncoders
from lightning_mc.core.engine import OcclusionEngine
from lightning_mc.core.forward import ForwardFn
from lightning_mc.core.metric import Normalization
from lightning_mc.core.modality import ModalitiesSpec, Modality, TargetSpec
from lightning_mc.core.occlusion import FillSpec
from lightning_mc.core.outputs import OutputKey, OutputTransform
from lightning_mc.core.result import ContributionResult, HistoryEntry
from lightning_mc.core.warn_once import WarnOnce
from lightning_mc.measurement import ContributionMeasurement
from lightning_mc.views.monitor_views import MonitorViews
from lightning_mc.views.scalars import history_entry, result_scalars


@document_options(docs=monitor_keys.MONITOR_DOCS, after="run_on_validate")
@document_options(docs=SCHEDULE_DOCS, after="encoders")
@document_options()
class ModalityContributionMonitor(Callback):
    r"""Log each modality's share of a multimodal model's output movement while the model trains.

    On selected validation epochs the monitor re-runs the model on validation batches with one modality (or one
    attribute of a modality) occluded at a time, measures how far the outputs move, and logs each modality's share
    of the total movement (Gapp et al., arXiv 2503.01904, Algorithm 1). A unimodal collapse shows up as one
    modality's share falling towards 0. No labels are used. The measurement itself is a
    :class:`~lightning_mc.ContributionMeasurement` (``monitor.measurement``); the monitor decides when and on which
    batches it runs, logs, keeps the history and draws the dashboard.

    The extra passes run on the batches already on the device, in eval mode, under ``torch.inference_mode()`` and
    inside the trainer's precision context, so mixed-precision runs measure what the model really does. The user's
    batch is never modified.

    Logged through ``pl_module.log`` after each measured validation run (the same values on every process), under
    ``prefix``: ``<prefix>/share/<m>`` (sums to 1; NaN with a warning when no occlusion moved any output),
    ``<prefix>/raw/<m>`` (``1ᵀdᵢ``), ``<prefix>/balance`` (normalised entropy of the shares: 1 = equal, 0 = one
    modality does everything), ``<prefix>/attr/<m>/<attribute>`` for modalities with 2 to 16 attributes (more: a
    TensorBoard figure) and the keys of the options set (``all_occluded_raw``, ``shapley/<m>``, ``share_low/<m>``,
    ``perf_drop/<m>``, ``num_samples``, ...: :func:`~lightning_mc.views.scalars.result_scalars` lists them).

    Which batches (:class:`~lightning_mc.callbacks.validation_batches.CheckSchedule`): those of validation dataloader
    ``dataloader_idx`` that the trainer runs (``limit_val_batches`` first, then ``limit_batches``) in epochs selected
    by ``every_n_epochs``. Under DDP the sums are reduced before logging and ``DistributedSampler``'s padding is not
    counted, so the numbers equal one process's on the whole set. Ranks may run different numbers of batches; when
    every rank measured the same samples (no ``DistributedSampler``) they are counted once, with a warning
    (the how-to on distributed runs).

    Args:
        modalities: ``name -> dict key`` (dict batches), ``name -> index`` (tuple/list batches), or
            :class:`lightning_mc.Modality` objects (nested batches, per-modality fills, attribute masks).

    Raises:
        ValueError: If an argument is out of range (the message names it and what is valid); at ``setup``, if
            another monitor of the trainer has the same ``prefix``.
        TypeError: If ``modalities``, ``occlusion``, ``forward_fn``, ``output_key`` or ``encoders`` has a wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mc import ModalityContributionMonitor

        monitor = ModalityContributionMonitor({"image": "image", "table": "clinical"}, output_transform="softmax")
        trainer = Trainer(callbacks=[monitor])
        trainer.fit(model, train_loader, val_loader)
        monitor.history[-1]["shares"]  # {'image': 0.61, 'table': 0.39}
    """

    def __init__(
        self,
        modalities: ModalitiesSpec,
        *,
        forward_fn: ForwardFn | None = None,
        output_key: OutputKey = None,
        output_transform: OutputTransform = None,
        occlusion: FillSpec = "mean",
        normalization: Normalization = "ratio_of_sums",
        max_batch_size: int | None = None,
        seed: int = 0,
        check_redundancy: bool = False,
        ci: float | None = None,
        n_boot: int = 1000,
        max_ci_samples: int = DEFAULT_MAX_CI_SAMPLES,
        shapley: bool = False,
        perf_metric: Metric | None = None,
        target: TargetSpec | None = None,
        tolerance: float | None = None,
        encoders: EncodersSpec | None = None,
        every_n_epochs: int = 1,
        limit_batches: int | float | None = None,
        dataloader_idx: int = 0,
        run_on_sanity_check: bool = False,
        run_on_fast_dev_run: bool = False,
        run_on_validate: bool = False,
        dashboard: bool = True,
        per_output: bool | Sequence[str] = False,
        prefix: str = "mc",
        reuse_outputs: ReuseOutputs = False,
    ) -> None:
        super().__init__()
        #: When and on which batches it measures (:class:`~lightning_mc.callbacks.validation_batches.CheckSchedule`).
        self.schedule = CheckSchedule(
            every_n_epochs, limit_batches, dataloader_idx, run_on_sanity_check, run_on_fast_dev_run, run_on_validate
        )
        options = MeasurementOptions.pick(locals())
        self.measurement = ContributionMeasurement(modalities, **options, sync_across_processes=True)
        self.dataloader_idx = dataloader_idx
        self.per_output = monitor_keys.check_per_output(per_output)
        self.prefix = monitor_keys.check_prefix(prefix)
        self._reuse = ValidationStepReuse(reuse_outputs)
        self.reuse_outputs = self._reuse.reuse_outputs
        #: The dashboard and figures (:class:`~lightning_mc.views.monitor_views.MonitorViews`).
        self.views = MonitorViews(self.modalities, prefix, self.modality_names if ci is not None else (), dashboard)
        #: One entry per measured validation run of the current fit (:class:`~lightning_mc.HistoryEntry`). Each fit
        #: starts a new list (a list kept from an earlier fit stays as it was); a resumed fit continues the stored one.
        self.history: list[HistoryEntry] = []
        #: The latest measurement, with attribute values and per-output shares.
        self.latest: ContributionResult | None = None
        self._warn = WarnOnce()
        self._batch_checked = False

    @property
    @override
    def state_key(self) -> str:
        names = list(self.modality_names)
        return self._generate_state_key(modalities=names, prefix=self.prefix, dataloader_idx=self.dataloader_idx)

    @property
    def modalities(self) -> tuple[Modality, ...]:
        """The monitored modalities, in order."""
        return self.measurement.modalities

    @property
    def modality_names(self) -> tuple[str, ...]:
        """Names of the monitored modalities, in order."""
        return self.measurement.modality_names

    @property
    def engine(self) -> OcclusionEngine:
        """The occlusion engine that runs the model on the occluded copies."""
        return self.measurement.engine

    @property
    def encoders(self) -> ResolvedEncoders:
        """The ``encoders`` option, checked: ``modality -> submodule names``, ``"auto"`` or ``None``."""
        return self.engine.settings.encoders

    @property
    def found_encoders(self) -> dict[str, tuple[str, ...]] | None:
        """``modality -> submodule names`` whose outputs are replayed: the given ones, or those ``"auto"`` found.

        ``None`` without ``encoders``, before ``"auto"`` has searched, or when it found none.
        """
        return None if self.engine.cache is None else self.engine.cache.found

    @property
    def latest_shapley(self) -> Any:
        """The latest Shapley measurement (``shapley=True`` only), else ``None``."""
        return None if self.latest is None else self.latest.shapley

    def __repr__(self) -> str:
        names, index = list(self.modality_names), self.dataloader_idx
        return f"{type(self).__name__}(modalities={names}, dataloader_idx={index}, prefix={self.prefix!r})"

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(entry) for entry in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [HistoryEntry(**entry) for entry in state_dict.get("history", [])]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, ModalityContributionMonitor)]
        monitor_keys.check_unique_prefix(self, monitors)
        self.views.setup(trainer, stage, [monitor.views for monitor in monitors])
        self._batch_checked = False  # each fit (or validate) checks its first validation batch
        if stage == TrainerFn.FITTING:  # every fit is its own; resuming loads the checkpoint after setup
            self.history, self.latest = [], None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.measurement.check_encoders_again()  # once per fit: the model (or its wrapping) may differ
        self._reuse.check_again()  # the reused prediction is compared with the model's own once per fit

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.skips_validate(trainer):
            self._warn("validate", self.schedule.validate_message)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.measurement.reset(check=trainer.global_step)
        if self.schedule.begin(trainer, decides=self.measurement.options.tolerance is not None):
            self.views.start(trainer)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        measures = self.schedule.measures(trainer, batch_idx, dataloader_idx)
        if not self._batch_checked and dataloader_idx == self.dataloader_idx:
            # the spec fits or fails on the first batch Lightning runs (a measured one checks it by measuring)
            self._batch_checked = True
            if not measures:
                with trainer.precision_plugin.val_step_context():
                    self.measurement.check_batch(pl_module, batch)
        if measures:
            self._reuse.start(self.engine, pl_module)  # with encoders: what they compute in the validation step

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.schedule.measures(trainer, batch_idx, dataloader_idx):
            self._measure_batch(trainer, pl_module, outputs, batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.schedule.end():
            return
        if not self.measurement.num_updates:
            self._warn("empty", self.schedule.empty_message)
            return
        self._log_check(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning skips a validation run whose loaders are all empty: no validation hook tells the monitor
        if self.schedule.loader_is_empty(trainer) and self.schedule.should_measure(trainer):
            self._warn("empty", self.schedule.empty_message)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a failed check leaves no partial sums behind (the history only ever holds completed checks)
        self.schedule.end()
        self._reuse.stop()
        self.measurement.reset()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.views.finish(trainer, self.history, self)

    def _measure_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        real = self.schedule.padding.remaining
        with trainer.precision_plugin.val_step_context():
            self._reuse.measure(self.measurement, pl_module, batch, real, outputs)
        self.schedule.padding.advance(self.modalities[0].select(batch).shape[0])
        self.views.add_batch(batch, real)
        processes = self.schedule.processes
        if processes.world_size > 1 and not processes.distinct:  # the samples may be the same on every rank
            processes.fingerprint.add(self.modalities[0].select(batch)[:real])
        if processes.checks_after(self.measurement.num_updates):  # points every rank reaches: it stops with the others
            self.schedule.converged = processes.converged(trainer, self.measurement)

    def _log_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        duplicated = self.schedule.processes.same_samples(trainer)
        if duplicated:
            self._warn("duplicates", DUPLICATES_MESSAGE.format(world_size=trainer.world_size))
        if self.schedule.processes.unknown_length and self.measurement.options.tolerance is not None:
            self._warn("unknown_length", UNKNOWN_LENGTH_MESSAGE)
        # reduced across processes (every rank logs the same numbers); the same samples on every rank count once
        self.measurement.sync_across_processes = not duplicated
        result = self.measurement.compute()
        self.measurement.reset()
        output_names = monitor_keys.logged_output_names(self.per_output, result, self._warn)
        # values are identical on every rank; sync_dist=True keeps Lightning's DDP bookkeeping consistent
        for key, value in result_scalars(result, self.prefix, output_names).items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)
        self.latest = result
        self.history.append(history_entry(result, trainer.current_epoch, trainer.global_step))
        self.views.show(trainer, result, self.history, self)
