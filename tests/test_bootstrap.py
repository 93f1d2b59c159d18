"""Bootstrap confidence intervals of the ratio-of-sums shares."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_mc import ModalityContributionMonitor
from lightning_mc.analyses.bootstrap import PerSampleRaw, bootstrap_share_interval, canonical_order
from lightning_mc.core.metric import per_sample_values
from lightning_mc.functional import modality_contribution

from helpers import TwoModalityNet, fit_then_measure_offline, load_example, loader, trainer_kwargs, two_modality_dataset

AB = {"a": 0, "b": 1}


#: ``2a + b`` with ``a, b ~ Exp(1)``: the true share of ``a`` is 2/3 (examples/interval_coverage.py).
COVERAGE = load_example("interval_coverage")
Linear2 = COVERAGE.TwoAPlusB
_data = COVERAGE.exponential_batches


def test_interval_covers_the_known_share_in_at_least_90_percent_of_seeded_repetitions() -> None:
    # the computation examples/interval_coverage.py prints (93 of 100 there)
    covered = COVERAGE.covered_repetitions(repetitions=100, ci=0.95, n_boot=400)
    assert covered >= 90, covered


def test_interval_brackets_the_share_and_is_off_by_default() -> None:
    data = _data(7)
    result = modality_contribution(Linear2(), data, AB, occlusion="zeros", ci=0.9, n_boot=300)
    # the point share is the metric's own; per-sample d_a = 2|a|, d_b = |b| recomputed independently
    a, b = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    assert result.shares["a"] == pytest.approx(float(2 * a.sum() / (2 * a.sum() + b.sum())), rel=1e-6)
    assert result.ci == 0.9
    for name in AB:
        assert result.share_low[name] < result.shares[name] < result.share_high[name]
    assert result.share_low["a"] == pytest.approx(1 - result.share_high["b"], abs=1e-9)  # two shares: mirror images
    assert 0.02 < result.share_high["a"] - result.share_low["a"] < 0.2
    plain = modality_contribution(Linear2(), data, AB, occlusion="zeros")
    assert plain.ci is None and plain.share_low is None and plain.share_high is None
    assert plain.shares == result.shares  # bit-equal: ci= only adds the bootstrap; the same passes ran


def test_intervals_depend_on_the_seed_not_the_batch_order_and_keep_at_most_max_ci_samples() -> None:
    data = _data(3)
    first = modality_contribution(Linear2(), data, AB, occlusion="zeros", ci=0.95, n_boot=100, seed=5)
    again = modality_contribution(Linear2(), data, AB, occlusion="zeros", ci=0.95, n_boot=100, seed=5)
    assert first == again
    reordered = modality_contribution(Linear2(), data[::-1], AB, occlusion="zeros", ci=0.95, n_boot=100, seed=5)
    assert reordered.share_low == pytest.approx(first.share_low, abs=1e-12)
    other_seed = modality_contribution(Linear2(), data, AB, occlusion="zeros", ci=0.95, n_boot=100, seed=6)
    assert other_seed.share_low != first.share_low
    metric = PerSampleRaw(max_samples=150)
    for a, b in data:
        metric.update(per_sample_values(torch.zeros(a.shape[0], 1), {"a": 2 * a.unsqueeze(1), "b": b.unsqueeze(1)}))
    kept = metric.compute()
    assert kept.shape == (150, 2) and int(metric.num_dropped) == 50
    expected = torch.cat([2 * data[0][0], data[0][1]], dim=1).double()  # first batch whole, then 50 of the second
    expected = torch.cat([expected, torch.cat([2 * data[1][0][:50], data[1][1][:50]], dim=1).double()])
    assert torch.equal(kept, canonical_order(expected))


def test_per_sample_normalization_interval_matches_its_point_share() -> None:
    values = torch.tensor([[1.0, 1.0], [3.0, 1.0], [0.0, 0.0], [1.0, 3.0], [2.0, 0.0]])
    shares, low, high = bootstrap_share_interval(values, ci=0.95, n_boot=500, seed=0, normalization="per_sample")
    # mean over the 4 informative samples of d_a / (d_a + d_b): (0.5 + 0.75 + 0.25 + 1) / 4
    assert shares.tolist() == pytest.approx([0.625, 0.375])
    assert (low <= shares).all() and (shares <= high).all()
    with pytest.raises(ValueError, match="normalization"):
        modality_contribution(Linear2(), _data(0), AB, ci=0.95, normalization="per_sample_output")


def test_wider_with_fewer_samples_and_higher_coverage() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(2000, 3, generator=generator)
    _, low_small, high_small = bootstrap_share_interval(
        values[:50], ci=0.9, n_boot=500, seed=0, normalization="ratio_of_sums"
    )
    _, low_big, high_big = bootstrap_share_interval(values, ci=0.9, n_boot=500, seed=0, normalization="ratio_of_sums")
    _, low_99, high_99 = bootstrap_share_interval(values, ci=0.99, n_boot=500, seed=0, normalization="ratio_of_sums")
    assert ((high_small - low_small) > (high_big - low_big)).all()
    assert ((high_99 - low_99) > (high_big - low_big)).all()


def test_an_invalid_ci_n_boot_or_max_ci_samples_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="ci="):
        bootstrap_share_interval(torch.ones(3, 2), ci=1.0, n_boot=10, seed=0, normalization="ratio_of_sums")
    with pytest.raises(ValueError, match="n_boot="):
        bootstrap_share_interval(torch.ones(3, 2), ci=0.95, n_boot=0, seed=0, normalization="ratio_of_sums")
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_share_interval(torch.ones(0, 2), ci=0.95, n_boot=10, seed=0, normalization="ratio_of_sums")
    with pytest.raises(ValueError, match="ci="):
        modality_contribution(Linear2(), _data(0), AB, ci=95)
    with pytest.raises(ValueError, match="max_ci_samples="):
        modality_contribution(Linear2(), _data(0), AB, ci=0.95, max_ci_samples=0)


def test_monitor_logs_the_functional_interval(tmp_path) -> None:
    modalities = {"image": 0, "table": 1}
    options = {"output_transform": "softmax", "ci": 0.9, "n_boot": 200, "seed": 3}
    monitor = ModalityContributionMonitor(modalities, dashboard=False, **options)
    trainer, model, offline = fit_then_measure_offline(
        tmp_path, monitor, modalities, options, num_train=48, num_val=40, max_epochs=1
    )
    for name in modalities:
        low = trainer.callback_metrics[f"mc/share_low/{name}"].item()
        high = trainer.callback_metrics[f"mc/share_high/{name}"].item()
        assert low == pytest.approx(offline.share_low[name], abs=1e-6)
        assert high == pytest.approx(offline.share_high[name], abs=1e-6)
        assert low < monitor.latest.shares[name] < high
    assert monitor.history[-1]["share_low"] == monitor.latest.share_low
    # off by default: no per-sample values kept, no interval keys
    plain = ModalityContributionMonitor(modalities, output_transform="softmax", dashboard=False)
    trainer = L.Trainer(callbacks=[plain], **trainer_kwargs(tmp_path / "plain", max_epochs=1))
    trainer.fit(model, loader(two_modality_dataset(48)), loader(two_modality_dataset(40, seed=1)))
    assert not any(key.startswith("mc/share_low") for key in trainer.callback_metrics)
    assert plain.latest.share_low is None and "share_low" not in plain.history[-1]
    with pytest.raises(ValueError, match="n_boot="):
        ModalityContributionMonitor(modalities, ci=0.95, n_boot=0)


def test_tensorboard_margin_chart_draws_the_band(tmp_path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    monitor = ModalityContributionMonitor({"image": 0, "table": 1}, ci=0.95, n_boot=100)
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_epochs=1, logger=logger))
    trainer.fit(TwoModalityNet(), loader(two_modality_dataset(32)), loader(two_modality_dataset(32, seed=1)))
    size = {event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
    events = event_accumulator.EventAccumulator(logger.log_dir, size_guidance=size).Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    margins = {
        chart.title: [(s.value, s.lower, s.upper) for s in chart.margin.series]
        for category in layout.category
        for chart in category.chart
        if chart.HasField("margin")
    }
    assert margins == {
        f"share of {m} with its confidence interval": [(f"mc/share/{m}", f"mc/share_low/{m}", f"mc/share_high/{m}")]
        for m in ("image", "table")
    }
    for m in ("image", "table"):
        low, high = events.Scalars(f"mc/share_low/{m}")[0].value, events.Scalars(f"mc/share_high/{m}")[0].value
        assert low == pytest.approx(monitor.latest.share_low[m], abs=1e-6) and low < high
