r"""Collapse Early Stopping: stop (or flag) a run when a modality's contribution share collapses."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_mc.analyses.label_kinds import LabelKind, check_label_kind, read_labels
from lightning_mc.analyses.perf_drop import TargetSpec
from lightning_mc.analyses.probe import DEFAULT_MARGIN, ProbeResult, linear_probe
from lightning_mc.callbacks.monitor import ModalityContributionMonitor
from lightning_mc.callbacks.monitor_reader import MonitorReader
from lightning_mc.callbacks.probe_features import ProbeFeatures, check_labels
from lightning_mc.core.checks import check_fraction, check_int
from lightning_mc.core.result import HistoryEntry, undefined_shares_cause
from lightning_mc.views.tensorboard import CollapseMarks, marks_from_stopper

CollapseAction = Literal["stop", "warn"]
_ACTIONS = ("stop", "warn")
UndecidedAction = Literal["stop", "continue"]
_UNDECIDED = ("stop", "continue")
#: What a share cannot show, said in every label-free flag.
LABEL_FREE_LIMIT = "label-free, this cannot tell an unlearned modality from an uninformative one: pass labels= to check"


class CollapseEarlyStopping(MonitorReader):
    r"""Stop training (or only flag it) when a modality's contribution share collapses.

    Reads the shares that a :class:`~lightning_mc.ModalityContributionMonitor` in the same trainer measured (the
    values logged as ``<prefix>/share/<modality>``, identical on every process) after each validation run that the
    monitor measured. A modality's share is *low* when it stays below ``min_share`` for ``patience`` consecutive
    checks after the warm-up: the network ignores that modality.

    What a low share means depends on the data, and the shares alone cannot tell:

    - **a collapse**: the modality predicts the labels on its own, but the network has abandoned it (a shortcut in
      another modality, a modality slower to learn);
    - **an uninformative modality**: it has nothing to give on this data (a pure-noise table, a field that is constant
      at this site); the network is right to ignore it.

    Without ``labels`` every low share is flagged as a collapse and the message says that it may not be one. With
    ``labels`` (where the labels are in the batch) each low share is checked before it is flagged, by a linear probe
    (:func:`~lightning_mc.analyses.probe.linear_probe`) of that modality's features alone (its encoders' outputs where
    the monitor has ``encoders``, else its input; :mod:`lightning_mc.callbacks.probe_features`), cross-validated over
    the samples the monitor measured in that validation run *and* a seeded reservoir of up to 1,024 of the epoch's
    training samples, gathered as the training batches pass (no extra forward call). Its score (AUROC, balanced
    accuracy, mean AUROC, concordance index or rank correlation, by ``label_kind``) and the score's confidence bounds
    give one of three verdicts:

    - **informative** (the lower bound clears chance + ``probe_margin``): a collapse, flagged; with ``action="stop"``
      the trainer stops;
    - **uninformative** (the upper bound stays under chance + ``probe_margin``): reported as such, training goes on;
    - **undecided** (neither: too few samples to tell): with ``undecided="stop"`` (the default) the low share is
      flagged as it would be without labels, saying that the probe could not decide; with ``"continue"`` it is
      reported and training goes on.

    While a share stays low the probe runs again at every check, so a verdict is never frozen: an uninformative or
    undecided modality that the probe later finds informative is flagged then. Each verdict is kept with its epoch in
    ``probe_results``. The probe costs a fraction of a second on a thousand samples (``docs/how-to/collapse.md`` has
    the measurements) and runs only at a check that may flag a modality; the reservoir costs one copy of the drawn
    training rows (hashed to at most 256 columns) of each watched modality, from the end of the warm-up. Every
    ``labels=`` problem (a missing key, an index out of range, labels of the wrong length or of no kind the probe
    knows) is raised on the first batch Lightning runs, before any training step.

    A check whose share is NaN (no occlusion moved any output, or every output was NaN) neither counts towards the
    patience nor resets it; it is reported with a warning. In DDP the probe's features are gathered from every
    process (every rank fits the same probe) and the decisions are reduced across processes, so every rank stops at
    the same epoch.

    Every ``trainer.fit`` starts the stopper fresh (counts, flags, verdicts, history: ``setup`` resets them); a fit
    resumed from a checkpoint (``ckpt_path=``) continues them exactly, as the checkpoint holds them.

    Args:
        min_share: Threshold in ``(0, 1)``: a watched modality whose share is below it counts as low.
        patience: Number of consecutive monitor checks below ``min_share`` that flag a collapse. Counted in checks
            (validation runs the monitor measured), not in epochs: with ``every_n_epochs=2`` on the monitor and
            ``patience=3`` the collapse must last 6 epochs.
        warmup_epochs: Checks of epochs ``< warmup_epochs`` are recorded but not counted (early shares are noisy).
        modalities: Names of the modalities to watch; ``None`` watches every modality of the monitor.
        action: ``"stop"`` to stop the run at a collapse, ``"warn"`` to only report and record it.
        verbose: Also report every check that counts towards a collapse (rank 0 only).
        monitor: The monitor whose shares are read (with several monitors in the trainer, e.g. an internal and an
            external validation set, the one to watch). ``None`` finds the single
            :class:`~lightning_mc.ModalityContributionMonitor` in ``trainer.callbacks``.
        labels: Where the labels are in each training and validation batch, spelled as the monitor's ``target``: a
            dict key, a tuple index or a callable ``batch -> Tensor``. ``None``: label-free.
        probe_margin: How far above chance, in ``(0, 1)``, the probe's confidence bounds are compared (with
            ``labels``).
        label_kind: What the labels are: ``"classes"`` (class ids or one-hot rows), ``"multilabel"`` (multi-hot
            findings, ``(N, K)``), ``"survival"`` (``[time, event]`` rows, ``(N, 2)``), ``"continuous"`` (one target
            per sample), or ``"auto"``, which reads the kind from the values and refuses what it cannot tell (integral
            floats outside 0–19, a two-column float tensor).
        undecided: What an undecided probe does: ``"stop"`` flags the low share as without labels, ``"continue"``
            reports it and goes on.

    Attributes:
        collapsed_modality: Name of the modality whose collapse was flagged first, ``None`` while there is none.
        collapse_epoch: Epoch of the check that flagged the collapse (with either action), or ``None``.
        collapse_start_epoch: Epoch where that collapse began: the first counted check of the run of consecutive
            checks below ``min_share`` that flagged it, or ``None``. The last checkpoint saved before this epoch holds
            the pre-collapse model (``docs/how-to/collapse.md``).
        collapse_share: The modality's share at that check.
        stopped_epoch: Epoch at which training was told to stop, ``None`` if it was not (always ``None`` with
            ``action="warn"``).
        collapse_message: The message reported when the collapse was flagged.
        reports: Every message reported, in order: each flagged collapse, and each uninformative or (with
            ``undecided="continue"``) undecided verdict when it is first reached.
        probe_results: ``modality -> [ProbeResult, ...]``: every probe of each modality, in order, each with its
            ``epoch`` and ``verdict`` (with ``labels``).
        wait_count: ``modality -> number of consecutive counted checks below min_share``.
        history: One entry per check: ``epoch``, ``global_step``, ``shares`` (watched modalities), ``counted``
            (False during the warm-up), ``wait_count`` after the check, ``collapsed`` (flagged at this check),
            ``uninformative`` and ``undecided`` (the low modalities of those verdicts that training went on with).

    Raises:
        ValueError: If ``min_share``, ``patience``, ``warmup_epochs``, ``action``, ``modalities``, ``probe_margin``,
            ``label_kind`` or ``undecided`` is invalid (at construction), if ``modalities`` names a modality the
            monitor does not measure (at ``setup``), or if ``labels`` finds no labels of ``label_kind`` in a batch (at
            the first training or validation batch).
        TypeError: If ``monitor`` is not a :class:`~lightning_mc.ModalityContributionMonitor`, or ``labels`` is not a
            key, an index or a callable.
        RuntimeError: At ``setup``, if the trainer has no :class:`~lightning_mc.ModalityContributionMonitor`, or
            several and ``monitor`` does not say which one.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mc import CollapseEarlyStopping, ModalityContributionMonitor

        # batches are (image, table, label) tuples
        monitor = ModalityContributionMonitor({"image": 0, "table": 1}, output_transform="softmax")
        stopper = CollapseEarlyStopping(min_share=0.1, patience=2, warmup_epochs=3, labels=2)
        trainer = Trainer(max_epochs=50, callbacks=[monitor, stopper])
        trainer.fit(model, train_loader, val_loader)
        print(stopper.reports)  # ["Modality 'image' collapsed: ...", or "Modality 'table' is uninformative ..."]
        stopper.probe_results  # {'image': [ProbeResult(verdict='informative', score=0.62, epoch=7, ...)]}
    """

    def __init__(
        self,
        min_share: float = 0.05,
        patience: int = 2,
        warmup_epochs: int = 0,
        modalities: str | list[str] | tuple[str, ...] | None = None,
        action: CollapseAction = "stop",
        verbose: bool = False,
        monitor: ModalityContributionMonitor | None = None,
        labels: TargetSpec | None = None,
        probe_margin: float = DEFAULT_MARGIN,
        label_kind: LabelKind = "auto",
        undecided: UndecidedAction = "stop",
    ) -> None:
        super().__init__(monitor)
        check_fraction("min_share", min_share)
        check_int("patience", patience, hint=" (number of consecutive checks)")
        check_int("warmup_epochs", warmup_epochs, minimum=0)
        if action not in _ACTIONS:
            raise ValueError(f"action={action!r} must be one of {', '.join(map(repr, _ACTIONS))}.")
        check_labels(labels)
        check_fraction("probe_margin", probe_margin, hint=" (above chance)")
        check_label_kind(label_kind)
        if undecided not in _UNDECIDED:
            raise ValueError(f"undecided={undecided!r} must be one of {', '.join(map(repr, _UNDECIDED))}.")
        self.min_share = float(min_share)
        self.patience = patience
        self.warmup_epochs = warmup_epochs
        self.modalities = _check_modalities(modalities)
        self.action = action
        self.verbose = verbose
        self.labels = labels
        self.probe_margin = float(probe_margin)
        self.label_kind = label_kind
        self.undecided = undecided
        self._features = ProbeFeatures(labels, label_kind) if labels is not None else None
        self._watched: tuple[str, ...] = ()
        self._start_fit()

    def _start_fit(self) -> None:
        """The state of a fit that has not checked anything yet."""
        super()._start_fit()
        self.collapsed_modality: str | None = None
        self.collapse_epoch: int | None = None
        self.collapse_start_epoch: int | None = None
        self.collapse_share: float | None = None
        self.stopped_epoch: int | None = None
        self.collapse_message: str | None = None
        self.reports: list[str] = []
        self.probe_results: dict[str, list[ProbeResult]] = {}
        self.wait_count: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []
        self._below_since: dict[str, int] = {}
        self._flagged: set[str] = set()
        self._verdicts: dict[
            str, str
        ] = {}  # the latest verdict of each modality while it stays low: reported on change

    @property
    @override
    def state_key(self) -> str:
        modalities = None if self.modalities is None else list(self.modalities)
        return self._monitor_state_key(min_share=self.min_share, modalities=modalities, labels=self.labels is not None)

    def collapse_marks(self) -> CollapseMarks:
        """The threshold and the flagged collapse, for the monitor's dashboard figure and summary."""
        return marks_from_stopper(self)

    @property
    def watched_modalities(self) -> tuple[str, ...]:
        """The modalities this stopper watches (known after ``setup``)."""
        return self._watched

    @property
    def uninformative_modalities(self) -> tuple[str, ...]:
        """The modalities whose latest probe says uninformative (with ``labels``)."""
        return tuple(name for name, results in self.probe_results.items() if results[-1].verdict == "uninformative")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.monitor = self._find_monitor(trainer)
        if stage == TrainerFn.FITTING:
            self._start_fit()  # a resumed fit's checkpoint is loaded after setup and overwrites this
        if self._features is not None:
            self._features.checked = set()  # every run checks labels= on its first batches
        names = self.monitor.modality_names
        if self.modalities is None:
            self._watched = names
            return
        unknown = [name for name in self.modalities if name not in names]
        if unknown:
            raise ValueError(
                f"CollapseEarlyStopping(modalities={list(self.modalities)!r}): {unknown!r} not measured by the "
                f"monitor; valid names: {list(names)!r}."
            )
        self._watched = self.modalities

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "wait_count": dict(self.wait_count),
            "below_since": dict(self._below_since),
            "flagged": sorted(self._flagged),
            "verdicts": dict(self._verdicts),
            "collapsed_modality": self.collapsed_modality,
            "collapse_epoch": self.collapse_epoch,
            "collapse_start_epoch": self.collapse_start_epoch,
            "collapse_share": self.collapse_share,
            "stopped_epoch": self.stopped_epoch,
            "collapse_message": self.collapse_message,
            "reports": list(self.reports),
            "probe_results": {
                name: [result.as_dict() for result in results] for name, results in self.probe_results.items()
            },
            "history": [dict(entry) for entry in self.history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.wait_count = dict(state_dict.get("wait_count", {}))
        self._below_since = dict(state_dict.get("below_since", {}))
        self._flagged = set(state_dict.get("flagged", []))
        self._verdicts = dict(state_dict.get("verdicts", {}))
        self.collapsed_modality = state_dict.get("collapsed_modality")
        self.collapse_epoch = state_dict.get("collapse_epoch")
        self.collapse_start_epoch = state_dict.get("collapse_start_epoch")
        self.collapse_share = state_dict.get("collapse_share")
        self.stopped_epoch = state_dict.get("stopped_epoch")
        self.collapse_message = state_dict.get("collapse_message")
        self.reports = list(state_dict.get("reports", []))
        stored = state_dict.get("probe_results", {})
        self.probe_results = {
            name: [ProbeResult.from_dict(values) for values in results] for name, results in stored.items()
        }
        self.history = [dict(entry) for entry in state_dict.get("history", [])]

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._features is not None and self.monitor is not None:
            self._features.train_start(trainer, pl_module, self.monitor, self._collected(trainer.current_epoch))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._features is not None and self.monitor is not None:
            self._features.check(self.monitor, batch, "training")
            self._features.train_batch_start(batch)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._features is not None:
            self._features.train_batch_end(batch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._features is not None:
            self._features.train_stop()

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._features is not None and self.monitor is not None and not self._skips(trainer):
            self._features.start(trainer, pl_module, self.monitor, self._may_flag(trainer.current_epoch))

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._features is not None and self.monitor is not None:
            if dataloader_idx == self.monitor.dataloader_idx:  # the loader the monitor measures and the probe reads
                self._features.check(self.monitor, batch, "validation")
            self._features.batch_start(trainer, batch, batch_idx, dataloader_idx)

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
        if self._features is not None:
            self._features.batch_end(batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._features is not None:
            self._features.stop()  # the rows stay for the check in on_validation_end

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._features is not None:
            self._features.clear()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._features is not None:
            self._features.clear()

    def _collected(self, epoch: int) -> tuple[str, ...]:
        """The modalities whose training rows an epoch keeps: every watched one not flagged, from the warm-up's end.

        Every one, not only those one low check short of ``patience``: a check in the middle of the epoch
        (``val_check_interval``) may bring one there.
        """
        if epoch < self.warmup_epochs:
            return ()
        return tuple(name for name in self._watched if name not in self._flagged)

    def _may_flag(self, epoch: int) -> tuple[str, ...]:
        """The watched modalities that a check at ``epoch`` may flag: those one low check short of ``patience``."""
        if epoch < self.warmup_epochs:
            return ()
        return tuple(
            name
            for name in self._watched
            if name not in self._flagged and self.wait_count.get(name, 0) + 1 >= self.patience
        )

    @override
    def _on_monitor_check(self, trainer: pl.Trainer, entry: HistoryEntry) -> None:
        try:
            self._run_collapse_check(trainer, entry)
        finally:
            if self._features is not None:
                self._features.clear()

    def _run_collapse_check(self, trainer: pl.Trainer, entry: HistoryEntry) -> None:
        """Updates the counts with one monitor check, confirms what may be flagged, stops when a collapse is flagged."""
        epoch = int(entry["epoch"])
        shares = {name: float(entry["shares"][name]) for name in self._watched}
        counted = epoch >= self.warmup_epochs
        low = self._update_counts(shares, epoch, undefined_shares_cause(entry)) if counted else []
        probes = self._probe(trainer, low) if low and self._features is not None else {}
        collapsed, uninformative, undecided = None, [], []
        for name in low:  # lowest share first: it names the collapse
            result = probes.get(name)
            verdict = "label-free" if result is None else result.verdict
            if verdict == "uninformative" or (verdict == "undecided" and self.undecided == "continue"):
                (uninformative if verdict == "uninformative" else undecided).append(name)
                if self._verdicts.get(name) != verdict:  # said once per verdict, not at every check it holds
                    self._report(self._continue_message(name, shares[name], epoch, result), warn=False)
                self._verdicts[name] = verdict
            else:
                self._flag(name, shares[name], epoch, result)
                collapsed = collapsed or name
        self.history.append(
            {
                "epoch": epoch,
                "global_step": int(entry["global_step"]),
                "shares": shares,
                "counted": counted,
                "wait_count": dict(self.wait_count),
                "collapsed": collapsed,
                "uninformative": uninformative,
                "undecided": undecided,
            }
        )
        if self.action != "stop":
            return
        # keep signalling while a flagged modality stays collapsed (``min_epochs`` may defer the stop); every process
        # reads the same reduced shares, and reducing the decision keeps them in lockstep regardless
        should_stop = trainer.strategy.reduce_boolean_decision(bool(self._flagged), all=False)
        if should_stop:
            trainer.should_stop = True
            if self.stopped_epoch is None:
                self.stopped_epoch = epoch

    def _update_counts(self, shares: dict[str, float], epoch: int, cause: str) -> list[str]:
        """Counts consecutive checks below ``min_share``; returns the modalities that reach ``patience`` now.

        ``cause`` says why shares are NaN, when some are (:func:`~lightning_mc.core.result.undefined_shares_cause`).
        """
        undefined = [name for name, share in shares.items() if math.isnan(share)]
        if undefined:
            counts = ", ".join(f"{name}: {self.wait_count.get(name, 0)}" for name in undefined)
            rank_zero_warn(
                f"CollapseEarlyStopping: {', '.join(f'{self._prefix}/share/{name}' for name in undefined)} NaN at "
                f"epoch {epoch} ({cause}); this check neither counts towards patience={self.patience} nor "
                f"resets the counts ({counts})."
            )
        reaching: list[str] = []
        for name, share in shares.items():
            if math.isnan(share):
                continue
            if share >= self.min_share:
                self.wait_count[name] = 0
                self._below_since.pop(name, None)
                self._flagged.discard(name)
                self._verdicts.pop(name, None)
                continue
            self.wait_count[name] = self.wait_count.get(name, 0) + 1
            self._below_since.setdefault(name, epoch)
            if self.verbose:
                rank_zero_info(
                    f"CollapseEarlyStopping: {self._prefix}/share/{name} = {share:.4f} < min_share = {self.min_share} "
                    f"at epoch "
                    f"{epoch} ({self.wait_count[name]}/{self.patience} checks)."
                )
            if self.wait_count[name] >= self.patience and name not in self._flagged:
                reaching.append(name)  # probed again at every check while it stays low: the verdict is never frozen
        return sorted(reaching, key=lambda name: shares[name])

    def _probe(self, trainer: pl.Trainer, names: list[str]) -> dict[str, ProbeResult]:
        """The linear probe of each of ``names`` on this epoch's rows (collective under DDP: every rank calls it)."""
        assert self._features is not None
        found, labels, train_labels = self._features.gather(trainer)
        kind = read_labels(labels, self.label_kind) if len(labels) else None
        results = {}
        for name in names:
            if name not in found or kind is None:  # not collected in this run (the stopper's state was set by hand)
                continue
            val, train, source = found[name]
            result = linear_probe(
                val,
                kind,
                train_features=train,
                train_labels=train_labels if train is not None else None,
                margin=self.probe_margin,
                what=source,
            )
            # every rank fitted the same rows with the same seed; reducing keeps them in lockstep all the same
            verdict = result.verdict
            for candidate in ("informative", "uninformative"):
                agreed = trainer.strategy.reduce_boolean_decision(verdict == candidate, all=True)
                if (verdict == candidate) != agreed:
                    verdict = "undecided"
            result = dataclasses.replace(result, verdict=verdict, epoch=int(trainer.current_epoch))
            self.probe_results.setdefault(name, []).append(result)
            results[name] = result
        return results

    def _shares_text(self, name: str, share: float, epoch: int) -> str:
        """What the shares show: where the share is, how far it fell, for how many checks."""
        since, checks = self._below_since[name], self.wait_count[name]
        earlier = [
            (float(entry["shares"][name]), int(entry["epoch"]))
            for entry in self.history
            if entry["epoch"] < since and not math.isnan(entry["shares"][name])
        ]
        peak = max(earlier, default=None)
        fell = (
            f"it fell from {peak[0]:.2f} (epoch {peak[1]}) and stayed"
            if peak is not None and peak[0] >= self.min_share
            else "it stayed"
        )
        return (
            f"{self._prefix}/share/{name} = {share:.4f} at epoch {epoch}, {self.min_share - share:.4f} below the "
            f"threshold; {fell} below min_share={self.min_share} for {checks} consecutive checks (epochs "
            f"{since}–{epoch}): the network ignores it"
        )

    def _flag(self, name: str, share: float, epoch: int, result: ProbeResult | None) -> None:
        self._flagged.add(name)
        consequence = "Signaling Trainer to stop." if self.action == "stop" else "Training continues (action='warn')."
        if result is None:
            meaning = f"; {LABEL_FREE_LIMIT}."
        elif result.informative:
            meaning = (
                f", yet its {result.features} alone predicts the labels: a linear probe scores {result.describe()}: "
                "an informative modality, abandoned."
            )
        else:
            meaning = (
                f"; a linear probe of its {result.features} could not decide whether it predicts the labels: "
                f"{result.describe()}. It is flagged as without labels (undecided='stop'): the shares alone cannot "
                "tell an unlearned modality from an uninformative one."
            )
        message = f"Modality {name!r} collapsed: {self._shares_text(name, share, epoch)}{meaning} {consequence}"
        if self.collapsed_modality is None:
            self.collapsed_modality = name
            self.collapse_epoch = epoch
            self.collapse_start_epoch = self._below_since[name]
            self.collapse_share = share
            self.collapse_message = message
        self._report(message, warn=self.action != "stop")

    def _continue_message(self, name: str, share: float, epoch: int, result: ProbeResult) -> str:
        again = "the probe runs again at each check while the share stays low."
        if result.verdict == "uninformative":
            return (
                f"Modality {name!r} is uninformative on this data, not collapsed: "
                f"{self._shares_text(name, share, epoch)}, and its {result.features} alone does not predict the "
                f"labels: a linear probe scores {result.describe()}, within the margin of chance: it has nothing to "
                f"give here. Training continues; {again}"
            )
        return (
            f"Modality {name!r} is low, and the probe is undecided: {self._shares_text(name, share, epoch)}; a linear "
            f"probe of its {result.features} could not decide whether it predicts the labels: {result.describe()}. "
            f"Training continues (undecided='continue'); {again}"
        )

    def _report(self, message: str, warn: bool) -> None:
        self.reports.append(message)
        if warn:
            rank_zero_warn(message)
        else:
            rank_zero_info(message)


def _check_modalities(modalities: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    if modalities is None:
        return None
    if isinstance(modalities, str):
        modalities = (modalities,)
    if not isinstance(modalities, (list, tuple)) or not modalities:
        raise ValueError(f"modalities={modalities!r} must be None, a modality name or a non-empty list of names.")
    if not all(isinstance(name, str) and name for name in modalities):
        raise ValueError(f"modalities={modalities!r} must hold non-empty strings (modality names).")
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities={modalities!r} names a modality more than once.")
    return tuple(modalities)
