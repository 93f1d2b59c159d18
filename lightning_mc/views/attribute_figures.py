"""Figures of attribute-level contributions: image patch heat-maps, top attributes, top tokens.

The functions return a matplotlib :class:`~matplotlib.figure.Figure` on an Agg canvas (no pyplot, no display), ready
for ``figure.savefig(path)`` or TensorBoard's ``add_figure``. Matplotlib is imported inside the functions only, so
importing this module costs nothing. :func:`attribute_figures` picks the figure for each modality with too many
attributes for scalars; :class:`~lightning_mc.ModalityContributionMonitor` logs them to TensorBoard.

Example:
    >>> import numpy as np
    >>> from lightning_mc.core.attribute_builders import Patches2d
    >>> shares = {"r0c0": 0.1, "r0c1": 0.2, "r1c0": 0.3, "r1c1": 0.4}
    >>> figure = patch_heatmap(shares, Patches2d((4, 4)), np.zeros((8, 8)))
    >>> figure.axes[0].get_title()
    'attribute share per patch'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_mc.core.attribute_builders import Patches2d, Tokens, Words
from lightning_mc.core.checks import check_int
from lightning_mc.core.modality import Batch, Modality
from lightning_mc.core.result import ContributionResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "MeanImages",
    "attribute_figures",
    "patch_heatmap",
    "patch_share_map",
    "top_attributes_bar",
    "top_tokens_figure",
]


def patch_share_map(shares: Mapping[str, float], patches: Patches2d, shape: tuple[int, int]) -> Any:
    """Spread each patch's share over its pixels: an ``(H, W)`` numpy array, NaN where a patch has no share.

    Args:
        shares: ``patch name -> share`` (``ContributionResult.attribute_shares[modality]``), names as
            :class:`~lightning_mc.masks.Patches2d` makes them (``"r0c1"``).
        patches: The builder that made the attributes (its patch size places each patch).
        shape: ``(H, W)`` of the image.

    Raises:
        ValueError: If a name is not a patch of ``patches`` on an image of ``shape``.
    """
    import numpy as np

    height, width = shape
    rows, cols = patches.grid((height, width))
    values = np.full((height, width), np.nan)
    ph, pw = patches.size
    valid = {f"r{r}c{c}": (r, c) for r in range(rows) for c in range(cols)}
    for name, share in shares.items():
        if name not in valid:
            raise ValueError(
                f"shares has attribute {name!r}, not a patch of {patches!r} on a {height}x{width} image "
                f"(valid: r0c0..r{rows - 1}c{cols - 1})."
            )
        r, c = valid[name]
        values[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = share
    return values


def patch_heatmap(
    shares: Mapping[str, float],
    patches: Patches2d,
    image: Any,
    *,
    title: str = "attribute share per patch",
    alpha: float = 0.55,
) -> Figure:
    """Heat-map of patch shares overlaid on an image (e.g. the mean image of the measured samples).

    Args:
        shares: ``patch name -> share``, e.g. ``result.attribute_shares["image"]``.
        patches: The :class:`~lightning_mc.masks.Patches2d` that made the attributes.
        image: ``(H, W)`` array (or tensor) drawn in grey below the heat-map.
        title: Axes title.
        alpha: Opacity of the heat-map.

    Returns:
        A figure with the image, the heat-map, a colour bar and (up to 64 patches) each patch's share written on it.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=float)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {image.shape}.")
    values = patch_share_map(shares, patches, image.shape)
    figure = Figure(figsize=(5.2, 4.4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(image, cmap="gray", interpolation="nearest")
    heat = axes.imshow(values, cmap="inferno", alpha=alpha, interpolation="nearest", vmin=0.0)
    figure.colorbar(heat, ax=axes, label="share")
    ph, pw = patches.size
    for name, share in shares.items() if len(shares) <= 64 else ():  # numbers only where they stay legible
        r, c = (int(part) for part in name[1:].split("c"))
        y = min(r * ph + (ph - 1) / 2, image.shape[0] - 1)
        x = min(c * pw + (pw - 1) / 2, image.shape[1] - 1)
        axes.text(x, y, f"{share:.2f}", ha="center", va="center", fontsize=7, color="cyan")
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])
    figure.tight_layout()
    return figure


