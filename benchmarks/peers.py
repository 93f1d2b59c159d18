"""What the monitor is compared with: its floor, the reference's batch-size-1 loop and Captum FeatureAblation.

Each peer returns the raw contribution ``1ᵀdᵢ`` per modality so the benchmarks can check that all of them compute
the same numbers before comparing their times.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from captum.attr import FeatureAblation
from torch import Tensor, nn

from lightning_mc import ContributionMeasurement
from lightning_mc.core.engine import DEFAULT_COPIES_PER_CALL
from lightning_mc.core.modality import Modality
from lightning_mc.core.occlusion import occlude

Batch = Sequence[Tensor]


def softmax(outputs: Tensor) -> Tensor:
    return outputs.float().softmax(dim=-1)


def shares(raw: dict[str, float]) -> dict[str, float]:
    total = sum(raw.values())
    return {name: value / total for name, value in raw.items()}


class Monitor:
    """The monitor's work per check: a :class:`ContributionMeasurement` updated per batch, then computed.

    This is exactly what ``ModalityContributionMonitor`` runs on the validation batches it measures (less the
    ``pl_module.log`` calls, which do not depend on the model).
    """

    def __init__(self, modalities: Sequence[Modality], max_batch_size: int | None = None) -> None:
        self.measurement = ContributionMeasurement(
            modalities, output_transform="softmax", max_batch_size=max_batch_size
        )
        self.engine = self.measurement.engine

    def __call__(
        self, model: nn.Module, batches: Sequence[Batch], cleans: Sequence[Tensor] | None = None
    ) -> dict[str, float]:
        """One check; ``cleans`` (the validation step's predictions, one per batch) is ``reuse_outputs=True``."""
        self.measurement.reset()  # the monitor, too, resets and reuses the previous check's accumulators
        for index, batch in enumerate(batches):
            self.measurement.update(model, batch, clean=None if cleans is None else cleans[index])
        return self.measurement.compute().raw


def clean_predictions(model: nn.Module, batches: Sequence[Batch], modalities: Sequence[Modality]) -> list[Tensor]:
    """What ``validation_step`` returns for each batch (the default ``forward_fn``'s logits), for ``reuse_outputs``."""
    with torch.inference_mode():
        return [model(*(m.select(batch) for m in modalities)) for batch in batches]


class Floor:
    """The forward passes the monitor cannot avoid: 1 clean + Σ masks copies of every sample, batched the same.

    The occluded inputs are built once, outside the timed call, and cut into the chunks the engine uses (the virtual
    batch of ``(1 + H) · N`` rows split every ``max_batch_size`` rows), so a call runs only ``model(*chunk)``. With
    ``include_clean=False`` the clean copy is left out (``H · N`` rows): the floor of ``reuse_outputs``, where the
    validation step's outputs stand in for it.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Batch],
        modalities: Sequence[Modality],
        max_batch_size: int | None,
        include_clean: bool = True,
    ) -> None:
        self.model = model
        engine = ContributionMeasurement(modalities, output_transform="softmax").engine
        self.chunks: list[list[tuple[Tensor, ...]]] = []
        with torch.inference_mode():
            for batch in batches:
                size = batch[0].shape[0]
                values = [m.select(batch) for m in modalities]
                fills = [fill(value, torch.Generator(value.device)) for fill, value in zip(engine.fills, values)]
                masks = [m.attribute_masks(value).masks for m, value in zip(modalities, values)]
                copies = [list(values)] if include_clean else []
                for owner, owner_masks in enumerate(masks):
                    for mask in owner_masks:
                        copy = list(values)
                        copy[owner] = occlude(values[owner], fills[owner], mask)
                        copies.append(copy)
                stacked = [torch.cat([copy[index] for copy in copies]) for index in range(len(modalities))]
                rows = max_batch_size or DEFAULT_COPIES_PER_CALL * size
                self.chunks.append(list(zip(*(value.split(rows) for value in stacked))))

    def __call__(self) -> Tensor:
        with torch.inference_mode():
            return torch.cat([self.model(*chunk) for chunks in self.chunks for chunk in chunks])


def reference_loop(model: nn.Module, batches: Sequence[Batch], modalities: Sequence[Modality]) -> dict[str, float]:
    """The reference scripts' way: one sample, one mask at a time (batch size 1), same fills and outputs.

    Fills are computed on the single sample, as a batch-size-1 loop would (the per-sample mean equals the engine's);
    differences are accumulated in tensors, without a host sync per pass, which only favours the loop.
    """
    engine = ContributionMeasurement(modalities, output_transform="softmax").engine
    generator = torch.Generator(batches[0][0].device)
    totals = {m.name: torch.zeros((), device=batches[0][0].device) for m in modalities}
    count = 0
    with torch.inference_mode():
        for batch in batches:
            values = [m.select(batch) for m in modalities]
            masks = [m.attribute_masks(value).masks for m, value in zip(modalities, values)]
            for sample in range(values[0].shape[0]):
                inputs = [value[sample : sample + 1] for value in values]
                clean = softmax(model(*inputs))
                for owner, (modality, fill) in enumerate(zip(modalities, engine.fills)):
                    filled = fill(inputs[owner], generator)
                    for mask in masks[owner]:
                        mask = mask if mask.shape[0] == 1 else mask[sample : sample + 1]
                        occluded = list(inputs)
                        occluded[owner] = occlude(inputs[owner], filled, mask)
                        totals[modality.name] += (softmax(model(*occluded)) - clean).abs().sum()
                count += 1
    return {name: float(total) / count for name, total in totals.items()}


class CaptumAblation:
    """Captum ``FeatureAblation`` with one feature group per modality and a zero baseline, one target at a time.

    Captum attributes one output (target) per call, so a ``C``-output model costs it ``C`` calls per batch; each
    group's attribution is the signed change of that output, so ``|·|`` summed over targets is ``1ᵀdᵢ``.
    """

    def __init__(self, model: nn.Module, num_outputs: int, perturbations_per_eval: int = 1) -> None:
        self.ablation = FeatureAblation(lambda *inputs: softmax(model(*inputs)))
        self.num_outputs = num_outputs
        self.perturbations_per_eval = perturbations_per_eval

    def __call__(self, batches: Sequence[Batch], names: Sequence[str]) -> dict[str, float]:
        totals = [torch.zeros((), device=batches[0][0].device) for _ in names]
        count = 0
        with torch.inference_mode():
            for batch in batches:
                inputs = tuple(batch)
                groups = tuple(torch.full_like(v[:1], index, dtype=torch.long) for index, v in enumerate(inputs))
                for target in range(self.num_outputs):
                    attributions = self.ablation.attribute(
                        inputs,
                        baselines=(0.0,) * len(inputs),
                        target=target,
                        feature_mask=groups,
                        perturbations_per_eval=self.perturbations_per_eval,
                    )
                    for index, attribution in enumerate(attributions):
                        totals[index] += attribution.flatten(1)[:, 0].abs().sum()
                count += inputs[0].shape[0]
        return {name: float(total) / count for name, total in zip(names, totals)}


def max_abs_difference(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[name] - b[name]) for name in a)


Runner = Callable[[], object]
