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
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from typing_extensions import override

from lightning_mc.callbacks.early_stopping import CollapseEarlyStopping
from lightning_mc.callbacks.monitor import ModalityContributionMonitor
from lightning_mc.callbacks.monitor_reader import MonitorReader
from lightning_mc.core.checks import check_fraction, check_int, check_positive
from lightning_mc.core.encoders import resolve_encoders, submodule
from lightning_mc.core.result import undefined_shares_cause

EncoderSpec = Mapping[str, "str | Sequence[str]"]

#: The default of ``ModalityBalancer(min_share=...)``: engage when a share falls below it (``docs/how-to/collapse.md``).
DEFAULT_MIN_SHARE = 0.12
#: ``release_share=None`` releases at this fraction of an equal share, ``RELEASE_FRACTION / N`` (0.4 for two).
RELEASE_FRACTION = 0.8


def balance_coefficients(shares: Mapping[str, float], alpha: float, min_share: float | None = None) -> dict[str, float]:
    r"""One coefficient per modality from its contribution share: ``< 1`` slows a dominant modality, ``1`` leaves it.

    With ``N`` modalities and shares ``s`` (summing to 1), modality ``m``'s dominance is its share over the mean share
    of the others, ``ρₘ = sₘ / mean_{j≠m} sⱼ`` (``ρ = 1`` for equal shares; for two modalities ``ρ`` is the ratio of
    the two shares, as in OGM-GE), and

        kₘ = 1 − tanh(α · max(ρₘ − 1, 0))

    the continuous form of OGM-GE's coefficient used by OGM/OPM (TPAMI 2024; OGM-GE's own code applies
    ``1 − tanh(α·ρ)`` for ``ρ > 1``, which jumps at ``ρ = 1``). The modality with the lowest share always has
    ``ρ ≤ 1``, so at least one coefficient is 1. With ``min_share``, every coefficient is 1 unless some modality's
    share is below it. This function has no memory: :class:`~lightning_mc.ModalityBalancer` adds the hysteresis
    (it keeps acting until the share is back above ``release_share``).

    Args:
        shares: ``modality -> share`` (at least two modalities, finite, non-negative).
        alpha: Strength, ``> 0``.
        min_share: ``None`` (act on any imbalance) or a share in ``(0, 1)`` below which a modality counts as
            collapsed.

    Returns:
        ``modality -> coefficient`` in ``[0, 1]``, in the order of ``shares``.

    Raises:
        ValueError: If fewer than two shares are given, or one is NaN or negative.

    Example:
        >>> balance_coefficients({"image": 0.25, "table": 0.75}, alpha=0.5)["table"]  # ρ = 3: 1 − tanh(1)
        0.23840584404423515
        >>> balance_coefficients({"image": 0.25, "table": 0.75}, alpha=0.5, min_share=0.2)  # none below 0.2
        {'image': 1.0, 'table': 1.0}
    """
    if len(shares) < 2:
        raise ValueError(f"shares={dict(shares)!r}: balancing needs the shares of at least two modalities.")
    if any(math.isnan(share) or share < 0 for share in shares.values()):
        raise ValueError(f"shares={dict(shares)!r} must be non-negative numbers (not NaN).")
    if min_share is not None and min(shares.values()) >= min_share:
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


def next_active(active: bool, lowest: float, min_share: float | None, release_share: float) -> bool:
    """The balancer's hysteresis: engage when the lowest share falls below ``min_share``, release at ``release_share``.

    Args:
        active: Whether the balancer acts now.
        lowest: The lowest share of the check (not NaN).
        min_share: Engage below it; ``None``: always active.
        release_share: Once active, stay active until ``lowest >= release_share`` (``>= min_share``).

    Returns:
        Whether the balancer acts after this check.

    Example:
        >>> [next_active(active, share, 0.1, 0.3) for active, share in [(False, 0.2), (False, 0.05), (True, 0.2)]]
        [False, True, True]
        >>> next_active(True, 0.31, 0.1, 0.3)  # recovered: released
        False
    """
    if min_share is None:
        return True
    return lowest < release_share if active else lowest < min_share