def top_attributes_bar(
    shares: Mapping[str, float], *, k: int = 10, title: str = "top attributes", xlabel: str = "share"
) -> Figure:
    """Horizontal bar chart of the ``k`` attributes with the largest shares (largest on top).

    Args:
        shares: ``attribute -> share`` (one modality's ``attribute_shares``, or several merged with prefixes).
        k: How many attributes to show.
        title: Axes title.
        xlabel: Label of the value axis.

    Raises:
        ValueError: If ``k`` is not a positive int or ``shares`` is empty.

    Example:
        >>> figure = top_attributes_bar({"age": 0.3, "ldl": 0.5, "sex": 0.1}, k=2)
        >>> [label.get_text() for label in figure.axes[0].get_yticklabels()]
        ['age', 'ldl']
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_int("k", k, hint=" (how many attributes to show)")
    if not shares:
        raise ValueError("shares is empty; give at least one attribute -> share.")
    top = sorted(shares.items(), key=lambda item: item[1], reverse=True)[:k][::-1]
    figure = Figure(figsize=(5.5, 0.35 * len(top) + 1.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.barh([name for name, _ in top], [value for _, value in top], color="tab:blue")
    axes.set_xlabel(xlabel)
    axes.set_title(title)
    figure.tight_layout()
    return figure


def top_tokens_figure(
    shares: Mapping[str, float],
    *,
    k: int = 10,
    labels: Mapping[str, str] | None = None,
    title: str = "token positions",
) -> Figure:
    """Shares of token positions (or words) in sequence order, above a bar chart of the ``k`` largest.

    Args:
        shares: ``attribute -> share`` in sequence order, as :class:`~lightning_mc.masks.Tokens` (``"t0"``, ``"t1"``,
            ...) or :class:`~lightning_mc.masks.Words` (``"w0"``, ...) name them.
        k: How many of the largest to list.
        labels: Optional ``attribute -> text`` shown next to the name (e.g. the token at that position of a fixed
            prompt template).
        title: Figure title.

    Raises:
        ValueError: If ``k`` is not a positive int or ``shares`` is empty.

    Example:
        >>> figure = top_tokens_figure({"t0": 0.1, "t1": 0.6, "t2": 0.3}, k=2, labels={"t1": "fever"})
        >>> [label.get_text() for label in figure.axes[1].get_yticklabels()]
        ['t2', 't1 fever']
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_int("k", k, hint=" (how many tokens to list)")
    if not shares:
        raise ValueError("shares is empty; give at least one token position -> share.")
    labels = labels or {}
    top = sorted(shares.items(), key=lambda item: item[1], reverse=True)[:k][::-1]
    figure = Figure(figsize=(6.0, 2.4 + 0.3 * len(top)))
    FigureCanvasAgg(figure)
    sequence, ranked = figure.subplots(2, 1, height_ratios=[1.0, max(1.0, 0.25 * len(top))])
    sequence.bar(range(len(shares)), list(shares.values()), color="tab:purple", width=1.0)
    sequence.set_xlabel("position")
    sequence.set_ylabel("share")
    sequence.set_title(title)
    names = [f"{name} {labels[name]}" if name in labels else name for name, _ in top]
    ranked.barh(names, [value for _, value in top], color="tab:purple")
    ranked.set_xlabel("share")
    figure.tight_layout()
    return figure


