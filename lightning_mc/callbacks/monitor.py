"""Modality Contribution Monitor: how much each input modality contributes, measured on validation epochs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DistributedSampler
from torchmetrics import Metric
from typing_extensions import override

from lightning_mc.views.attribute_figures import MeanImages, attribute_figures
from lightning_mc.analyses.bootstrap import DEFAULT_MAX_CI_SAMPLES, PerSampleRaw, check_ci_arguments, share_intervals
from lightning_mc.core.engine import ForwardFn, OcclusionEngine, OutputTransform
from lightning_mc.core.metric import ModalityContribution, Normalization, check_normalization
from lightning_mc.core.modality import ModalitiesSpec, resolve_modalities
from lightning_mc.core.occlusion import FillSpec
from lightning_mc.analyses.perf_drop import (
    PerformanceDrop,
    TargetSpec,
    check_perf_arguments,
    select_target,
    whole_modality_outputs,
)
from lightning_mc.core.result import ContributionResult
from lightning_mc.analyses.shapley import (
    AllOccludedMovement,
    ModalityShapley,
    ShapleyResult,
    check_num_modalities,
    coalitions,
    redundancy_message,
)
from lightning_mc.views.tensorboard import ContributionDashboard

#: Modalities with at most this many attributes get one scalar per attribute (``mc/attr/<modality>/<attribute>``).
MAX_LOGGED_ATTRIBUTES = 16


class ModalityContributionMonitor(Callback):
    r"""Log each modality's share of a multimodal model's output movement while the model trains.

    On selected validation epochs the monitor re-runs the model on validation batches with one modality (or one
    attribute of a modality) occluded at a time, measures how far the outputs move, and logs each modality's share
    of the total movement (Gapp et al., arXiv 2503.01904, Algorithm 1). A unimodal collapse shows up as one
    modality's share falling towards 0. No labels are used.

    The extra passes run on the batches already on the device, in eval mode, under ``torch.inference_mode()`` and
    inside the trainer's precision context, so mixed-precision runs measure what the model really does. Occluded
    copies are stacked along the batch dimension (at most ``max_batch_size`` rows per forward call). The user's
    batch is never modified.

    Logged through ``pl_module.log`` at the end of each measured validation run, so every logger and
    ``trainer.callback_metrics`` get them (the same values on every process):

    - ``mc/share/<modality>``: share of the total output movement (sums to 1 over modalities; NaN with a warning
      when no occlusion moved any output);
    - ``mc/raw/<modality>``: ``1ᵀdᵢ``, mean over samples of the summed absolute output change;
    - ``mc/balance``: normalised entropy of the shares, 1 = equal contributions, 0 = one modality does everything;
    - ``mc/attr/<modality>/<attribute>``: attribute shares, for modalities with 2 to 16 attributes. Modalities with
      more get a figure in TensorBoard instead (``mc_attributes/<modality>``, with ``dashboard=True`` and a
      ``TensorBoardLogger``): a patch heat-map over the mean image for ``Patches2d``, the shares per position for
      ``Tokens``/``Words``, the top 10 attributes otherwise (:mod:`lightning_mc.views.attribute_figures`).

    Which batches are measured: the batches of validation dataloader ``dataloader_idx`` (a single loader is 0; a
    list or dict of loaders is indexed in its order) that the trainer runs, so ``limit_val_batches`` applies first
    and ``limit_batches`` then takes the first batches of those. A validation run is measured when the trainer
    validates (``check_val_every_n_epoch``) *and* the epoch is selected by ``every_n_epochs``; with
    ``val_check_interval < 1`` each validation run of a selected epoch is measured and logged (``history`` records
    its ``global_step``). A loader without batches logs nothing and warns once. Under DDP every process measures its
    part of the data and the sums are reduced before logging, so the numbers equal one process's on the whole set:
    the repeats ``DistributedSampler`` pads the last batches with are not counted (fills that mix samples,
    ``"permute"``, or draw noise depend on how the batches are cut and so can differ). Every rank must run the same
    number of measured batches, as Lightning's samplers guarantee.

    Args:
        modalities: ``name -> dict key`` (dict batches), ``name -> index`` (tuple/list batches), or
            :class:`lightning_mc.Modality` objects (nested batches, per-modality fills, attribute masks).
        forward_fn: ``(pl_module, batch) -> Tensor``, how the model is called on a batch. Default:
            ``pl_module(*modality_tensors)``, the modality tensors as positional arguments in the order of
            ``modalities``.
        output_transform: Output activation applied before outputs are compared: ``None``, ``"softmax"``,
            ``"sigmoid"`` or a callable.
        occlusion: Default fill of modalities that set none: ``"mean"`` (per-sample mean), ``"zeros"``,
            ``"noise"``, ``"permute"``, a number or a callable.
        normalization: ``"ratio_of_sums"`` (Algorithm 1, default), ``"per_sample"`` or ``"per_sample_output"``.
        every_n_epochs: Measure on validation runs of every n-th epoch (``(epoch + 1) % n == 0``). With
            ``val_check_interval < 1`` every validation run of a selected epoch is measured.
        limit_batches: Validation batches measured per run: an int (count) or a float in ``(0, 1]`` (fraction of
            ``trainer.num_val_batches``). ``None``: all.
        dataloader_idx: Index of the validation dataloader to measure (position in a list, or in a dict's order).
        max_batch_size: Most rows per forward call of the occluded copies (``None``: 4 × the batch size).
        seed: Seed for the ``"noise"`` and ``"permute"`` fills (a private generator: the global RNG is untouched).
        run_on_sanity_check: Also measure during the sanity check (by default it adds nothing).
        run_on_fast_dev_run: Also measure when the trainer runs with ``fast_dev_run``.
        run_on_validate: Also measure in ``trainer.validate()``; by default only fitting is measured.
        dashboard: When the trainer has a ``TensorBoardLogger``, also write the TensorBoard dashboard: a
            custom-scalars layout (shares, raw values, balance), a stacked-area figure of the shares updated every
            check (with a :class:`~lightning_mc.CollapseEarlyStopping`'s threshold and stop marked) and a text
            summary at the end of fit. Other loggers are unaffected.
        check_redundancy: Also run one extra copy of each measured batch with every modality occluded at once
            (``N`` more rows per batch; off by default so the default cost is unchanged), log ``mc/all_occluded_raw``
            and warn (once) when the one-at-a-time raw values sum to less than a quarter of it: the modalities then
            look redundant and the shares are not meaningful (use :func:`lightning_mc.analyses.shapley.modality_shapley`).
        shapley: Also compute exact modality Shapley values (``M ≤ 6``): ``2^M − 1`` extra copies of each measured
            batch, one per coalition of whole modalities occluded at once (off by default). Logs
            ``mc/shapley/<m>`` (values, summing to ``v(all)``), ``mc/shapley_share/<m>`` and
            ``mc/interaction/<a>/<b>`` (positive: redundant, negative: synergistic); kept in ``latest_shapley`` and
            in each history entry under ``"shapley"``. Sum states: exact under DDP.
        ci: Coverage of percentile bootstrap intervals for the shares (e.g. ``0.95``; off by default). Logs
            ``mc/share_low/<m>`` and ``mc/share_high/<m>`` (also in ``latest`` and each history entry). Keeps the
            per-sample values (``N × M`` float64) of the first ``max_ci_samples`` measured samples per process and
            resamples them ``n_boot`` times with a generator seeded by ``seed``. DDP: the per-sample values are
            all-gathered (a torchmetrics ``"cat"`` state) and put in a canonical order, so every rank logs the same
            interval as one process would on the whole set (:mod:`lightning_mc.analyses.bootstrap`).
        n_boot: Number of bootstrap replicates (with ``ci``).
        max_ci_samples: Most samples per process whose per-sample values are kept (with ``ci``).
        perf_metric: Label-aware view (off by default): a torchmetrics metric (e.g. ``BinaryAUROC()``) computed on
            the clean outputs and with each whole modality occluded. Logs ``mc/perf_clean`` and
            ``mc/perf_drop/<m>`` (clean minus occluded: positive = the metric fell), apart from the label-free
            ``mc/share/*`` (:mod:`lightning_mc.analyses.perf_drop`). Modalities measured per attribute cost one extra copy
            each. Needs ``target``; the instance passed is cloned, never updated.
        target: Where the targets are in each batch: a dict key, a tuple index or ``batch -> Tensor``.
        per_output: Also log each output's (class's) shares, ``mc/output_share/<output>/<m>`` (for every output the
            shares sum to 1 over modalities): ``True`` names the outputs by index (``0``, ``1``, ...), a sequence of
            names (e.g. class names, one per output) names them so. Off by default; at most 16 outputs are logged
            (more: a warning, and the values stay in ``latest.per_output_shares``). No extra forward pass.

    Raises:
        ValueError: If an argument is out of range (each message names the argument and what is valid).
        TypeError: If ``modalities``, ``occlusion`` or ``forward_fn`` have the wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mc import ModalityContributionMonitor

        monitor = ModalityContributionMonitor({"image": "image", "table": "clinical"}, output_transform="softmax")
        trainer = Trainer(callbacks=[monitor])
        trainer.fit(model, datamodule)
        monitor.history[-1]["shares"]  # {'image': 0.61, 'table': 0.39}
    """

    def __init__(
        self,
        modalities: ModalitiesSpec,
        *,
        forward_fn: ForwardFn | None = None,
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
    ) -> None:
        super().__init__()
        self.modalities = resolve_modalities(modalities)
        check_normalization(normalization)
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs!r} must be a positive int.")
        _check_limit_batches(limit_batches)
        if isinstance(dataloader_idx, bool) or not isinstance(dataloader_idx, int) or dataloader_idx < 0:
            raise ValueError(f"dataloader_idx={dataloader_idx!r} must be a non-negative int.")
        self.engine = OcclusionEngine(
            self.modalities,
            forward_fn=forward_fn,
            output_transform=output_transform,
            occlusion=occlusion,
            max_batch_size=max_batch_size,
            seed=seed,
        )
        self.normalization = normalization
        self.every_n_epochs = every_n_epochs
        self.limit_batches = limit_batches
        self.dataloader_idx = dataloader_idx
        self.run_on_sanity_check = run_on_sanity_check
        self.run_on_fast_dev_run = run_on_fast_dev_run
        self.run_on_validate = run_on_validate
        self.dashboard = dashboard
        self.check_redundancy = check_redundancy
        if shapley:
            check_num_modalities(len(self.modalities))
        self.shapley = shapley
        check_ci_arguments(ci, n_boot, max_ci_samples, normalization)
        self.ci, self.n_boot, self.max_ci_samples = ci, n_boot, max_ci_samples
        self._per_sample: PerSampleRaw | None = None
        check_perf_arguments(perf_metric, target)
        self.perf_metric, self.target = perf_metric, target
        self.per_output = _check_per_output(per_output)
        self._warned_many_outputs = False
        self._perf: PerformanceDrop | None = None
        self._shapley: ModalityShapley | None = None
        #: The latest Shapley measurement (``shapley=True`` only).
        self.latest_shapley: ShapleyResult | None = None
        self._all_occluded: AllOccludedMovement | None = None
        self._warned_redundant = False
        self._dashboard: ContributionDashboard | None = None
        self._mean_images: MeanImages | None = None
        #: One entry per measured validation run: epoch, global_step, shares, raw, balance, num_samples.
        self.history: list[dict[str, Any]] = []
        #: The latest measurement, with attribute values and per-output shares.
        self.latest: ContributionResult | None = None
        self._metric: ModalityContribution | None = None
        self._metric_cache: ModalityContribution | None = None
        self._measuring = False
        self._warned_empty = False
        #: Samples of the monitored loader this process holds before DistributedSampler's padding (None: no padding).
        self._unpadded_samples: int | None = None
        self._seen_samples = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modalities=[m.name for m in self.modalities])

    @property
    def modality_names(self) -> tuple[str, ...]:
        """Names of the monitored modalities, in order."""
        return tuple(m.name for m in self.modalities)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(entry) for entry in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(entry) for entry in state_dict.get("history", [])]

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

    def _batch_limit(self, trainer: pl.Trainer) -> float:
        if self.limit_batches is None:
            return math.inf
        if isinstance(self.limit_batches, int):
            return self.limit_batches
        available = trainer.num_val_batches[self.dataloader_idx]
        return max(1, math.ceil(self.limit_batches * available)) if math.isfinite(available) else math.inf

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._dashboard = ContributionDashboard.for_trainer(trainer) if self.dashboard and stage == "fit" else None
        if self._dashboard is not None:
            self._dashboard.register_layout(trainer, margins=self.modality_names if self.ci is not None else ())

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._dashboard is not None:
            self._dashboard.finish(trainer, self.history, self.modality_names, self)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measuring = self._should_measure(trainer)
        self._drop_accumulators()
        self._seen_samples = 0
        self._unpadded_samples = self._count_unpadded_samples(trainer) if self._measuring else None
        has_figures = self._measuring and self._dashboard is not None and trainer.is_global_zero
        self._mean_images = MeanImages(self.modalities) if has_figures else None
        if self._measuring and self.dataloader_idx >= len(trainer.num_val_batches):
            raise ValueError(
                f"dataloader_idx={self.dataloader_idx} but the trainer has {len(trainer.num_val_batches)} validation "
                f"dataloader(s); valid: 0..{len(trainer.num_val_batches) - 1}."
            )

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
        if not self._measuring or dataloader_idx != self.dataloader_idx or batch_idx >= self._batch_limit(trainer):
            return
        self._measure_batch(trainer, pl_module, batch)

    def _measure_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        with trainer.precision_plugin.val_step_context():
            outputs = self.engine.run(pl_module, batch)
        if self._metric is None:
            self._metric = self._fresh_metric(outputs.attribute_names, outputs.clean)
        clean, occluded = outputs.clean, outputs.occluded
        if self._unpadded_samples is not None:  # drop the repeats DistributedSampler pads the last batches with
            keep = min(clean.shape[0], max(0, self._unpadded_samples - self._seen_samples))
            clean, occluded = clean[:keep], {name: value[:keep] for name, value in occluded.items()}
        if self.check_redundancy and not self.shapley:  # with Shapley, v(all) is its last coalition: no extra pass
            with trainer.precision_plugin.val_step_context():
                everything = [frozenset(range(len(self.modalities)))]
                _, occluded_all = self.engine.run_coalitions(pl_module, batch, everything, include_clean=False)
            if self._all_occluded is None:
                self._all_occluded = AllOccludedMovement().to(clean.device)
            self._all_occluded.update(clean, occluded_all[: clean.shape[0], 0])
        if self.shapley:
            with trainer.precision_plugin.val_step_context():
                every = coalitions(len(self.modalities))
                _, by_coalition = self.engine.run_coalitions(pl_module, batch, every, include_clean=False)
            if self._shapley is None:
                self._shapley = ModalityShapley(self.modality_names).to(clean.device)
            self._shapley.update(clean, by_coalition[: clean.shape[0]])
        if self.ci is not None:
            if self._per_sample is None:
                self._per_sample = PerSampleRaw(self.max_ci_samples).to(clean.device)
            self._per_sample.update(clean, occluded)
        if self.perf_metric is not None and self.target is not None:
            with trainer.precision_plugin.val_step_context():
                whole = whole_modality_outputs(self.engine, pl_module, batch, outputs)
            if self._perf is None:
                self._perf = PerformanceDrop(self.perf_metric, self.modality_names).to(clean.device)
            keep = clean.shape[0]
            target = select_target(batch, self.target)[:keep]
            self._perf.update(target, clean, {name: value[:keep] for name, value in whole.items()})
        self._seen_samples += outputs.clean.shape[0]
        self._metric.update(clean, occluded)
        if self._mean_images is not None:
            self._mean_images.update(batch, clean.shape[0])

    def _fresh_metric(self, attribute_names: dict[str, tuple[str, ...]], clean: Tensor) -> ModalityContribution:
        """An empty metric for this check.

        The last check's metric is reset and reused when it fits: building one costs as much as a small model's
        forward pass.
        """
        cached = self._metric_cache
        if (
            cached is None
            or cached.attribute_names != attribute_names
            or cached.attribute_diff.shape[1] != clean.shape[1]
            or cached.device != clean.device
        ):
            cached = ModalityContribution(attribute_names, num_outputs=clean.shape[1], normalization=self.normalization)
            self._metric_cache = cached.to(clean.device)
        else:
            cached.reset()
        return self._metric_cache

    def _count_unpadded_samples(self, trainer: pl.Trainer) -> int | None:
        # DistributedSampler(drop_last=False) gives rank r the samples at padded positions r, r + W, r + 2W, ... of
        # the dataset's N indices followed by repeats of the first ones: this rank's real ones are its first
        # ceil((N - r) / W); the rest repeat samples another rank measures.
        loop = (
            trainer.validate_loop if trainer.state.fn == TrainerFn.VALIDATING else trainer.fit_loop.epoch_loop.val_loop
        )
        combined = getattr(loop, "_combined_loader", None)
        loaders = combined.iterables if combined is not None else trainer.val_dataloaders
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        elif not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        sampler = getattr(loaders[self.dataloader_idx], "sampler", None) if self.dataloader_idx < len(loaders) else None
        if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
            return None
        return max(0, math.ceil((len(sampler.dataset) - sampler.rank) / sampler.num_replicas))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning skips a validation run whose loaders are all empty: no validation hook tells the monitor
        num_val_batches = trainer.num_val_batches
        if (
            self.dataloader_idx < len(num_val_batches)
            and num_val_batches[self.dataloader_idx] == 0
            and self._should_measure(trainer)
        ):
            self._warn_empty()

    def _warn_empty(self) -> None:
        if not self._warned_empty:
            self._warned_empty = True
            rank_zero_warn(
                f"ModalityContributionMonitor measured no batch of validation dataloader {self.dataloader_idx} "
                "(the loader is empty or limit_batches excluded every batch); nothing is logged."
            )

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a failed check leaves no partial sums behind (the history only ever holds completed checks)
        self._measuring = False
        self._drop_accumulators()

    def _drop_accumulators(self) -> None:
        """Forget every sum of the current check (a new check starts empty; a failed one leaves nothing behind)."""
        self._metric = None
        self._all_occluded = None
        self._shapley = None
        self._per_sample = None
        self._perf = None

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._measuring:
            return
        self._measuring = False
        if self._metric is None:
            self._warn_empty()
            return
        metric, self._metric = self._metric, None
        values = metric.compute()  # reduced across processes: every rank logs the same numbers
        result = ContributionResult.from_values(values, metric.attribute_names, self.normalization)
        shapley = None
        if self._shapley is not None:
            shapley_metric, self._shapley = self._shapley, None
            shapley = ShapleyResult.from_values(shapley_metric.compute(), self.modality_names)
        if self.check_redundancy:
            if shapley is not None:
                all_occluded_raw = shapley.coalition_values["+".join(self.modality_names)]
            else:
                all_occluded, self._all_occluded = self._all_occluded, None
                assert all_occluded is not None  # updated with every batch the metric was
                all_occluded_raw = float(all_occluded.compute())
            result = dataclasses.replace(result, all_occluded_raw=all_occluded_raw)
            pl_module.log("mc/all_occluded_raw", result.all_occluded_raw, on_step=False, on_epoch=True, sync_dist=True)
            message = redundancy_message(result.raw, result.all_occluded_raw)
            if message is not None and not self._warned_redundant:
                self._warned_redundant = True
                rank_zero_warn(message, category=UserWarning)
        extra: dict[str, float] = {}
        if self._per_sample is not None and self.ci is not None:
            per_sample, self._per_sample = self._per_sample, None
            low, high = share_intervals(
                per_sample, self.modality_names, self.ci, self.n_boot, self.engine.seed, self.normalization
            )
            result = dataclasses.replace(result, ci=self.ci, share_low=low, share_high=high)
            extra.update({f"mc/share_low/{name}": value for name, value in low.items()})
            extra.update({f"mc/share_high/{name}": value for name, value in high.items()})
        if self._perf is not None:
            perf, self._perf = self._perf, None
            perf_clean, perf_drop = perf.compute()
            result = dataclasses.replace(result, perf_clean=perf_clean, perf_drop=perf_drop)
            extra["mc/perf_clean"] = perf_clean
            extra.update({f"mc/perf_drop/{name}": value for name, value in perf_drop.items()})
        self._log(pl_module, result)
        for key, value in extra.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)
        self.latest = result
        self.history.append(
            {
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "shares": dict(result.shares),
                "raw": dict(result.raw),
                "balance": result.balance,
                "num_samples": result.num_samples,
            }
        )
        if result.share_low is not None:
            self.history[-1].update(share_low=dict(result.share_low), share_high=dict(result.share_high or {}))
        if result.perf_drop is not None:
            self.history[-1].update(perf_clean=result.perf_clean, perf_drop=dict(result.perf_drop))
        if shapley is not None:
            self.latest_shapley = shapley
            self.latest = dataclasses.replace(result, shapley=shapley)
            self.history[-1]["shapley"] = dict(shapley.values)
            logged = {f"mc/shapley/{name}": value for name, value in shapley.values.items()}
            logged.update({f"mc/shapley_share/{name}": share for name, share in shapley.shares.items()})
            logged.update({f"mc/interaction/{a}/{b}": value for (a, b), value in shapley.interactions.items()})
            for key, value in logged.items():
                pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)
        if self._dashboard is not None:
            self._dashboard.update(trainer, self.history, self.modality_names, self)
            self._log_attribute_figures(trainer, result)

    def _log_attribute_figures(self, trainer: pl.Trainer, result: ContributionResult) -> None:
        # figures only where scalars would be too many (> MAX_LOGGED_ATTRIBUTES); rank 0 writes TensorBoard
        if self._dashboard is None or not trainer.is_global_zero:
            return
        means = self._mean_images.means() if self._mean_images is not None else {}
        figures = attribute_figures(result, self.modalities, means, min_attributes=MAX_LOGGED_ATTRIBUTES + 1)
        for tag, figure in figures.items():
            self._dashboard.logger.experiment.add_figure(tag, figure, global_step=trainer.global_step)

    def _log(self, pl_module: pl.LightningModule, result: ContributionResult) -> None:
        # values are already identical on every rank; sync_dist=True keeps Lightning's DDP bookkeeping consistent
        logged = {f"mc/share/{name}": share for name, share in result.shares.items()}
        logged.update({f"mc/raw/{name}": raw for name, raw in result.raw.items()})
        logged["mc/balance"] = result.balance
        for name, attribute_shares in result.attribute_shares.items():
            if 1 < len(attribute_shares) <= MAX_LOGGED_ATTRIBUTES:
                logged.update({f"mc/attr/{name}/{attr}": share for attr, share in attribute_shares.items()})
        logged.update(self._per_output_scalars(result))
        for key, value in logged.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)

    def _per_output_scalars(self, result: ContributionResult) -> dict[str, float]:
        if self.per_output is False:
            return {}
        num_outputs = len(next(iter(result.per_output_shares.values())))
        if self.per_output is True:
            output_names: Sequence[str] = [str(index) for index in range(num_outputs)]
        else:
            output_names = self.per_output
            if len(output_names) != num_outputs:
                raise ValueError(
                    f"per_output names {len(output_names)} outputs ({list(output_names)}) but the model has "
                    f"{num_outputs}; give one name per output, or per_output=True to name them by index."
                )
        if num_outputs > MAX_LOGGED_ATTRIBUTES:
            if not self._warned_many_outputs:
                self._warned_many_outputs = True
                rank_zero_warn(
                    f"per_output: the model has {num_outputs} outputs; per-output shares are logged for at most "
                    f"{MAX_LOGGED_ATTRIBUTES}. They are in monitor.latest.per_output_shares.",
                    category=UserWarning,
                )
            return {}
        return {
            f"mc/output_share/{output}/{name}": shares[index]
            for name, shares in result.per_output_shares.items()
            for index, output in enumerate(output_names)
        }


def _check_per_output(per_output: bool | Sequence[str]) -> bool | tuple[str, ...]:
    if isinstance(per_output, bool):
        return per_output
    if (
        isinstance(per_output, str)
        or not isinstance(per_output, Sequence)
        or not per_output
        or not all(isinstance(name, str) and name for name in per_output)
        or len(set(per_output)) != len(per_output)
    ):
        raise ValueError(
            f"per_output={per_output!r} must be a bool or a non-empty sequence of unique, non-empty output names."
        )
    return tuple(per_output)


def _check_limit_batches(limit_batches: int | float | None) -> None:
    if limit_batches is None:
        return
    if isinstance(limit_batches, bool) or not isinstance(limit_batches, (int, float)):
        raise TypeError(f"limit_batches={limit_batches!r} must be an int, a float in (0, 1] or None.")
    if isinstance(limit_batches, int) and limit_batches < 1:
        raise ValueError(f"limit_batches={limit_batches!r} must be at least 1 (or None for all batches).")
    if isinstance(limit_batches, float) and not 0.0 < limit_batches <= 1.0:
        raise ValueError(f"limit_batches={limit_batches!r} as a fraction must be in (0, 1].")
