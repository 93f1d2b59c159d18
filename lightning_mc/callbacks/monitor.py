"""Modality Contribution Monitor: how much each input modality contributes, measured on validation epochs."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torchmetrics import Metric
from typing_extensions import override

from lightning_mc.analyses.bootstrap import DEFAULT_MAX_CI_SAMPLES
from lightning_mc.analyses.perf_drop import TargetSpec
from lightning_mc.callbacks.options import (
    ReuseOutputs,
    check_per_output,
    check_reuse_outputs,
    per_output_names,
    reused_prediction,
)
from lightning_mc.callbacks.validation_batches import PaddingTrim, batch_limit, check_limit_batches, unpadded_samples
from lightning_mc.core.engine import ForwardFn, GivenCleanError, OcclusionEngine
from lightning_mc.core.metric import Normalization
from lightning_mc.core.modality import ModalitiesSpec, Modality
from lightning_mc.core.occlusion import FillSpec
from lightning_mc.core.outputs import OutputTransform
from lightning_mc.core.result import ContributionResult
from lightning_mc.measurement import ContributionMeasurement
from lightning_mc.views.attribute_figures import MeanImages, attribute_figures
from lightning_mc.views.scalars import MAX_LOGGED_ATTRIBUTES, history_entry, result_scalars
from lightning_mc.views.tensorboard import ContributionDashboard, custom_scalar_layout

_PREFIX = re.compile(r"[A-Za-z0-9_.-]+")


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

    Logged through ``pl_module.log`` at the end of each measured validation run (the same values on every process),
    every key under ``prefix``: ``<prefix>/share/<m>`` (sums to 1; NaN with a warning when no occlusion moved any
    output), ``<prefix>/raw/<m>`` (``1ᵀdᵢ``), ``<prefix>/balance`` (normalised entropy of the shares: 1 = equal,
    0 = one modality does everything), ``<prefix>/attr/<m>/<attribute>`` for modalities with 2 to 16 attributes
    (more: a TensorBoard figure ``<prefix>_attributes/<m>``), and the keys of the options below
    (:func:`lightning_mc.views.scalars.result_scalars` lists them all).

    Which batches: those of validation dataloader ``dataloader_idx`` that the trainer runs (``limit_val_batches``
    applies first, then ``limit_batches``), on validation runs the trainer makes (``check_val_every_n_epoch``) in
    epochs selected by ``every_n_epochs``. Under DDP the sums are reduced before logging and the repeats
    ``DistributedSampler`` pads the last batches with are not counted, so the numbers equal one process's on the
    whole set (fills that draw noise or mix samples depend on how batches are cut). Every rank must run the same
    number of measured batches, as Lightning's samplers guarantee.

    Several monitors (e.g. an internal and an external validation set) live in one Trainer when their prefixes
    differ: ``ModalityContributionMonitor(..., dataloader_idx=1, prefix="mc_external")``.

    Args:
        modalities: ``name -> dict key`` (dict batches), ``name -> index`` (tuple/list batches), or
            :class:`lightning_mc.Modality` objects (nested batches, per-modality fills, attribute masks).
        forward_fn: ``(pl_module, batch) -> output``; default ``pl_module(*modality_tensors)``.
        output_key: Where the prediction is in the output (dict key, ``ModelOutput`` field or attribute).
        output_transform: ``None``, ``"softmax"``, ``"sigmoid"`` or a callable, applied before outputs are compared.
        occlusion: Default fill: ``"mean"``, ``"zeros"``, ``"noise"``, ``"permute"``, a number or a callable.
        normalization: ``"ratio_of_sums"`` (Algorithm 1, default), ``"per_sample"`` or ``"per_sample_output"``.
        every_n_epochs: Measure on validation runs of every n-th epoch (``(epoch + 1) % n == 0``).
        limit_batches: Validation batches measured per run: an int, a float in ``(0, 1]`` (fraction of
            ``trainer.num_val_batches``) or ``None`` (all).
        dataloader_idx: Index of the validation dataloader to measure (position in a list, or in a dict's order).
        max_batch_size: Most rows per forward call of the occluded copies (``None``: 4 × the batch size).
        seed: Seed of the ``"noise"``/``"permute"`` fills and the bootstrap (private generators).
        run_on_sanity_check: Also measure during the sanity check.
        run_on_fast_dev_run: Also measure when the trainer runs with ``fast_dev_run``.
        run_on_validate: Also measure in ``trainer.validate()``; by default only fitting is measured.
        dashboard: With a ``TensorBoardLogger``, also write the dashboard (:mod:`lightning_mc.views.tensorboard`).
        check_redundancy: Occlude every modality at once too; logs ``<prefix>/all_occluded_raw``, warns once when
            the modalities look redundant.
        shapley: Exact Shapley values (``M ≤ 6``); logs ``<prefix>/shapley/<m>``, ``<prefix>/shapley_share/<m>``,
            ``<prefix>/interaction/<a>/<b>``; kept in ``latest_shapley`` and in history entries.
        ci: Coverage of bootstrap intervals (e.g. ``0.95``); logs ``<prefix>/share_low/<m>``, ``share_high``.
        n_boot: Bootstrap replicates (with ``ci``).
        max_ci_samples: Most samples per process kept for the bootstrap (with ``ci``).
        perf_metric: A torchmetrics metric on clean and whole-modality-occluded outputs; logs
            ``<prefix>/perf_clean`` and ``<prefix>/perf_drop/<m>``. Needs ``target``.
        target: Where the targets are in each batch: a dict key, a tuple index or ``batch -> Tensor``.
        per_output: Log each output's shares, ``<prefix>/output_share/<output>/<m>``: ``True`` names outputs by
            index, a sequence of names names them so (at most 16 outputs are logged).
        prefix: First part of every logged key and TensorBoard tag (letters, digits, ``_``, ``-``, ``.``).
        reuse_outputs: Take the clean outputs from what ``validation_step`` returned instead of running the clean
            batch again (only the occluded copies run: ``M·N`` rows per batch instead of ``(M+1)·N`` for whole
            modalities). ``True``: it returns the output tensor; a string: the key or attribute holding it in a dict or
            ``ModelOutput``; a callable ``outputs -> Tensor``. It must be what ``forward_fn``/``output_key`` give,
            before ``output_transform``, computed in eval mode on the same batch (what validation does).
        tolerance: Measure batches in order until every share's 95% half-width is at most ``tolerance`` (at most
            ``limit_batches``), then skip the rest of the check; logs ``<prefix>/num_samples``.

    The measurement options are described in full in :class:`~lightning_mc.ContributionMeasurement`.

    Raises:
        ValueError: If an argument is out of range (each message names the argument and what is valid); at
            ``setup``, if another monitor of the trainer has the same ``prefix``.
        TypeError: If ``modalities``, ``occlusion``, ``forward_fn`` or ``output_key`` have the wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mc import ModalityContributionMonitor

        internal = ModalityContributionMonitor({"image": "image", "table": "clinical"}, output_transform="softmax")
        external = ModalityContributionMonitor(
            {"image": "image", "table": "clinical"}, output_transform="softmax", dataloader_idx=1, prefix="mc_external"
        )
        trainer = Trainer(callbacks=[internal, external])
        trainer.fit(model, train_loader, [internal_val_loader, external_val_loader])
        internal.history[-1]["shares"]  # {'image': 0.61, 'table': 0.39}
    """

    def __init__(
        self,
        modalities: ModalitiesSpec,
        *,
        forward_fn: ForwardFn | None = None,
        output_key: str | None = None,
        output_transform: OutputTransform = None,
        occlusion: FillSpec = "mean",
        normalization: Normalization = "ratio_of_sums",
        every_n_epochs: int = 1,
        limit_batches: int | float | None = None,
        dataloader_idx: int = 0,
        max_batch_size: int | None = None,
        seed: int = 0,
        run_on_sanity_check: bool = False,
        run_on_fast_dev_run: bool = False,
        run_on_validate: bool = False,
        dashboard: bool = True,
        check_redundancy: bool = False,
        shapley: bool = False,
        ci: float | None = None,
        n_boot: int = 1000,
        max_ci_samples: int = DEFAULT_MAX_CI_SAMPLES,
        perf_metric: Metric | None = None,
        target: TargetSpec | None = None,
        per_output: bool | Sequence[str] = False,
        prefix: str = "mc",
        reuse_outputs: ReuseOutputs = False,
        tolerance: float | None = None,
    ) -> None:
        super().__init__()
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs!r} must be a positive int.")
        check_limit_batches(limit_batches)
        if isinstance(dataloader_idx, bool) or not isinstance(dataloader_idx, int) or dataloader_idx < 0:
            raise ValueError(f"dataloader_idx={dataloader_idx!r} must be a non-negative int.")
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix={prefix!r} must be a non-empty string of letters, digits, '_', '-' or '.'.")
        self.measurement = ContributionMeasurement(
            modalities,
            forward_fn=forward_fn,
            output_key=output_key,
            output_transform=output_transform,
            occlusion=occlusion,
            normalization=normalization,
            max_batch_size=max_batch_size,
            seed=seed,
            check_redundancy=check_redundancy,
            ci=ci,
            n_boot=n_boot,
            max_ci_samples=max_ci_samples,
            shapley=shapley,
            perf_metric=perf_metric,
            target=target,
            tolerance=tolerance,
        )
        self.every_n_epochs, self.limit_batches, self.dataloader_idx = every_n_epochs, limit_batches, dataloader_idx
        self.run_on_sanity_check, self.run_on_fast_dev_run = run_on_sanity_check, run_on_fast_dev_run
        self.run_on_validate, self.dashboard = run_on_validate, dashboard
        self.per_output = check_per_output(per_output)
        self.prefix = prefix
        self.reuse_outputs = check_reuse_outputs(reuse_outputs)
        #: One entry per measured validation run, with epoch, global_step, shares, raw, balance, num_samples (and
        #: the options' values: share_low/share_high, perf_clean/perf_drop, shapley).
        self.history: list[dict[str, Any]] = []
        #: The latest measurement, with attribute values and per-output shares.
        self.latest: ContributionResult | None = None
        self._measuring = False
        self._converged = False
        self._padding = PaddingTrim()
        self._dashboard: ContributionDashboard | None = None
        self._mean_images: MeanImages | None = None
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        names = list(self.modality_names)
        if self.prefix == "mc" and self.dataloader_idx == 0:  # the key of 0.1 checkpoints, which had neither
            return self._generate_state_key(modalities=names)
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
    def latest_shapley(self) -> Any:
        """The latest Shapley measurement (``shapley=True`` only), else ``None``."""
        return None if self.latest is None else self.latest.shapley

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(modalities={list(self.modality_names)}, dataloader_idx={self.dataloader_idx}, "
            f"prefix={self.prefix!r})"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(entry) for entry in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(entry) for entry in state_dict.get("history", [])]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, ModalityContributionMonitor)]
        twins = [cb for cb in monitors if cb.prefix == self.prefix and cb is not self]
        if twins:
            raise ValueError(
                f"Two monitors log under prefix={self.prefix!r}: {self!r} and {twins[0]!r}. Give each monitor its "
                "own prefix, e.g. prefix='mc_external' for a second validation set."
            )
        self._dashboard = None
        if self.dashboard and stage == "fit":
            self._dashboard = ContributionDashboard.for_trainer(trainer, self.prefix)
        if self._dashboard is not None:  # one layout per writer: the first monitor registers every monitor's part
            layout: dict[str, Any] = {}
            for monitor in monitors:
                margins = monitor.modality_names if monitor.measurement.ci is not None else ()
                layout.update(custom_scalar_layout(margins, prefix=monitor.prefix))
            self._dashboard.register_layout(trainer, layout)

    def _should_measure(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return self.run_on_sanity_check
        if trainer.fast_dev_run and not self.run_on_fast_dev_run:
            return False
        if trainer.state.fn == TrainerFn.VALIDATING:
            return self.run_on_validate
        if trainer.state.fn != TrainerFn.FITTING:
            return False
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measuring = self._should_measure(trainer)
        self._converged = False
        self.measurement.reset()
        if not self._measuring:
            return
        if self.dataloader_idx >= len(trainer.num_val_batches):
            raise ValueError(
                f"dataloader_idx={self.dataloader_idx} but the trainer has {len(trainer.num_val_batches)} validation "
                f"dataloader(s); valid: 0..{len(trainer.num_val_batches) - 1}."
            )
        self._padding.start(unpadded_samples(trainer, self.dataloader_idx))
        has_figures = self._dashboard is not None and trainer.is_global_zero
        self._mean_images = MeanImages(self.modalities) if has_figures else None

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
        if not self._measuring or dataloader_idx != self.dataloader_idx or self._converged:
            return
        if batch_idx >= batch_limit(self.limit_batches, trainer, self.dataloader_idx):
            return
        clean = None if self.reuse_outputs is False else reused_prediction(self.reuse_outputs, outputs)
        real = self._padding.remaining
        try:
            with trainer.precision_plugin.val_step_context():
                self.measurement.update(pl_module, batch, num_samples=real, clean=clean)
        except GivenCleanError as err:
            raise ValueError(f"reuse_outputs={self.reuse_outputs!r}: {err}") from None
        self._padding.advance(self.modalities[0].select(batch).shape[0])
        if self._mean_images is not None:
            self._mean_images.update(batch, real)
        self._converged = self.measurement.converged  # reduced: every rank stops after the same batch

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning skips a validation run whose loaders are all empty: no validation hook tells the monitor
        num_val_batches = trainer.num_val_batches
        if self.dataloader_idx < len(num_val_batches) and num_val_batches[self.dataloader_idx] == 0:
            if self._should_measure(trainer):
                self._warn_once("empty", self._empty_message())

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a failed check leaves no partial sums behind (the history only ever holds completed checks)
        self._measuring = False
        self.measurement.reset()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._measuring:
            return
        self._measuring = False
        if not self.measurement.num_updates:
            self._warn_once("empty", self._empty_message())
            return
        result = self.measurement.compute()  # reduced across processes: every rank logs the same numbers
        self.measurement.reset()
        # values are identical on every rank; sync_dist=True keeps Lightning's DDP bookkeeping consistent
        output_names = per_output_names(self.per_output, result)
        if output_names is not None and len(output_names) > MAX_LOGGED_ATTRIBUTES:
            self._warn_once(
                "many_outputs",
                f"per_output: the model has {len(output_names)} outputs; per-output shares are logged for at most "
                f"{MAX_LOGGED_ATTRIBUTES}. They are in monitor.latest.per_output_shares.",
            )
            output_names = None
        for key, value in result_scalars(result, self.prefix, output_names).items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)
        self.latest = result
        self.history.append(history_entry(result, trainer.current_epoch, trainer.global_step))
        if self._dashboard is not None:
            self._dashboard.update(trainer, self.history, self.modality_names, self)
            means = self._mean_images.means() if self._mean_images is not None else {}
            figures = attribute_figures(
                result, self.modalities, means, min_attributes=MAX_LOGGED_ATTRIBUTES + 1, prefix=self.prefix
            )
            self._dashboard.add_figures(trainer, figures)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._dashboard is not None:
            self._dashboard.finish(trainer, self.history, self.modality_names, self)

    def _empty_message(self) -> str:
        return (
            f"ModalityContributionMonitor measured no batch of validation dataloader {self.dataloader_idx} "
            "(the loader is empty or limit_batches excluded every batch); nothing is logged."
        )

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            rank_zero_warn(message, category=UserWarning)


__all__ = ["ModalityContributionMonitor"]
