"""Mixed precision: the occluded passes run in the trainer's autocast context and half-precision fills just work.

Tolerance vs fp32: bf16 keeps 8 bits of mantissa (relative error up to ~4e-3 per rounding), but a share is a ratio
of means over many samples and outputs, so the rounding errors mostly average out: shares measured under
``bf16-mixed`` are within ``BF16_SHARE_TOLERANCE`` = 5e-3 (absolute) of the fp32 shares of the same weights (4.4e-5
observed on the model below). The softmax runs in fp32 (``output_transform`` upcasts before it).
"""

import lightning as L
import pytest
import torch
from torch import Tensor

from lightning_mc import Modality, ModalityContributionMonitor
from lightning_mc.core.occlusion import resolve_fill
from lightning_mc.functional import modality_contribution

from helpers import TwoModalityNet, loader, trainer_kwargs, two_modality_dataset

MODALITIES = {"image": 0, "table": 1}
BF16_SHARE_TOLERANCE = 5e-3


class RecordingForward:
    """A ``forward_fn`` that records the autocast state and the output dtype of every pass."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, torch.dtype, torch.dtype]] = []

    def __call__(self, pl_module: L.LightningModule, batch) -> Tensor:
        output = pl_module(batch[0], batch[1])
        self.seen.append((torch.is_autocast_enabled(batch[0].device.type), batch[0].dtype, output.dtype))
        return output


def _fit_and_compare(tmp_path, precision: str, accelerator: str, autocast_dtype: torch.dtype) -> None:
    forward = RecordingForward()
    monitor = ModalityContributionMonitor(MODALITIES, forward_fn=forward, output_transform="softmax")
    torch.manual_seed(0)
    model = TwoModalityNet()
    trainer = L.Trainer(
        callbacks=[monitor], **trainer_kwargs(tmp_path, precision=precision, accelerator=accelerator, max_epochs=2)
    )
    val = two_modality_dataset(32, seed=1)
    trainer.fit(model, loader(two_modality_dataset(48)), loader(val))

    assert len(forward.seen) == 2 * 2  # 2 epochs × 2 batches, each one forward call (clean + 2 copies ≤ 4 × 16 rows)
    assert all(seen == (True, torch.float32, autocast_dtype) for seen in forward.seen)
    logged = {name: trainer.callback_metrics[f"mc/share/{name}"].item() for name in MODALITIES}
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=autocast_dtype):  # the same context, outside the trainer
        same_context = modality_contribution(model, loader(val), MODALITIES, output_transform="softmax")
    fp32 = modality_contribution(model, loader(val), MODALITIES, output_transform="softmax")
    assert logged == pytest.approx(same_context.shares, abs=1e-6)
    assert logged == pytest.approx(fp32.shares, abs=BF16_SHARE_TOLERANCE)
    assert logged != pytest.approx(fp32.shares, abs=1e-7)  # the low precision really was used


def test_bf16_mixed_runs_the_occluded_passes_under_autocast_within_tolerance_of_fp32(tmp_path) -> None:
    _fit_and_compare(tmp_path, "bf16-mixed", "cpu", torch.bfloat16)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="fp16 AMP is CUDA-only: on CPU Lightning replaces precision='16-mixed' by 'bf16-mixed', tested above",
)
def test_16_mixed_runs_the_occluded_passes_under_autocast_within_tolerance_of_fp32(tmp_path) -> None:
    _fit_and_compare(tmp_path, "16-mixed", "gpu", torch.float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fill", ["zeros", "mean", "noise", "permute", -1.5, 0])
def test_every_fill_keeps_a_half_precision_dtype(dtype: torch.dtype, fill) -> None:
    value = torch.randn(4, 3, 5).to(dtype)
    filled = resolve_fill(fill)(value, torch.Generator().manual_seed(0))
    assert filled.dtype == dtype
    assert filled.shape == value.shape
    assert torch.isfinite(filled.float()).all()


def test_bf16_true_feeds_bf16_batches_and_the_fills_handle_them(tmp_path) -> None:
    forward = RecordingForward()
    monitor = ModalityContributionMonitor(
        [Modality("image", key=0, occlusion="mean"), Modality("table", key=1, occlusion="noise")], forward_fn=forward
    )
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, precision="bf16-true", max_epochs=1))
    trainer.fit(TwoModalityNet(), loader(two_modality_dataset(32)), loader(two_modality_dataset(32, seed=1)))
    assert {(dtype, out) for _, dtype, out in forward.seen} == {(torch.bfloat16, torch.bfloat16)}
    shares = monitor.history[-1]["shares"]
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 < share < 1.0 for share in shares.values())
