r"""Collapse Early Stopping: stop (or flag) a run when a modality's contribution share collapses."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_mc.callbacks.monitor import ModalityContributionMonitor
from lightning_mc.callbacks.monitor_reader import MonitorReader
from lightning_mc.core.checks import check_fraction, check_int
from lightning_mc.core.result import HistoryEntry
from lightning_mc.views.tensorboard import CollapseMarks, marks_from_stopper

CollapseAction = Literal["stop", "warn"]
_ACTIONS = ("stop", "warn")


class CollapseEarlyStopping(MonitorReader):
    r"""Stop training (or only flag it) when a modality's contribution share collapses.

    Reads the shares that a :class:`~lightning_mc.ModalityContributionMonitor` in the same trainer measured (the
    values logged as ``<prefix>/share/<modality>``, identical on every process) after each validation run that the
    monitor
    measured. A modality *collapses* when its share stays below ``min_share`` for ``patience`` consecutive checks
    after the warm-up. With ``action="stop"`` the trainer is told to stop at the end of that epoch; with
    ``action="warn"`` the collapse is only reported and recorded, and training goes on.

    A check whose share is NaN (no occlusion moved any output, so shares are undefined) neither counts towards the
    patience nor resets it; it is reported with a warning. In DDP the decision is reduced across processes, so every
    rank stops at the same epoch.

    Args:
        min_share: Threshold in ``(0, 1)``: a watched modality whose share is below it counts as collapsing.
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
        wait_count: ``modality -> number of consecutive counted checks below min_share``.
        history: One entry per check: ``epoch``, ``global_step``, ``shares`` (watched modalities), ``counted``
            (False during the warm-up), ``wait_count`` after the check and ``collapsed`` (flagged at this check).

    Raises:
        ValueError: If ``min_share``, ``patience``, ``warmup_epochs``, ``action`` or ``modalities`` is invalid (at
            construction), or if ``modalities`` names a modality the monitor does not measure (at ``setup``).
        TypeError: If ``monitor`` is not a :class:`~lightning_mc.ModalityContributionMonitor`.
        RuntimeError: At ``setup``, if the trainer has no :class:`~lightning_mc.ModalityContributionMonitor`, or
            several and ``monitor`` does not say which one.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mc import CollapseEarlyStopping, ModalityContributionMonitor

        monitor = ModalityContributionMonitor({"image": 0, "table": 1}, output_transform="softmax")
        stopper = CollapseEarlyStopping(min_share=0.1, patience=2, warmup_epochs=3)
        trainer = Trainer(max_epochs=50, callbacks=[monitor, stopper])
        trainer.fit(model, train_loader, val_loader)
        if stopper.collapsed_modality is not None:
            print(stopper.collapse_message)  # Modality 'image' collapsed: ...
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
    ) -> None:
        super().__init__(monitor)
        check_fraction("min_share", min_share)
        check_int("patience", patience, hint=" (number of consecutive checks)")
        check_int("warmup_epochs", warmup_epochs, minimum=0)
        if action not in _ACTIONS:
            raise ValueError(f"action={action!r} must be one of {', '.join(map(repr, _ACTIONS))}.")
        self.min_share = float(min_share)
        self.patience = patience
        self.warmup_epochs = warmup_epochs
        self.modalities = _check_modalities(modalities)
        self.action = action
        self.verbose = verbose
        self.collapsed_modality: str | None = None
        self.collapse_epoch: int | None = None
        self.collapse_start_epoch: int | None = None
        self.collapse_share: float | None = None
        self.stopped_epoch: int | None = None
        self.collapse_message: str | None = None
        self.wait_count: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []
        self._below_since: dict[str, int] = {}
        self._flagged: set[str] = set()
        self._watched: tuple[str, ...] = ()

    @property
    @override
    def state_key(self) -> str:
        modalities = None if self.modalities is None else list(self.modalities)
        return self._monitor_state_key(min_share=self.min_share, modalities=modalities)

    def collapse_marks(self) -> CollapseMarks:
        """The threshold and the flagged collapse, for the monitor's dashboard figure and summary."""
        return marks_from_stopper(self)

    @property
    def watched_modalities(self) -> tuple[str, ...]:
        """The modalities this stopper watches (known after ``setup``)."""
        return self._watched

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.monitor = self._find_monitor(trainer)
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
            "collapsed_modality": self.collapsed_modality,
            "collapse_epoch": self.collapse_epoch,
            "collapse_start_epoch": self.collapse_start_epoch,
            "collapse_share": self.collapse_share,
            "stopped_epoch": self.stopped_epoch,
            "collapse_message": self.collapse_message,
            "history": [dict(entry) for entry in self.history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = dict(state_dict.get("wait_count", {}))
        self._below_since = dict(state_dict.get("below_since", {}))
        self._flagged = set(state_dict.get("flagged", []))
        super().load_state_dict(state_dict)
        self.collapsed_modality = state_dict.get("collapsed_modality")
        self.collapse_epoch = state_dict.get("collapse_epoch")
        self.collapse_share = state_dict.get("collapse_share")
        self.stopped_epoch = state_dict.get("stopped_epoch")
        self.collapse_message = state_dict.get("collapse_message")
        self.history = [dict(entry) for entry in state_dict.get("history", [])]
        self.collapse_start_epoch = state_dict.get("collapse_start_epoch", self._start_from_history())

    def _start_from_history(self) -> int | None:
        """The collapse's first epoch read from the history (checkpoints written before ``collapse_start_epoch``)."""
        if self.collapsed_modality is None or self.collapse_epoch is None:
            return None
        start = None
        for entry in self.history:
            if not entry.get("counted") or entry["epoch"] > self.collapse_epoch:
                continue
            share = entry["shares"].get(self.collapsed_modality, math.nan)
            if math.isnan(share):  # neither counts nor resets
                continue
            start = None if share >= self.min_share else (entry["epoch"] if start is None else start)
        return start

    @override
    def _on_monitor_check(self, trainer: pl.Trainer, entry: HistoryEntry) -> None:
        self._run_collapse_check(trainer, entry)

    def _run_collapse_check(self, trainer: pl.Trainer, entry: HistoryEntry) -> None:
        """Updates the counts with one monitor check and tells the trainer to stop when a collapse is flagged."""
        epoch = int(entry["epoch"])
        shares = {name: float(entry["shares"][name]) for name in self._watched}
        counted = epoch >= self.warmup_epochs
        collapsed = self._update_counts(shares, epoch) if counted else None
        self.history.append(
            {
                "epoch": epoch,
                "global_step": int(entry["global_step"]),
                "shares": shares,
                "counted": counted,
                "wait_count": dict(self.wait_count),
                "collapsed": collapsed,
            }
        )
        if collapsed is not None:
            self._flag(collapsed, shares[collapsed], epoch)
        if self.action != "stop":
            return
        # keep signalling while a flagged modality stays collapsed (``min_epochs`` may defer the stop); every process
        # reads the same reduced shares, and reducing the decision keeps them in lockstep regardless
        should_stop = trainer.strategy.reduce_boolean_decision(bool(self._flagged), all=False)
        if should_stop:
            trainer.should_stop = True
            if self.stopped_epoch is None:
                self.stopped_epoch = epoch

    def _update_counts(self, shares: dict[str, float], epoch: int) -> str | None:
        """Counts consecutive checks below ``min_share``; returns the modality whose collapse is flagged now."""
        undefined = [name for name, share in shares.items() if math.isnan(share)]
        if undefined:
            counts = ", ".join(f"{name}: {self.wait_count.get(name, 0)}" for name in undefined)
            rank_zero_warn(
                f"CollapseEarlyStopping: {', '.join(f'{self._prefix}/share/{name}' for name in undefined)} NaN at "
                f"epoch {epoch} "
                f"(no occlusion moved any output); this check neither counts towards patience={self.patience} nor "
                f"resets the counts ({counts})."
            )
        newly_collapsed: list[str] = []
        for name, share in shares.items():
            if math.isnan(share):
                continue
            if share >= self.min_share:
                self.wait_count[name] = 0
                self._below_since.pop(name, None)
                self._flagged.discard(name)
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
                newly_collapsed.append(name)
        if not newly_collapsed:
            return None
        return min(newly_collapsed, key=lambda name: shares[name])  # the lowest share names the collapse

    def _flag(self, name: str, share: float, epoch: int) -> None:
        self._flagged.add(name)
        since = self._below_since[name]
        checks = self.wait_count[name]
        consequence = "Signaling Trainer to stop." if self.action == "stop" else "Training continues (action='warn')."
        message = (
            f"Modality {name!r} collapsed: its share stayed below min_share={self.min_share} for {checks} consecutive "
            f"checks (epochs {since}–{epoch}); {self._prefix}/share/{name} = {share:.4f} at epoch {epoch}, "
            f"{self.min_share - share:.4f} below the threshold. {consequence}"
        )
        if self.collapsed_modality is None:
            self.collapsed_modality = name
            self.collapse_epoch = epoch
            self.collapse_start_epoch = since
            self.collapse_share = share
            self.collapse_message = message
        if self.action == "stop":
            rank_zero_info(message)
        else:
            rank_zero_warn(message)


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
