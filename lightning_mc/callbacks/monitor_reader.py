"""The base of the callbacks that act on a monitor's checks: find the monitor, see each new check once."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_mc.callbacks.monitor import ModalityContributionMonitor
from lightning_mc.core.result import HistoryEntry


class MonitorReader(Callback):
    """Reads the checks of one :class:`~lightning_mc.ModalityContributionMonitor` of the trainer.

    Subclasses pass the ``monitor=`` argument (or ``None``) to ``__init__``, call :meth:`_find_monitor` in ``setup``
    and implement :meth:`_on_monitor_check`, which runs once per measured validation run of a fit (not during the
    sanity check or ``fast_dev_run``), on every process, with the monitor's new history entry. The reader saves and
    restores which check it saw last: a subclass's ``state_dict`` extends ``super().state_dict()`` and its
    ``load_state_dict`` calls ``super().load_state_dict(state_dict)``. Every fit is its own: a subclass sets up the
    state of a fresh fit in :meth:`_start_fit` (extending ``super()._start_fit()``) and calls it from ``setup`` when
    ``stage == "fit"``; Lightning loads a resumed fit's checkpoint after ``setup``, so ``load_state_dict`` then
    overwrites it.

    Args:
        monitor: The monitor to read, or ``None`` for the single one in ``trainer.callbacks``.

    Raises:
        TypeError: If ``monitor`` is not a :class:`~lightning_mc.ModalityContributionMonitor` or ``None``.
    """

    def __init__(self, monitor: ModalityContributionMonitor | None = None) -> None:
        super().__init__()
        if monitor is not None and not isinstance(monitor, ModalityContributionMonitor):
            raise TypeError(f"monitor={monitor!r} must be a ModalityContributionMonitor or None.")
        self.monitor = monitor
        self._last_check: tuple[int, int] | None = None

    def _start_fit(self) -> None:
        """Forget the checks of an earlier fit (a subclass resets its own state too)."""
        self._last_check = None

    @property
    def _prefix(self) -> str:
        """The prefix of the monitor read (``"mc"`` until it is known)."""
        return "mc" if self.monitor is None else self.monitor.prefix

    def _monitor_state_key(self, **identity: Any) -> str:
        """``state_key`` from ``identity`` and the prefix of the monitor read (several readers of several monitors)."""
        return self._generate_state_key(**identity, monitor=self._prefix)

    def _find_monitor(self, trainer: pl.Trainer) -> ModalityContributionMonitor:
        """``self.monitor`` if it is in the trainer, else the trainer's single monitor; a clear error otherwise."""
        name = type(self).__name__
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, ModalityContributionMonitor)]
        if self.monitor is not None:
            if not any(cb is self.monitor for cb in monitors):
                raise RuntimeError(
                    f"{name}(monitor=...) was given a ModalityContributionMonitor that is not in trainer.callbacks; "
                    "add it to the Trainer's callbacks too."
                )
            return self.monitor
        if not monitors:
            raise RuntimeError(
                f"{name} reads the shares of a ModalityContributionMonitor, but trainer.callbacks has none. Add one: "
                f"Trainer(callbacks=[ModalityContributionMonitor(...), {name}(...)])."
            )
        if len(monitors) > 1:
            raise RuntimeError(
                f"trainer.callbacks has {len(monitors)} ModalityContributionMonitor callbacks "
                f"({', '.join(repr(m) for m in monitors)}); pass the one to read as {name}(monitor=...)."
            )
        return monitors[0]

    @staticmethod
    def _skips(trainer: pl.Trainer) -> bool:
        """Whether this validation run is not one of a fit's checks (not fitting, the sanity check, fast_dev_run)."""
        return trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or bool(trainer.fast_dev_run)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skips(trainer) or self.monitor is None or not self.monitor.history:
            return
        entry = self.monitor.history[-1]
        check = (int(entry["epoch"]), int(entry["global_step"]))
        if check == self._last_check:  # the monitor did not measure this validation run
            return
        self._last_check = check
        self._on_monitor_check(trainer, entry)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The last check read (subclasses add their own state to this dict)."""
        return {"last_check": None if self._last_check is None else list(self._last_check)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the last check read (``None`` from a checkpoint without one); subclasses call it first."""
        last_check = state_dict.get("last_check")
        self._last_check = None if last_check is None else (int(last_check[0]), int(last_check[1]))

    def _on_monitor_check(self, trainer: pl.Trainer, entry: HistoryEntry) -> None:
        raise NotImplementedError
