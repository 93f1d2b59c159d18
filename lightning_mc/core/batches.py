"""The batches an offline measurement reads: the first ``limit_batches`` of ``data``, moved to the model's device."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightning_mc.core.checks import check_int
from lightning_mc.core.modality import Batch


def batches_on_device(
    data: Iterable[Batch], model: nn.Module, limit_batches: int | None, device: torch.device | str | None
) -> Iterator[Batch]:
    """Iterate over the first ``limit_batches`` batches of ``data`` (all when ``None``), each moved to ``device``.

    The arguments are checked when this is called, not when the iteration starts.

    Args:
        data: Any iterable of batches.
        model: The model; its first parameter's device is the default ``device`` (CPU for a model without any).
        limit_batches: A positive int, or ``None`` for every batch.
        device: Where the batches go; ``None``: the model's device.

    Raises:
        ValueError: If ``limit_batches`` is not a positive int or ``None``.

    Example:
        >>> batches = [torch.zeros(2), torch.ones(2), torch.ones(2)]
        >>> [batch.tolist() for batch in batches_on_device(batches, nn.Linear(2, 1), 2, None)]
        [[0.0, 0.0], [1.0, 1.0]]
    """
    check_int("limit_batches", limit_batches, optional=True)
    if device is None:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    return (move_data_to_device(batch, device) for batch in itertools.islice(data, limit_batches))
