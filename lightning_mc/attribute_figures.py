"""Figures of attribute-level contributions: an image patch heat-map and a bar chart of the top attributes.

The functions return a matplotlib :class:`~matplotlib.figure.Figure` on an Agg canvas (no pyplot, no display), ready
for ``figure.savefig(path)`` or TensorBoard's ``add_figure``.

Example:
    >>> import numpy as np
    >>> from lightning_mc.masks import Patches2d
    >>> shares = {"r0c0": 0.1, "r0c1": 0.2, "r1c0": 0.3, "r1c1": 0.4}
    >>> figure = patch_heatmap(shares, Patches2d((4, 4)), np.zeros((8, 8)))
    >>> figure.axes[0].get_title()
    'attribute share per patch'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning_mc.masks import Patches2d

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["patch_heatmap", "patch_share_map", "top_attributes_bar"]


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
        A figure with the image, the heat-map, a colour bar and each patch's share written on it.
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
    for name, share in shares.items():
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

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive int (how many attributes to show).")
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
