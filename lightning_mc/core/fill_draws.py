"""Each modality's fill of a batch, with random draws that depend only on the seed, the check and the batch.

``"noise"`` and ``"permute"`` draw from a generator re-seeded for every batch from ``(seed, check, batch position)``:
a fit resumed from a checkpoint draws what an uninterrupted one draws, with no generator state to save.

Example:
    >>> import torch
    >>> from lightning_mc.core.layout import BatchView
    >>> from lightning_mc.core.modality import resolve_modalities
    >>> from lightning_mc.core.occlusion import resolve_fill
    >>> modalities = resolve_modalities({"a": 0, "b": 1})
    >>> draws = FillDraws(modalities, (resolve_fill("permute"),) * 2, seed=0)
    >>> view = BatchView.of((torch.arange(4.0)[:, None], torch.zeros(4, 1)), modalities)
    >>> draws.start(check=3)
    >>> first = draws.fill(view).values[0]
    >>> draws.start(check=3)
    >>> torch.equal(draws.fill(view).values[0], first)
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from lightning_mc.core.layout import BatchFills, BatchView
from lightning_mc.core.modality import Modality
from lightning_mc.core.occlusion import Fill, PermuteFill

#: Mixed into every seed, so the fills' draws differ from those of user code seeded with the same number.
_SEED_SALT = 0x6C6D63

#: What fills that draw nothing are given (module-level: never pickled with a measurement, as ``ddp_spawn`` does).
_UNUSED = torch.Generator()


class FillDraws:
    """Draws each modality's fill for one batch after another.

    Args:
        modalities: The resolved modalities.
        fills: Each modality's fill, in order.
        seed: The seed of the random fills.
    """

    def __init__(self, modalities: Sequence[Modality], fills: Sequence[Fill], seed: int) -> None:
        self.modalities, self.fills, self.seed = tuple(modalities), tuple(fills), seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._encoder_inputs = tuple(fill.encoder_input for fill in self.fills)

        self._check, self._batch = 0, 0

    def __getstate__(self) -> dict[str, object]:
        """Pickled without the generators (each is reseeded from ``(seed, check, batch)`` before use: nothing is lost).

        A ``torch.Generator`` cannot cross to a ``ddp_spawn`` process: its state's shared storage fails to open there.
        """
        return {**self.__dict__, "_generators": {}}

    def start(self, check: int) -> None:
        """The next batch is the first of measurement ``check`` (the monitor passes the trainer's ``global_step``)."""
        self._check, self._batch = check, 0

    def fill(self, view: BatchView) -> BatchFills:
        """Each modality's fill for this batch; ``"permute"`` keeps its order (the encoder cache replays by it).

        Raises:
            TypeError, ValueError: Naming the modality, if its fill does not fit its data.
        """
        values, orders = [], []
        generator = _UNUSED  # fills that draw nothing get a generator they never use: no reseeding per batch
        for modality, fill, value in zip(self.modalities, self.fills, view.values):
            if fill.draws_random and (generator is _UNUSED or generator.device != value.device):
                generator = self._generator(value.device)
            with _naming(modality):
                if isinstance(fill, PermuteFill):
                    order = fill.order(value, generator)
                    values.append(value[order])
                    orders.append(order)
                else:
                    values.append(fill(value, generator))
                    orders.append(None)
        self._batch += 1
        return BatchFills(tuple(values), tuple(orders), self._encoder_inputs)

    def unfilled(self, view: BatchView) -> BatchFills:
        """The batch itself as its fills (for forward calls that occlude nothing): no draw is used up."""
        return BatchFills(view.values, (None,) * len(view.values), self._encoder_inputs)

    def check(self, view: BatchView) -> None:
        """Raise what :meth:`fill` would raise on this batch, filling its first sample only (no draw is used up)."""
        for modality, fill, value in zip(self.modalities, self.fills, view.values):
            with _naming(modality):
                fill(value[:1], torch.Generator(device=value.device))

    def _generator(self, device: torch.device) -> torch.Generator:
        """The generator of this batch's fills on ``device``, seeded from ``(seed, check, batch)``."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        seed = hash((self.seed, _SEED_SALT, self._check, self._batch)) % 2**63
        return self._generators[device].manual_seed(seed)


@contextmanager
def _naming(modality: Modality) -> Iterator[None]:
    """Re-raise a fill's ``TypeError``/``ValueError`` with the modality's name in front."""
    try:
        yield
    except (TypeError, ValueError) as err:
        raise type(err)(f"Modality {modality.name!r}: {err}") from None


__all__ = ["FillDraws"]
