r"""Modality Balancer: act on a collapse the monitor measures, slowing (and dropping out) the dominant modality.

The coefficient follows OGM-GE (Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation",
CVPR 2022) in the continuous form of OGM/OPM (Wei et al., "On-the-fly Modulation for Balanced Multimodal Learning",
TPAMI 2024, arXiv 2410.11582), with the occlusion shares of :class:`~lightning_mc.ModalityContributionMonitor` in
place of the labelled per-modality scores those methods need. The feature dropout is OPM's.

Example:
    >>> coefficients = balance_coefficients({"image": 0.2, "table": 0.8}, alpha=1.0)
    >>> {name: round(value, 4) for name, value in coefficients.items()}
    {'image': 1.0, 'table': 0.0049}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from typing_extensions import override

from lightning_mc.callbacks.monitor import ModalityContributionMonitor
from lightning_mc.callbacks.monitor_reader import MonitorReader

EncoderSpec = Mapping[str, "str | Sequence[str]"]


def balance_coefficients(shares: Mapping[str, float], alpha: float, floor: float | None = None) -> dict[str, float]:
    r"""One coefficient per modality from its contribution share: ``< 1`` slows a dominant modality, ``1`` leaves it.

    With ``N`` modalities and shares ``s`` (summing to 1), modality ``m``'s dominance is its share over the mean share
    of the others, ``ρₘ = sₘ / mean_{j≠m} sⱼ`` (``ρ = 1`` for equal shares; for two modalities ``ρ`` is the ratio of
    the two shares, as in OGM-GE), and

        kₘ = 1 − tanh(α · max(ρₘ − 1, 0))

    the continuous form of OGM-GE's coefficient used by OGM/OPM (TPAMI 2024; OGM-GE's own code applies
    ``1 − tanh(α·ρ)`` for ``ρ > 1``, which jumps at ``ρ = 1``). The modality with the lowest share always has
    ``ρ ≤ 1``, so at least one coefficient is 1. With ``floor``, every coefficient is 1 unless some modality's share
    is below ``floor``: the balancer acts on a collapse, not on every imbalance (a label-free share cannot tell a
    shortcut from a modality that is genuinely more informative).

    Args:
        shares: ``modality -> share`` (at least two modalities, finite, non-negative).
        alpha: Strength, ``> 0``.
        floor: ``None`` (act on any imbalance) or a share in ``(0, 1)`` below which a modality counts as collapsing.

    Returns:
        ``modality -> coefficient`` in ``[0, 1]``, in the order of ``shares``.

    Raises:
        ValueError: If fewer than two shares are given, or one is NaN or negative.

    Example:
        >>> balance_coefficients({"image": 0.25, "table": 0.75}, alpha=0.5)["table"]  # ρ = 3: 1 − tanh(1)
        0.23840584404423515
        >>> balance_coefficients({"image": 0.25, "table": 0.75}, alpha=0.5, floor=0.2)  # nothing below the floor
        {'image': 1.0, 'table': 1.0}
    """
    if len(shares) < 2:
        raise ValueError(f"shares={dict(shares)!r}: balancing needs the shares of at least two modalities.")
    if any(math.isnan(share) or share < 0 for share in shares.values()):
        raise ValueError(f"shares={dict(shares)!r} must be non-negative numbers (not NaN).")
    if floor is not None and min(shares.values()) >= floor:
        return dict.fromkeys(shares, 1.0)
    total = sum(shares.values())
    coefficients: dict[str, float] = {}
    for name, share in shares.items():
        mean_others = (total - share) / (len(shares) - 1)
        if mean_others <= 0:  # every other modality has share 0: the dominance is unbounded
            coefficients[name] = 1.0 if share <= 0 else 0.0
            continue
        coefficients[name] = 1.0 - math.tanh(alpha * max(share / mean_others - 1.0, 0.0))
    return coefficients


class ModalityBalancer(MonitorReader):
    r"""Slow down the modality that dominates a multimodal model, from the monitor's label-free contribution shares.

    After each check of a :class:`~lightning_mc.ModalityContributionMonitor` in the same trainer the balancer sets one
    coefficient ``kₘ`` per modality from the shares (:func:`balance_coefficients`: ``1`` for a modality that does not
    dominate, towards ``0`` the more it dominates; with ``floor``, only while some modality's share is below it) and
    applies it during the following training steps, in two ways:

    - **gradient** (OGM-GE): before each optimizer step, the gradients of the parameters of modality ``m``'s encoders
      are multiplied by ``kₘ``. Lightning calls ``on_before_optimizer_step`` once per optimizer step, after the
      gradients of all accumulated micro-batches are summed, after AMP's unscaling and DDP's all-reduce and before
      gradient clipping, so the scaling is exact in each of these settings. The coefficients come from the shares,
      which are identical on every process, so every rank scales identically and the replicas stay in sync.
    - **dropout** (OPM): in training, each sample's encoder output of modality ``m`` is replaced by zeros with
      probability ``dropout · (1 − kₘ)`` (one draw per sample and modality per micro-batch, shared by the modality's
      encoders). The fusion layers then have to predict from the other modalities on those samples, which gradient
      scaling alone does not make them do: the fusion head keeps reading the dominant modality. The least-contributing
      modality has ``k = 1`` and is never dropped. ``dropout=0`` turns this off.

    The evidence behind the defaults (``docs/how-to/collapse.md``, ``examples/balancer_shortcut.py``): on a shortcut
    that vanishes at deployment, gradient scaling alone closed a quarter of the gap to an images-only network and the
    defaults 70 %, at a cost of 0.06 accuracy where the dominant modality stays informative (a label-free share cannot
    tell a shortcut from a genuinely better modality). With ``floor``, a model whose modalities all keep a share
    above it is never touched.

    Logged at the end of each training epoch (the same values on every process): ``<prefix>/coef/<m>`` for every
    modality in ``encoders``, ``<prefix>`` being the monitor's ``prefix``.

    Args:
        encoders: ``modality -> name`` (or names) of the submodule(s) of the LightningModule that encode it, as
            ``pl_module.get_submodule`` reads them (``"net.image_encoder"``). Every key must be a modality of the
            monitor; the monitor's other modalities count in the shares but are not acted on.
        alpha: Strength of the coefficient, ``> 0`` (``kₘ = 1 − tanh(α · max(ρₘ − 1, 0))``).
        monitor: The monitor whose shares are read; ``None`` finds the single
            :class:`~lightning_mc.ModalityContributionMonitor` in ``trainer.callbacks``.
        floor: Act only while some modality's share is below this value, in ``(0, 1)``; ``None`` acts on any
            imbalance (as OGM-GE does).
        dropout: Largest probability, in ``[0, 1]``, of dropping a modality's encoder output; the probability used is
            ``dropout · (1 − kₘ)``. ``0`` scales gradients only.
        warmup_epochs: Checks of epochs ``< warmup_epochs`` leave the coefficients at 1 (early shares are noisy).
        seed: Seed of the dropout draws (a private generator, offset by the process rank).

    Attributes:
        coefficients: ``modality -> coefficient`` in effect (1 until the first counted check).
        history: One entry per check the balancer read: ``epoch``, ``global_step``, ``shares``, ``coefficients``.

    Raises:
        ValueError: If an argument is invalid (at construction); at ``setup``, if ``encoders`` names a modality the
            monitor does not measure, a submodule the model does not have (the message lists its top-level
            submodules), or a parameter that belongs to the encoders of two modalities.
        TypeError: If ``encoders`` or ``monitor`` has the wrong type.
        RuntimeError: At ``setup``, if the trainer has no :class:`~lightning_mc.ModalityContributionMonitor`, or
            several and ``monitor`` does not say which one.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mc import ModalityBalancer, ModalityContributionMonitor

        monitor = ModalityContributionMonitor({"image": 0, "table": 1}, output_transform="softmax")
        balancer = ModalityBalancer({"image": "net.image_encoder", "table": "net.table_encoder"}, floor=0.3)
        trainer = Trainer(max_epochs=20, callbacks=[monitor, balancer])
        trainer.fit(model, train_loader, val_loader)
        balancer.coefficients  # {'image': 1.0, 'table': 0.13} while the image share is below 0.3
    """

    def __init__(
        self,
        encoders: EncoderSpec,
        alpha: float = 1.0,
        monitor: ModalityContributionMonitor | None = None,
        *,
        floor: float | None = 0.3,
        dropout: float = 1.0,
        warmup_epochs: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(monitor)
        self.encoders = _check_encoders(encoders)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise ValueError(f"alpha={alpha!r} must be a positive, finite number.")
        if floor is not None and (
            isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 < floor < 1.0
        ):
            raise ValueError(f"floor={floor!r} must be None or a number in (0, 1).")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout={dropout!r} must be a number in [0, 1].")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={warmup_epochs!r} must be a non-negative int.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an int.")
        self.alpha = float(alpha)
        self.floor = None if floor is None else float(floor)
        self.dropout = float(dropout)
        self.warmup_epochs = warmup_epochs
        self.seed = seed
        self.coefficients: dict[str, float] = dict.fromkeys(self.encoders, 1.0)
        self.history: list[dict[str, Any]] = []
        self._parameters: dict[str, list[nn.Parameter]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._masks: dict[str, Tensor] = {}
        self._generator: torch.Generator | None = None  # made in setup: a Generator cannot travel to spawned workers
        self._warned_nan = False

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callbacks: hook handles, parameters and the generator are rebuilt by setup
        state = self.__dict__.copy()
        state.update(_parameters={}, _handles=[], _masks={}, _generator=None)
        return state

    @property
    @override
    def state_key(self) -> str:
        return self._monitor_state_key(encoders={name: list(modules) for name, modules in self.encoders.items()})

    def drop_probability(self, modality: str) -> float:
        """The probability with which ``modality``'s encoder output is dropped in training now."""
        return self.dropout * (1.0 - self.coefficients[modality])

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.monitor = self._find_monitor(trainer)
        unknown = [name for name in self.encoders if name not in self.monitor.modality_names]
        if unknown:
            raise ValueError(
                f"ModalityBalancer(encoders=...) names {unknown!r}, which the monitor does not measure; valid "
                f"modalities: {list(self.monitor.modality_names)!r}."
            )
        self._remove_hooks()
        modules = {name: [_submodule(pl_module, path) for path in paths] for name, paths in self.encoders.items()}
        self._parameters = _encoder_parameters(modules, self.encoders)
        self._generator = torch.Generator().manual_seed(self.seed + trainer.global_rank)
        if stage == "fit":
            for name, encoders in modules.items():
                for module in encoders:
                    self._handles.append(module.register_forward_hook(self._dropout_hook(name)))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._masks = {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "coefficients": dict(self.coefficients),
            "history": [dict(entry) for entry in self.history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = state_dict.get("coefficients", {})
        self.coefficients = {name: float(stored.get(name, 1.0)) for name in self.encoders}
        super().load_state_dict(state_dict)
        self.history = [dict(entry) for entry in state_dict.get("history", [])]

    @override
    def _on_monitor_check(self, trainer: pl.Trainer, entry: dict[str, Any]) -> None:
        self._update_coefficients(entry)

    def _update_coefficients(self, entry: dict[str, Any]) -> None:
        """Sets the coefficients from one monitor check (unchanged when a share is NaN, 1 during the warm-up)."""
        shares = {name: float(share) for name, share in entry["shares"].items()}
        epoch = int(entry["epoch"])
        if any(math.isnan(share) for share in shares.values()):
            if not self._warned_nan:
                self._warned_nan = True
                rank_zero_warn(
                    f"ModalityBalancer: a {self._prefix}/share is NaN at epoch {epoch} (no occlusion moved any "
                    f"output); the coefficients stay as they are ({self.coefficients})."
                )
            return
        if epoch < self.warmup_epochs:
            coefficients = dict.fromkeys(self.encoders, 1.0)
        else:
            every = balance_coefficients(shares, self.alpha, self.floor)
            coefficients = {name: every[name] for name in self.encoders}
        self.coefficients = coefficients
        self.history.append(
            {
                "epoch": epoch,
                "global_step": int(entry["global_step"]),
                "shares": shares,
                "coefficients": dict(coefficients),
            }
        )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, coefficient in self.coefficients.items():
            pl_module.log(f"{self._prefix}/coef/{name}", coefficient, on_step=False, on_epoch=True, sync_dist=True)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._masks = {}  # one dropout draw per micro-batch

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if all(coefficient == 1.0 for coefficient in self.coefficients.values()):
            return
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}  # this optimizer's only
        with torch.no_grad():
            for name, parameters in self._parameters.items():
                coefficient = self.coefficients[name]
                if coefficient == 1.0:
                    continue
                for parameter in parameters:
                    if parameter.grad is not None and id(parameter) in stepped:
                        parameter.grad.mul_(coefficient)

    def _dropout_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if not module.training or not torch.is_grad_enabled():  # the monitor's passes, validation
                return None
            probability = self.drop_probability(name)
            if probability <= 0.0:
                return None
            first = _first_tensor(output)
            if first is None or first.dim() == 0:
                return None
            mask = self._masks.get(name)
            if mask is None or mask.shape[0] != first.shape[0]:
                if self._generator is None:  # the hook outlived setup (fit called without it): seed it now
                    self._generator = torch.Generator().manual_seed(self.seed)
                draws = torch.rand(first.shape[0], generator=self._generator)
                mask = (draws >= probability).to(first.device)  # True: kept
                self._masks[name] = mask
            return apply_to_collection(output, Tensor, _keep_rows, mask)

        return hook


def _keep_rows(tensor: Tensor, mask: Tensor) -> Tensor:
    if not tensor.is_floating_point() or tensor.dim() == 0 or tensor.shape[0] != mask.shape[0]:
        return tensor
    return tensor * mask.to(tensor.dtype).view(-1, *([1] * (tensor.dim() - 1)))


def _first_tensor(output: Any) -> Tensor | None:
    found: list[Tensor] = []
    apply_to_collection(output, Tensor, lambda tensor: found.append(tensor) or tensor)
    floating = [tensor for tensor in found if tensor.is_floating_point()]
    return floating[0] if floating else None


def _check_encoders(encoders: EncoderSpec) -> dict[str, tuple[str, ...]]:
    if not isinstance(encoders, Mapping) or not encoders:
        raise TypeError(
            f"encoders={encoders!r} must be a non-empty mapping modality -> submodule name(s), e.g. "
            "{'image': 'net.image_encoder', 'table': 'net.table_encoder'}."
        )
    checked: dict[str, tuple[str, ...]] = {}
    for name, paths in encoders.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"encoders={dict(encoders)!r}: the keys must be modality names (non-empty strings).")
        paths = (paths,) if isinstance(paths, str) else paths
        if not isinstance(paths, Sequence) or not paths or not all(isinstance(path, str) and path for path in paths):
            raise ValueError(
                f"encoders[{name!r}]={encoders[name]!r} must be a submodule name or a non-empty list of names."
            )
        checked[name] = tuple(dict.fromkeys(paths))
    return checked


def _submodule(pl_module: pl.LightningModule, path: str) -> nn.Module:
    try:
        return pl_module.get_submodule(path)
    except AttributeError:
        children = [name for name, _ in pl_module.named_children()]
        raise ValueError(
            f"ModalityBalancer(encoders=...): {type(pl_module).__name__} has no submodule {path!r}. Its top-level "
            f"submodules are {children!r}; name nested ones with dots (e.g. 'net.image_encoder')."
        ) from None


def _encoder_parameters(
    modules: dict[str, list[nn.Module]], paths: dict[str, tuple[str, ...]]
) -> dict[str, list[nn.Parameter]]:
    owner: dict[int, str] = {}
    parameters: dict[str, list[nn.Parameter]] = {}
    for name, encoders in modules.items():
        unique: dict[int, nn.Parameter] = {}
        for module in encoders:
            unique.update({id(p): p for p in module.parameters()})
        for key in unique:
            if owner.get(key, name) != name:
                raise ValueError(
                    f"ModalityBalancer(encoders=...): {paths[name]!r} ({name!r}) and {paths[owner[key]]!r} "
                    f"({owner[key]!r}) share parameters; a shared parameter cannot be slowed for one modality only."
                )
            owner[key] = name
        parameters[name] = list(unique.values())
    return parameters


__all__ = ["ModalityBalancer", "balance_coefficients"]
