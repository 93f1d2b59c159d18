"""Everything a monitor shows besides its logged scalars, behind one object: the dashboard and the attribute figures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from lightning_mc.core.modality import Batch, Modality
from lightning_mc.core.result import ContributionResult, HistoryEntry
from lightning_mc.views.attribute_figures import MeanImages, attribute_figures
from lightning_mc.views.scalars import MAX_LOGGED_ATTRIBUTES
from lightning_mc.views.tensorboard import ContributionDashboard, custom_scalar_layout


class MonitorViews:
    """The TensorBoard views of one :class:`~lightning_mc.ModalityContributionMonitor`, drawn on global rank 0.

    With a :class:`~lightning.pytorch.loggers.TensorBoardLogger` in a fit, :meth:`setup` registers the custom-scalars
    layout; each measured validation run adds the mean image of each patch-masked modality (:meth:`add_batch`), then
    :meth:`show` draws the stacked-area figure of the shares and the attribute figures; :meth:`finish` writes the final
    figure and the summary. Without such a logger (or with ``enabled=False``) every method does nothing.

    Args:
        modalities: The monitor's modalities.
        prefix: The monitor's prefix (tags and layout category).
        margins: Modalities whose share gets a confidence-band chart (the monitor measures intervals, ``ci``).
        enabled: Whether the monitor draws a dashboard at all (its ``dashboard`` argument).
    """

    def __init__(
        self, modalities: Sequence[Modality], prefix: str, margins: Sequence[str] = (), enabled: bool = True
    ) -> None:
        self.modalities = tuple(modalities)
        self.prefix = prefix
        self.margins = tuple(margins)
        self.enabled = enabled
        self.dashboard: ContributionDashboard | None = None
        self._mean_images: MeanImages | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The modality names, in order."""
        return tuple(m.name for m in self.modalities)

    def setup(self, trainer: pl.Trainer, stage: str, every: Sequence[MonitorViews] = ()) -> None:
        """Find the trainer's TensorBoard logger; the first monitor registers the layout of ``every`` monitor."""
        self.dashboard = None
        if self.enabled and stage == "fit":
            self.dashboard = ContributionDashboard.for_trainer(trainer, self.prefix)
        if self.dashboard is not None:  # one layout per writer: the first monitor registers every monitor's part
            layout: dict[str, Any] = {}
            for views in every or (self,):
                layout.update(custom_scalar_layout(views.margins, prefix=views.prefix))
            self.dashboard.register_layout(trainer, layout)

    def start(self, trainer: pl.Trainer) -> None:
        """A measured validation run starts: collect mean images for the figures (rank 0, with a dashboard)."""
        has_figures = self.dashboard is not None and trainer.is_global_zero
        self._mean_images = MeanImages(self.modalities) if has_figures else None

    def add_batch(self, batch: Batch, num_samples: int | None) -> None:
        """Add the first ``num_samples`` samples of a measured batch (``None``: all) to the mean images."""
        if self._mean_images is not None:
            self._mean_images.update(batch, num_samples)

    def show(
        self, trainer: pl.Trainer, result: ContributionResult, history: Sequence[HistoryEntry], monitor: pl.Callback
    ) -> None:
        """Draw the shares so far and the attribute figures of ``result`` (rank 0, with a dashboard)."""
        if self.dashboard is None:
            return
        self.dashboard.update(trainer, history, self.names, monitor)
        means = self._mean_images.means() if self._mean_images is not None else {}
        figures = attribute_figures(
            result, self.modalities, means, min_attributes=MAX_LOGGED_ATTRIBUTES + 1, prefix=self.prefix
        )
        self.dashboard.add_figures(trainer, figures)

    def finish(self, trainer: pl.Trainer, history: Sequence[HistoryEntry], monitor: pl.Callback) -> None:
        """The fit ended: the final figure, with a collapse marked, and the summary (rank 0, with a dashboard)."""
        if self.dashboard is not None:
            self.dashboard.finish(trainer, history, self.names, monitor)