class ModalityBalancer(MonitorReader):
    r"""Rescue a modality that a multimodal model has abandoned, from the monitor's label-free contribution shares.

    After each check of a :class:`~lightning_mc.ModalityContributionMonitor` in the same trainer the balancer decides
    whether to act, with hysteresis: it **engages** when the lowest share falls below ``min_share`` (a deep collapse:
    the modality has been abandoned) and stays engaged until the lowest share is back at ``release_share`` or above
    (then it **releases**). A label-free share cannot tell a shortcut from a modality that is genuinely more
    informative, but its depth can: a modality that keeps a modest share is being used, and the defaults leave such a
    model alone. A model whose shares all stay at ``min_share`` or above trains exactly as it would without the
    balancer.

    While engaged it sets one coefficient ``kₘ`` per modality (:func:`balance_coefficients`: ``1`` for a modality that
    does not dominate, towards ``0`` the more it dominates) and applies it during the following training steps, in two
    ways:

    - **gradient** (OGM-GE): before each optimizer step, the gradients of the parameters of modality ``m``'s encoders
      are multiplied by ``kₘ``. Lightning calls ``on_before_optimizer_step`` once per optimizer step, after the
      gradients of all accumulated micro-batches are summed, after AMP's unscaling and DDP's all-reduce and before
      gradient clipping, so the scaling is exact in each of these settings. The coefficients come from the shares,
      which are identical on every process, so every rank scales identically and the replicas stay in sync.
    - **dropout** (OPM): in training, each sample's encoder output of modality ``m`` is replaced by zeros with
      probability ``dropout · (1 − kₘ)`` (one draw per sample and modality per micro-batch, shared by the modality's
      encoders). The fusion layers then have to predict from the other modalities on those samples, which gradient
      scaling alone does not make them do. The least-contributing modality has ``k = 1`` and is never dropped.
      ``dropout=0`` turns this off.

    Released, every coefficient is 1. The evidence behind the defaults is in ``docs/how-to/collapse.md``
    (``examples/balancer_evidence.py``, two tasks, three seeds): they win back half or more of the accuracy a collapse
    onto a shortcut costs, and do no harm where the weaker modality keeps a modest share.

    Logged at the end of each training epoch (the same keys and values on every process), ``<prefix>`` being the
    monitor's ``prefix``: ``<prefix>/coef/<m>`` for every balanced modality and ``<prefix>/balancer_active`` (1 while
    engaged, else 0). Each engage and release is reported in one line (``rank_zero_info``) with the share behind it.

    Every ``trainer.fit`` starts the balancer fresh (released, coefficients 1, empty history: ``setup`` resets them); a
    fit resumed from a checkpoint (``ckpt_path=``) continues engaged or released as it stopped.

    With a :class:`~lightning_mc.CollapseEarlyStopping` that has ``labels`` on the same monitor, the balancer reads
    its probe's verdicts: a modality whose latest verdict is uninformative (not undecided) is left out of
    the decision and of the coefficients, which are computed from the other modalities' shares renormalised.

    Args:
        encoders: ``modality -> name`` (or names) of the submodule(s) of the LightningModule that encode it, as
            ``pl_module.get_submodule`` reads them (``"net.image_encoder"``). Every key must be a modality of the
            monitor; the monitor's other modalities count in the shares but are not acted on. ``None`` takes the
            monitor's ``encoders`` at ``setup`` (its ``"auto"`` ones at its first check, once it has found them).
        alpha: Strength of the coefficient, ``> 0`` (``kₘ = 1 − tanh(α · max(ρₘ − 1, 0))``).
        monitor: The monitor whose shares are read; ``None`` finds the single
            :class:`~lightning_mc.ModalityContributionMonitor` in ``trainer.callbacks``.
        min_share: Engage when a modality's share falls below this value, in ``(0, 1)`` (the word of
            :class:`~lightning_mc.CollapseEarlyStopping`); ``None`` acts on any imbalance from the first counted check
            (as OGM-GE does) and never releases.
        release_share: Once engaged, keep acting until every share is at least this value, in ``[min_share, 1/N)``
            for ``N`` modalities (``release_share=min_share``: no hysteresis). ``None``: ``0.8 / N``, 0.4 for two
            modalities (but at least ``min_share``).
        dropout: Largest probability, in ``[0, 1]``, of dropping a modality's encoder output; the probability used is
            ``dropout · (1 − kₘ)``. ``0`` scales gradients only.
        warmup_epochs: Checks of epochs ``< warmup_epochs`` leave the balancer released (early shares are noisy).
        seed: Seed of the dropout draws, a non-negative int (a private generator, offset by the process rank).

    Attributes:
        active: Whether the balancer is engaged (acting) now.
        coefficients: ``modality -> coefficient`` in effect (1 while released).
        history: One entry per check the balancer read: ``epoch``, ``global_step``, ``shares``, ``coefficients``,
            ``active`` (after the check), ``event`` (``"engaged"``, ``"released"`` or ``None``) and ``uninformative``
            (the modalities left out, :attr:`uninformative_modalities`).

    Raises:
        ValueError: If an argument is invalid (at construction); at ``setup``, if neither the balancer nor its monitor
            has ``encoders``, if ``encoders`` names a modality the monitor does not measure, a submodule the model does
            not have (the message lists its top-level submodules) or a parameter that belongs to the encoders of two
            modalities, or if ``release_share`` is at or above ``1/N`` (the lowest of ``N`` shares can never reach it).
        TypeError: If ``encoders`` or ``monitor`` has the wrong type.
        RuntimeError: At ``setup``, if the trainer has no :class:`~lightning_mc.ModalityContributionMonitor`, or
            several and ``monitor`` does not say which one.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mc import ModalityBalancer, ModalityContributionMonitor

        monitor = ModalityContributionMonitor({"image": 0, "table": 1}, output_transform="softmax")
        balancer = ModalityBalancer({"image": "net.image_encoder", "table": "net.table_encoder"})
        trainer = Trainer(max_epochs=20, callbacks=[monitor, balancer])
        trainer.fit(model, train_loader, val_loader)
        balancer.history[-1]["active"], balancer.coefficients  # engaged: {'image': 1.0, 'table': 0.13}
    """

    def __init__(
        self,
        encoders: EncoderSpec | None = None,
        alpha: float = 1.0,
        monitor: ModalityContributionMonitor | None = None,
        *,
        min_share: float | None = DEFAULT_MIN_SHARE,
        release_share: float | None = None,
        dropout: float = 1.0,
        warmup_epochs: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(monitor)
        self.encoders = resolve_encoders(encoders, None, "encoders", allow_auto=False)
        check_positive("alpha", alpha)
        self.min_share, self.release_share = _check_thresholds(min_share, release_share)
        check_fraction("dropout", dropout, closed=True)
        check_int("warmup_epochs", warmup_epochs, minimum=0)
        check_int("seed", seed, minimum=0)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.warmup_epochs = warmup_epochs
        self.seed = seed
        self._release: float | None = self.release_share  # release_share=None is resolved at setup (0.8 / N)
        self._encoders: dict[str, tuple[str, ...]] | None = self.encoders  # resolved at setup
        self._stoppers: list[CollapseEarlyStopping] = []  # whose probe verdicts the balancer reads
        self._parameters: dict[str, list[nn.Parameter]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._masks: dict[str, Tensor] = {}
        self._generator: torch.Generator | None = None  # made in setup: a Generator cannot travel to spawned workers
        self._stage = "fit"
        self._start_fit()

    def _start_fit(self) -> None:
        """Released, every coefficient 1, no history: the state of a fit that has not checked anything yet."""
        super()._start_fit()
        self.active = False
        self.coefficients: dict[str, float] = dict.fromkeys(self._encoders or {}, 1.0)
        self.history: list[dict[str, Any]] = []
        self._warned_nan = False

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callbacks: hook handles, parameters and the generator are rebuilt by setup
        state = self.__dict__.copy()
        state.update(_parameters={}, _handles=[], _masks={}, _generator=None)
        return state

    @property
    @override
    def state_key(self) -> str:
        encoders = None if self._encoders is None else {name: list(paths) for name, paths in self._encoders.items()}
        return self._monitor_state_key(encoders=encoders)

    def drop_probability(self, modality: str) -> float:
        """The probability with which ``modality``'s encoder output is dropped in training now."""
        return self.dropout * (1.0 - self.coefficients.get(modality, 1.0))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.monitor = self._find_monitor(trainer)
        if stage == TrainerFn.FITTING:
            self._start_fit()  # a resumed fit's checkpoint is loaded after setup and overwrites this
        self._stoppers = [cb for cb in trainer.callbacks if isinstance(cb, CollapseEarlyStopping)]
        self._release = _release_share(self.min_share, self.release_share, len(self.monitor.modality_names))
        self._remove_hooks()
        self._generator = torch.Generator().manual_seed(self.seed + trainer.global_rank)
        self._stage = stage
        encoders = self._resolve_encoders(self.monitor)
        if (
            encoders is not None
        ):  # None: the monitor's encoders="auto", found on its first batch (see _on_monitor_check)
            self._attach(pl_module, encoders)

    def _attach(self, pl_module: pl.LightningModule, encoders: dict[str, tuple[str, ...]]) -> None:
        """Finds the encoders' parameters and, when fitting, hooks their outputs for the dropout."""
        self._encoders = encoders
        self.coefficients = {name: float(self.coefficients.get(name, 1.0)) for name in encoders}
        modules = {
            name: [submodule(pl_module, path, "ModalityBalancer(encoders=...)") for path in paths]
            for name, paths in self._encoders.items()
        }
        self._parameters = _encoder_parameters(modules, self._encoders)
        if self._stage == "fit":
            for name, encoders in modules.items():
                for module in encoders:
                    self._handles.append(module.register_forward_hook(self._dropout_hook(name)))

    def _resolve_encoders(self, monitor: ModalityContributionMonitor) -> dict[str, tuple[str, ...]] | None:
        """The balancer's own ``encoders``, else its monitor's (``None`` while they are ``"auto"``), checked."""
        encoders = self.encoders
        if encoders is None:
            spec = monitor.found_encoders if monitor.encoders == "auto" else monitor.encoders
            if monitor.encoders == "auto" and spec is None:  # not searched yet, or found none
                return None
            if spec is None:
                raise ValueError(
                    f"ModalityBalancer(encoders=None) takes its monitor's encoders, but the monitor (prefix "
                    f"{monitor.prefix!r}) has encoders=None. Name the submodules that encode each modality on one of "
                    "them, e.g. encoders={'image': 'net.image_encoder', 'table': 'net.table_encoder'}."
                )
            encoders = resolve_encoders(spec, monitor.modality_names, f"{monitor!r}.encoders", allow_auto=False)
        unknown = [name for name in encoders if name not in monitor.modality_names]
        if unknown:
            raise ValueError(
                f"ModalityBalancer(encoders=...) names {unknown!r}, which the monitor does not measure; valid "
                f"modalities: {list(monitor.modality_names)!r}."
            )
        return encoders

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
            "active": self.active,
            "coefficients": dict(self.coefficients),
            "history": [dict(entry) for entry in self.history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = {name: float(value) for name, value in state_dict.get("coefficients", {}).items()}
        names = self._encoders if self._encoders is not None else stored
        self.coefficients = {name: stored.get(name, 1.0) for name in names}
        self.active = bool(state_dict.get("active", False))
        super().load_state_dict(state_dict)
        self.history = [dict(entry) for entry in state_dict.get("history", [])]

    @override
    def _on_monitor_check(self, trainer: pl.Trainer, entry: dict[str, Any]) -> None:
        if self._encoders is None and self.monitor is not None:  # the monitor's "auto" encoders, found by now
            encoders = self._resolve_encoders(self.monitor)
            if encoders is None:
                raise ValueError(
                    "ModalityBalancer(encoders=None) takes its monitor's encoders, but the monitor's encoders='auto' "
                    "found none (an early-fusion model?); pass ModalityBalancer(encoders={...}) naming them."
                )
            self._attach(trainer.lightning_module, encoders)
        self._update(entry)

    @property
    def uninformative_modalities(self) -> tuple[str, ...]:
        """Modalities a :class:`~lightning_mc.CollapseEarlyStopping` with ``labels`` last judged uninformative.

        Only stoppers reading the balancer's monitor count. The balancer neither engages for these modalities nor
        counts them in the dominance (their coefficient stays 1): a modality with nothing to give on the validation
        set is not pushed. Empty without such a stopper, or before its probe has run; a stopper placed after the
        balancer in ``trainer.callbacks`` gives its verdict of a check at the next check.
        """
        names: dict[str, None] = {}
        for stopper in self._stoppers:
            if stopper.labels is not None and stopper.monitor is self.monitor:
                names.update(dict.fromkeys(stopper.uninformative_modalities))
        return tuple(names)

    def _update(self, entry: dict[str, Any]) -> None:
        """Engages, releases and sets the coefficients from one monitor check (nothing changes on a NaN share)."""
        shares = {name: float(share) for name, share in entry["shares"].items()}
        epoch = int(entry["epoch"])
        if any(math.isnan(share) for share in shares.values()):
            self._warn_nan(epoch, undefined_shares_cause(entry))
            return
        was_active = self.active
        if self._release is None:  # not set up (a check fed by hand): the default for these shares
            self._release = _release_share(self.min_share, self.release_share, len(shares))
        skipped = [name for name in self.uninformative_modalities if name in shares]
        considered = {name: share for name, share in shares.items() if name not in skipped}
        total = sum(considered.values())
        if skipped and total > 0:  # the shares among the modalities that have something to give
            considered = {name: share / total for name, share in considered.items()}
        self.active = (
            epoch >= self.warmup_epochs
            and len(considered) >= 2
            and next_active(self.active, min(considered.values()), self.min_share, self._release or 0.0)
        )
        names = self._encoders if self._encoders is not None else self.coefficients
        every = balance_coefficients(considered, self.alpha) if self.active else {}
        self.coefficients = {name: every.get(name, 1.0) for name in names}
        event = None if self.active == was_active else ("engaged" if self.active else "released")
        if event is not None:
            rank_zero_info(self._event_message(event, epoch, considered, skipped))
        self.history.append(
            {
                "epoch": epoch,
                "global_step": int(entry["global_step"]),
                "shares": shares,
                "coefficients": dict(self.coefficients),
                "active": self.active,
                "event": event,
                "uninformative": skipped,
            }
        )

    def _warn_nan(self, epoch: int, cause: str) -> None:
        if not self._warned_nan:
            self._warned_nan = True
            rank_zero_warn(
                f"ModalityBalancer: a {self._prefix}/share is NaN at epoch {epoch} ({cause}); "
                f"the balancer stays {'engaged' if self.active else 'released'} and the coefficients stay as they "
                f"are ({self.coefficients})."
            )

    def _event_message(self, event: str, epoch: int, shares: dict[str, float], skipped: list[str]) -> str:
        """One line: engaged or released at ``epoch``, the share that decided it and what the balancer does now."""
        aside = (
            f" (not counting {', '.join(map(repr, skipped))}: uninformative on this data, by the probe of "
            "CollapseEarlyStopping(labels=...))"
            if skipped
            else ""
        )
        if len(shares) < 2:
            return (
                f"ModalityBalancer released at epoch {epoch}: no other modality is left to balance{aside}; every "
                "coefficient is back to 1."
            )
        weakest = min(shares, key=shares.__getitem__)
        share = f"{self._prefix}/share/{weakest} = {shares[weakest]:.3f}"
        if event == "released":
            return (
                f"ModalityBalancer released at epoch {epoch}: {share} ≥ release_share={self._release:.3g} (the lowest "
                f"share has recovered){aside}; every coefficient is back to 1."
            )
        slowed = ", ".join(f"{name} ×{value:.3f}" for name, value in self.coefficients.items() if value < 1.0) or "none"
        reason = (
            f"{share} < min_share={self.min_share}"
            if self.min_share is not None
            else f"min_share=None acts on any imbalance (lowest: {share})"
        )
        until = f" until every share is ≥ release_share={self._release:.3g}" if self.min_share is not None else ""
        return f"ModalityBalancer engaged at epoch {epoch}: {reason}{aside}; slowing {slowed}{until}."

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, coefficient in self.coefficients.items():
            pl_module.log(f"{self._prefix}/coef/{name}", coefficient, on_step=False, on_epoch=True, sync_dist=True)
        pl_module.log(
            f"{self._prefix}/balancer_active", float(self.active), on_step=False, on_epoch=True, sync_dist=True
        )

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


def _check_thresholds(min_share: float | None, release_share: float | None) -> tuple[float | None, float | None]:
    """``(min_share, release_share)`` checked (``release_share=None`` is resolved at ``setup``)."""
    if min_share is None:
        return None, None
    check_fraction("min_share", min_share, optional=True)
    check_fraction("release_share", release_share, optional=True)
    if release_share is not None and release_share < min_share:
        raise ValueError(
            f"release_share={release_share!r} must be >= min_share={min_share!r}: the balancer engages below "
            "min_share and releases once every share is back at release_share."
        )
    return float(min_share), None if release_share is None else float(release_share)


def _release_share(min_share: float | None, release_share: float | None, modalities: int) -> float | None:
    """The release threshold for ``modalities`` shares: ``release_share``, or ``0.8 / N`` (at least ``min_share``).

    The lowest of ``N`` shares summing to 1 is at most ``1/N``: a release threshold at or above it could never be
    reached, and is refused.
    """
    if min_share is None:
        return None
    if release_share is None:
        return max(min_share, RELEASE_FRACTION / modalities)
    if release_share < 1.0 / modalities:
        return release_share
    raise ValueError(
        f"release_share={release_share!r} can never be reached: the lowest share of the monitor's {modalities} "
        f"modalities is at most 1/{modalities} = {1.0 / modalities:.3f} (the shares sum to 1), so the balancer would "
        f"never release; choose a release_share below {1.0 / modalities:.3f}."
    )


def _keep_rows(tensor: Tensor, mask: Tensor) -> Tensor:
    if not tensor.is_floating_point() or tensor.dim() == 0 or tensor.shape[0] != mask.shape[0]:
        return tensor
    return tensor * mask.to(tensor.dtype).view(-1, *([1] * (tensor.dim() - 1)))


def _first_tensor(output: Any) -> Tensor | None:
    found: list[Tensor] = []
    apply_to_collection(output, Tensor, lambda tensor: found.append(tensor) or tensor)
    floating = [tensor for tensor in found if tensor.is_floating_point()]
    return floating[0] if floating else None


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


__all__ = ["ModalityBalancer", "balance_coefficients", "next_active"]
