"""Label-aware view: the drop of a torchmetrics metric under each whole-modality occlusion (mc/perf_drop/<m>)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, MulticlassAccuracy

from lightning_mc import Modality, ModalityContributionMonitor
from lightning_mc.core.attribute_builders import Columns
from lightning_mc.functional import modality_contribution

from helpers import fit_then_measure_offline, loader, trainer_kwargs, two_modality_dataset

AB = {"a": 0, "b": 1}


class LabelInA(nn.Module):
    """One sigmoid output read from modality ``a``'s columns (their mean); ``b`` only nudges it a little."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.sigmoid(8 * (a.mean(1, keepdim=True) - 0.5) + 0.01 * b.sum(1, keepdim=True))


def _labelled(n: int = 64, seed: int = 0) -> tuple[list[tuple[Tensor, Tensor, Tensor]], Tensor]:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=generator)
    a = y.float().unsqueeze(1).expand(n, 3) + 0.1 * torch.randn(n, 3, generator=generator)
    b = torch.randn(n, 2, generator=generator)
    return [(a[: n // 2], b[: n // 2], y[: n // 2]), (a[n // 2 :], b[n // 2 :], y[n // 2 :])], y


def test_occluding_the_label_carrying_modality_drops_accuracy_to_the_negative_rate() -> None:
    data, y = _labelled()
    result = modality_contribution(
        LabelInA(), data, AB, occlusion="zeros", perf_metric=BinaryAccuracy(), target=2, output_transform=None
    )
    # clean: every sample right; a → 0 gives sigmoid(-4 + tiny) < 0.5, i.e. "0" everywhere: accuracy = P(y = 0)
    assert result.perf_clean == 1.0
    assert result.perf_drop["a"] == pytest.approx(1.0 - (y == 0).float().mean().item(), abs=1e-7)
    assert result.perf_drop["b"] == 0.0
    # label-aware view and label-free shares are separate: the shares are unchanged by asking for it
    plain = modality_contribution(LabelInA(), data, AB, occlusion="zeros")
    # bit-equal: perf_metric= only adds the metric; the same passes ran on the same rows
    assert plain.shares == result.shares and plain.perf_drop is None and plain.perf_clean is None


def test_auroc_on_a_single_output_and_per_attribute_modality_is_occluded_whole() -> None:
    data, y = _labelled(seed=1)
    whole = modality_contribution(LabelInA(), data, AB, occlusion="zeros", perf_metric=BinaryAUROC(), target=2)
    assert whole.perf_clean == 1.0
    # a occluded: the output is monotone in b's sum, so the AUROC is that of b's sum, a pure-noise score
    b_sum = torch.cat([b for _, b, _ in data]).sum(1)
    assert whole.perf_drop["a"] == pytest.approx(1.0 - BinaryAUROC()(b_sum, y).item(), abs=1e-6)
    assert whole.perf_drop["b"] == 0.0
    # the same modality measured per column: the perf drop still occludes it whole (one extra copy)
    columns = [Modality("a", key=0, attributes=Columns()), Modality("b", key=1)]
    per_column = modality_contribution(
        LabelInA(), data, columns, occlusion="zeros", perf_metric=BinaryAUROC(), target=2
    )
    assert per_column.perf_drop == pytest.approx(whole.perf_drop, abs=1e-12)
    assert len(per_column.attribute_raw["a"]) == 3


def test_the_metric_passed_is_not_updated_and_errors_name_the_argument() -> None:
    data, _ = _labelled()
    metric = BinaryAccuracy()
    modality_contribution(LabelInA(), data, AB, occlusion="zeros", perf_metric=metric, target=2)
    assert not metric.update_called
    with pytest.raises(ValueError, match="perf_metric and target go together"):
        modality_contribution(LabelInA(), data, AB, occlusion="zeros", perf_metric=metric)
    with pytest.raises(ValueError, match="target=5 found no targets"):
        modality_contribution(LabelInA(), data, AB, occlusion="zeros", perf_metric=metric, target=5)
    with pytest.raises(TypeError, match=r"torchmetrics\.Metric"):
        modality_contribution(LabelInA(), data, AB, occlusion="zeros", perf_metric=lambda p, t: 0.0, target=2)
    with pytest.raises(ValueError, match="scalar"):
        modality_contribution(
            LabelInA(),
            data,
            AB,
            occlusion="zeros",
            perf_metric=BinaryAccuracy(multidim_average="samplewise"),
            target=lambda batch: batch[2].unsqueeze(1),
        )


def test_monitor_logs_perf_drop_equal_to_the_functional_api(tmp_path) -> None:
    modalities = {"image": 0, "table": 1}
    metric = MulticlassAccuracy(num_classes=3)
    monitor = ModalityContributionMonitor(
        modalities, output_transform="softmax", perf_metric=metric, target=2, dashboard=False
    )
    offline_options = {"output_transform": "softmax", "perf_metric": MulticlassAccuracy(num_classes=3), "target": 2}
    trainer, model, offline = fit_then_measure_offline(
        tmp_path, monitor, modalities, offline_options, num_train=96, num_val=48, max_epochs=2
    )
    assert trainer.callback_metrics["mc/perf_clean"].item() == pytest.approx(offline.perf_clean, abs=1e-6)
    for name in modalities:
        logged = trainer.callback_metrics[f"mc/perf_drop/{name}"].item()
        assert logged == pytest.approx(offline.perf_drop[name], abs=1e-6)
        assert monitor.history[-1]["perf_drop"][name] == pytest.approx(logged, abs=1e-6)
    assert len(monitor.history) == 2 and "perf_drop" in monitor.history[0]  # a fresh metric every check
    assert not metric.update_called
    plain = ModalityContributionMonitor(modalities, output_transform="softmax", dashboard=False)
    trainer = L.Trainer(callbacks=[plain], **trainer_kwargs(tmp_path / "plain", max_epochs=1))
    trainer.fit(model, loader(two_modality_dataset(96)), loader(two_modality_dataset(48, seed=1)))
    assert not any(key.startswith("mc/perf") for key in trainer.callback_metrics)
