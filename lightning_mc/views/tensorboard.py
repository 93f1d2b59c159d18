"""TensorBoard dashboard for the monitor: a custom-scalars layout, a stacked-area figure of shares, a fit summary.

The numbers themselves go through ``pl_module.log`` (every logger gets them); this module only adds what
TensorBoard alone can show. Matplotlib is imported here, lazily, and nowhere else in the package; figures are
drawn on the Agg canvas, so no display is needed and the user's pyplot state is left alone.
"""

from __future__ import annotations

import re
import sys
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Category title of the custom-scalars layout (a monitor with another prefix adds `` (<prefix>)``).
LAYOUT_CATEGORY = "Modality contribution"


def custom_scalar_layout(margins: Sequence[str] = (), prefix: str = "mc") -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars category of one monitor: multiline charts of its shares, raw values and balance.

    Args:
        margins: Modalities that also get a "Margin" chart: the share ``<prefix>/share/<m>`` drawn inside its
            confidence band ``<prefix>/share_low/<m>``..``<prefix>/share_high/<m>`` (the monitor's ``ci`` option).
        prefix: The monitor's prefix; each monitor of a trainer gets its own category.

    Returns:
        ``{category title: charts}``, a category in the format of
        :meth:`torch.utils.tensorboard.SummaryWriter.add_custom_scalars`.

    Example:
        >>> list(custom_scalar_layout(prefix="mc_external"))
        ['Modality contribution (mc_external)']
    """
    escaped = re.escape(prefix)
    charts: dict[str, list[Any]] = {
        f"shares ({prefix}/share/*)": ["Multiline", [rf"{escaped}/share/.*"]],
        f"raw output change ({prefix}/raw/*)": ["Multiline", [rf"{escaped}/raw/.*"]],
        f"balance ({prefix}/balance)": ["Multiline", [rf"{escaped}/balance"]],
    }
    for name in margins:
        charts[f"share of {name} with its confidence interval"] = [
            "Margin",
            [f"{prefix}/share/{name}", f"{prefix}/share_low/{name}", f"{prefix}/share_high/{name}"],
        ]
    title = LAYOUT_CATEGORY if prefix == "mc" else f"{LAYOUT_CATEGORY} ({prefix})"
    return {title: charts}


@dataclass(frozen=True)
class CollapseMarks:
    """What a :class:`~lightning_mc.CollapseEarlyStopping` adds to the figure and the summary.

    Attributes:
        min_share: The stopper's threshold.
        patience: The stopper's patience, in checks.
        modality: The modality whose collapse was flagged, or ``None``.
        epoch: Epoch of the check that flagged it.
        global_step: Global step of that check.
        share: The modality's share at that check.
        stopped: Whether training was told to stop there.
    """

    min_share: float
    patience: int
    modality: str | None = None
    epoch: int | None = None
    global_step: int | None = None
    share: float | None = None
    stopped: bool = False


@runtime_checkable
class CollapseWatcher(Protocol):
    """A callback that watches one monitor for a collapse (:class:`~lightning_mc.CollapseEarlyStopping`)."""

    monitor: Any

    def collapse_marks(self) -> CollapseMarks:
        """What the watcher adds to the figure and the summary."""


def collapse_marks(trainer: pl.Trainer, monitor: pl.Callback) -> CollapseMarks | None:
    """The marks of the first collapse watcher in ``trainer`` that reads ``monitor``, or ``None``."""
    for callback in trainer.callbacks:
        if isinstance(callback, CollapseWatcher) and callback.monitor is monitor:
            return callback.collapse_marks()
    return None


def marks_from_stopper(stopper: Any) -> CollapseMarks:
    """Collapse marks from a :class:`~lightning_mc.CollapseEarlyStopping`'s attributes and history."""
    flagged = [entry for entry in stopper.history if entry["collapsed"] is not None]
    if stopper.collapsed_modality is None or not flagged:
        return CollapseMarks(min_share=stopper.min_share, patience=stopper.patience)
    first = flagged[0]
    return CollapseMarks(
        min_share=stopper.min_share,
        patience=stopper.patience,
        modality=stopper.collapsed_modality,
        epoch=stopper.collapse_epoch,
        global_step=int(first["global_step"]),
        share=stopper.collapse_share,
        stopped=stopper.stopped_epoch is not None,
    )


def shares_figure(
    history: Sequence[Mapping[str, Any]], modalities: Sequence[str], marks: CollapseMarks | None = None
) -> Figure:
    """A stacked-area figure of the shares over the checks, with the collapse threshold and the stop marked.

    Args:
        history: The monitor's history (entries with ``epoch``, ``global_step`` and ``shares``).
        modalities: Modality names, bottom band first.
        marks: Threshold and collapse to draw (from a :class:`~lightning_mc.CollapseEarlyStopping`), or ``None``.

    Returns:
        A matplotlib figure on an Agg canvas: the stacked shares on top, each share with the threshold below.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [int(entry["epoch"]) for entry in history]
    by_epoch = len(set(epochs)) == len(epochs)
    x = np.array(epochs if by_epoch else [int(entry["global_step"]) for entry in history], dtype=float)
    shares = np.array([[float(entry["shares"][name]) for entry in history] for name in modalities], dtype=float)

    figure = Figure(figsize=(7.0, 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    stacked, lines = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    if len(x):
        stacked.stackplot(x, shares, labels=list(modalities), alpha=0.85)
        for name, row in zip(modalities, shares):
            lines.plot(x, row, marker="o", markersize=3, label=name)
    stacked.set_ylim(0.0, 1.0)
    stacked.set_ylabel("share (stacked)")
    stacked.set_title("Modality contribution shares")
    stacked.legend(loc="upper left", fontsize="small")
    lines.set_ylim(0.0, 1.0)
    lines.set_ylabel("share")
    lines.set_xlabel("epoch" if by_epoch else "global step")
    if marks is not None:
        lines.axhline(marks.min_share, color="red", linestyle="--", linewidth=1, label=f"min_share = {marks.min_share}")
        if marks.modality is not None:
            at = marks.epoch if by_epoch else marks.global_step
            label = f"{marks.modality} collapsed at {at}" + (" — stopped" if marks.stopped else " (flagged)")
            for axes in (stacked, lines):
                axes.axvline(at, color="black", linestyle=":", linewidth=1.5)
            stacked.annotate(
                label,
                xy=(at, 0.97),
                xytext=(-4, 0),
                textcoords="offset points",
                ha="right",
                va="top",
                fontsize="small",
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8},
            )
    lines.legend(loc="upper left", fontsize="small")
    return figure


def figure_to_array(figure: Figure) -> Any:
    """Renders a figure on an Agg canvas to an ``H×W×3`` uint8 array (as ``add_figure`` does, without pyplot)."""
    import numpy as np

    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def save_shares_figure(
    history: Sequence[Mapping[str, Any]],
    modalities: Sequence[str],
    path: str | Path,
    marks: CollapseMarks | None = None,
) -> Path:
    """Draws :func:`shares_figure` and saves it (PNG, SVG, PDF: by the file's extension); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shares_figure(history, modalities, marks).savefig(path, dpi=120)
    return path


def summary_markdown(
    history: Sequence[Mapping[str, Any]], modalities: Sequence[str], marks: CollapseMarks | None = None
) -> str:
    """A Markdown summary: final shares and balance, and whether (and when) a collapse was flagged."""
    if not history:
        return "No validation run was measured: no modality contributions to report."
    last = history[-1]
    rows = "\n".join(
        f"| {name} | {float(last['shares'][name]):.4f} | {float(last['raw'][name]):.4g} |" for name in modalities
    )
    text = (
        f"**Final modality contributions** (epoch {last['epoch']}, {last['num_samples']} samples, "
        f"{len(history)} checks)\n\n| modality | share | raw |\n|---|---|---|\n{rows}\n\n"
        f"balance: {float(last['balance']):.4f}\n\n"
    )
    if marks is None:
        return text + "No CollapseEarlyStopping was attached: collapses were not watched."
    if marks.modality is None:
        return text + f"No collapse flagged (min_share = {marks.min_share}, patience = {marks.patience} checks)."
    outcome = "training was stopped there" if marks.stopped else "training went on (action='warn')"
    return text + (
        f"**Collapse flagged**: modality `{marks.modality}` at epoch {marks.epoch} (share {marks.share:.4f} < "
        f"min_share = {marks.min_share} for {marks.patience} consecutive checks); {outcome}."
    )


def _tensorboard_logger_types() -> tuple[type, ...]:
    """``lightning.pytorch``'s TensorBoardLogger, and ``pytorch_lightning``'s when the user's code has imported it.

    The two packages define separate classes and a trainer of either namespace may hold either logger;
    ``pytorch_lightning`` is never imported here.
    """
    legacy = sys.modules.get("pytorch_lightning.loggers.tensorboard")
    return (TensorBoardLogger,) if legacy is None else (TensorBoardLogger, legacy.TensorBoardLogger)


class ContributionDashboard:
    """Writes one monitor's part of the dashboard into a :class:`~lightning.pytorch.loggers.TensorBoardLogger`.

    :class:`~lightning_mc.ModalityContributionMonitor` creates one in ``setup`` when the trainer has a TensorBoard
    logger (:meth:`for_trainer`), updates the figure after every measured validation run and writes the summary at
    the end of fit, all on global rank 0. Several monitors (prefixes) share one writer: each has its own figure,
    summary and custom-scalars category.

    Args:
        logger: The TensorBoard logger to write into.
        prefix: The monitor's prefix: tags are ``<prefix>/shares_stacked`` and ``<prefix>/summary``.
    """

    #: Writers that already hold the layout (registered once per writer, even across several fits).
    _registered: ClassVar[weakref.WeakSet[Any]] = weakref.WeakSet()

    def __init__(self, logger: TensorBoardLogger, prefix: str = "mc") -> None:
        self.logger = logger
        self.prefix = prefix
        self.figure_tag = f"{prefix}/shares_stacked"
        self.summary_tag = f"{prefix}/summary"

    @classmethod
    def for_trainer(cls, trainer: pl.Trainer, prefix: str = "mc") -> ContributionDashboard | None:
        """A dashboard on the trainer's first TensorBoard logger, or ``None`` if it has none."""
        for logger in trainer.loggers:
            if isinstance(logger, _tensorboard_logger_types()):
                return cls(logger, prefix)
        return None

    def register_layout(self, trainer: pl.Trainer, categories: Mapping[str, Mapping[str, list[Any]]]) -> None:
        """Registers the custom-scalars layout once per writer, on rank 0.

        TensorBoard reads one layout per run, so the first monitor to set up registers the categories of every
        monitor of the trainer (from :func:`custom_scalar_layout`); later calls on the same writer do nothing.
        """
        if not trainer.is_global_zero:
            return
        writer = self.logger.experiment
        if writer in self._registered:
            return
        writer.add_custom_scalars({title: dict(charts) for title, charts in categories.items()})
        self._registered.add(writer)

    def update(
        self, trainer: pl.Trainer, history: Sequence[Mapping[str, Any]], modalities: Sequence[str], monitor: pl.Callback
    ) -> None:
        """Adds the stacked-area figure of the shares so far (global rank 0)."""
        if not trainer.is_global_zero or not history:
            return
        image = figure_to_array(shares_figure(history, modalities, collapse_marks(trainer, monitor)))
        self.logger.experiment.add_image(self.figure_tag, image, global_step=trainer.global_step, dataformats="HWC")

    def finish(
        self, trainer: pl.Trainer, history: Sequence[Mapping[str, Any]], modalities: Sequence[str], monitor: pl.Callback
    ) -> None:
        """Adds the final figure, with the stop marked, and the text summary (global rank 0)."""
        if not trainer.is_global_zero:
            return
        marks = collapse_marks(trainer, monitor)
        writer = self.logger.experiment
        if history:
            image = figure_to_array(shares_figure(history, modalities, marks))
            writer.add_image(self.figure_tag, image, global_step=trainer.global_step, dataformats="HWC")
        summary = summary_markdown(history, modalities, marks)
        writer.add_text(self.summary_tag, summary, global_step=trainer.global_step)
        writer.flush()

    def add_figures(self, trainer: pl.Trainer, figures: Mapping[str, Figure]) -> None:
        """Adds matplotlib figures (attribute maps), tag by tag (global rank 0)."""
        if not trainer.is_global_zero:
            return
        for tag, figure in figures.items():
            self.logger.experiment.add_figure(tag, figure, global_step=trainer.global_step)