class MeanImages:
    """Running mean image ``(H, W)`` of each :class:`~lightning_mc.masks.Patches2d` modality: heat-map backgrounds.

    Leading dimensions (samples, channels) are averaged. Under DDP each process averages its own samples (a picture's
    background, not a number that is logged).

    Args:
        modalities: The monitored modalities; those without a ``Patches2d`` builder are ignored.

    Example:
        >>> from lightning_mc.core.attribute_builders import Patches2d
        >>> import torch
        >>> images = MeanImages([Modality("image", key=0, attributes=Patches2d((2, 2))), Modality("table", key=1)])
        >>> images.update((torch.ones(4, 3, 4, 4), torch.zeros(4, 2)))
        >>> images.means()["image"].shape
        torch.Size([4, 4])
    """

    def __init__(self, modalities: Sequence[Modality]) -> None:
        self.modalities = [m for m in modalities if isinstance(m.attributes, Patches2d)]
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def update(self, batch: Batch, num_samples: int | None = None) -> None:
        """Add the first ``num_samples`` samples (all when ``None``) of each image modality of ``batch``."""
        for modality in self.modalities:
            value = modality.select(batch)[:num_samples].detach()
            if value.ndim < 3 or value.shape[0] == 0:
                continue
            image = value.float().reshape(-1, *value.shape[-2:]).sum(dim=0).cpu()
            count = value[..., 0, 0].numel()
            if modality.name in self._sums and self._sums[modality.name].shape == image.shape:
                self._sums[modality.name] += image
                self._counts[modality.name] += count
            else:
                self._sums[modality.name], self._counts[modality.name] = image, count

    def means(self) -> dict[str, Tensor]:
        """``modality name -> (H, W)`` mean image of the samples seen."""
        return {name: total / self._counts[name] for name, total in self._sums.items()}


def attribute_figures(
    result: ContributionResult,
    modalities: Sequence[Modality],
    mean_images: Mapping[str, Tensor] | None = None,
    *,
    min_attributes: int = 17,
    k: int = 10,
    prefix: str = "mc",
) -> dict[str, Figure]:
    """One figure per modality with at least ``min_attributes`` attributes, keyed ``"<prefix>_attributes/<modality>"``.

    :class:`~lightning_mc.masks.Patches2d` modalities with a mean image get a :func:`patch_heatmap`,
    :class:`~lightning_mc.masks.Tokens` / :class:`~lightning_mc.masks.Words` a :func:`top_tokens_figure`, every other
    modality (columns, groups, 3-D patches, custom masks) a :func:`top_attributes_bar` of its ``k`` largest.

    Args:
        result: The measurement (``attribute_shares`` are drawn).
        modalities: The modalities measured (their builders decide the kind of figure).
        mean_images: ``name -> (H, W)`` background of the patch heat-maps (:class:`MeanImages`).
        min_attributes: Modalities with fewer attributes get no figure (the monitor logs them as scalars).
        k: Bars in the top-k charts.
        prefix: The monitor's prefix (``"mc"``: tags ``mc_attributes/<modality>``).

    Example:
        >>> from lightning_mc.core.attribute_builders import Columns
        >>> shares = {f"g{j}": j / 190 for j in range(20)}
        >>> result = ContributionResult(
        ...     {"genes": 1.0, "age": 0.0}, {"genes": 1.0, "age": 0.0}, 0.0, {}, {"genes": shares, "age": {"all": 0.0}},
        ...     {}, 8, 0, "ratio_of_sums")
        >>> list(attribute_figures(result, [Modality("genes", key=0, attributes=Columns()), Modality("age", key=1)]))
        ['mc_attributes/genes']
    """
    mean_images = mean_images or {}
    figures: dict[str, Figure] = {}
    for modality in modalities:
        shares = result.attribute_shares.get(modality.name, {})
        if len(shares) < min_attributes:
            continue
        builder, tag = modality.attributes, f"{prefix}_attributes/{modality.name}"
        if isinstance(builder, Patches2d) and modality.name in mean_images:
            title = f"{modality.name}: share per patch (mean image below)"
            figures[tag] = patch_heatmap(shares, builder, mean_images[modality.name], title=title)
        elif isinstance(builder, (Tokens, Words)):
            figures[tag] = top_tokens_figure(shares, k=k, title=f"{modality.name}: share per position")
        else:
            figures[tag] = top_attributes_bar(shares, k=k, title=f"{modality.name}: top {k} attributes")
    return figures
