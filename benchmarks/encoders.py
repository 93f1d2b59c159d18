"""P8: encoder-aware occlusion (``encoders=``): a check ÷ a plain validation pass, with and without the encoder cache.

Each case times, side by side on the same batches: the model's plain forward on the batch (what a validation step
runs), a check without ``encoders`` (every copy runs the whole model), a check with ``encoders`` (the named encoders'
clean outputs are replayed for the copies that leave their modality alone), and the same with the clean outputs and
the encoders' outputs taken from the validation step (``reuse_outputs``). Every case first checks that the cached
path gives the plain path's numbers. A last table compares a 3-D patch map with MONAI's ``OcclusionSensitivity`` at
equal patches (overlap 0), one sample per call as MONAI requires.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.suites import Config, Row, Table
from benchmarks.timing import Stat, interleaved, ratio
from lightning_mc import ContributionMeasurement, Modality
from lightning_mc.core.modality import resolve_modalities
from lightning_mc.masks import Columns, Patches3d

#: Largest |Δ| between the cached and the plain path's outputs a case accepts (float32 noise of other batchings).
OUTPUTS_TOLERANCE = 1e-4
TABLE_COLUMNS = 8


class VolumeTableNet(nn.Module):
    """Three 3-D conv layers for a CT volume, an MLP for a table (8 columns by default), a fusion head."""

    def __init__(self, channels: int = 8, columns: int = TABLE_COLUMNS) -> None:
        super().__init__()
        self.ct = nn.Sequential(
            nn.Conv3d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(channels, channels, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv3d(channels, channels, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
        )
        self.table = nn.Sequential(nn.Linear(columns, 16), nn.ReLU())
        self.head = nn.Linear(channels + 16, 3)

    def forward(self, ct: Tensor, table: Tensor) -> Tensor:
        return self.head(torch.cat([self.ct(ct), self.table(table)], dim=1))


class MonaiCTClinical(nn.Module):
    """The model of ``examples/monai_ct_clinical.py``: MONAI's 3-D ``Regressor`` on 24³ CTs, an MLP for 5 columns."""

    def __init__(self) -> None:
        super().__init__()
        from monai.networks.nets import Regressor

        self.ct = Regressor(in_shape=(1, 24, 24, 24), out_shape=(16,), channels=(4, 8, 16), strides=(2, 2, 2))
        self.table = nn.Sequential(nn.Linear(5, 16), nn.ReLU())
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(32, 2))

    def forward(self, ct: Tensor, table: Tensor) -> Tensor:
        return self.head(torch.cat([self.ct(ct), self.table(table)], dim=1))


class ReportImageNet(nn.Module):
    """A Hugging Face BERT (from a config, random weights) over 64 tokens and a 2-conv CNN over 32×32 images."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
        )
        self.report = BertModel(config, add_pooling_layer=False)
        self.image = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten()
        )
        self.head = nn.Linear(64 + 16 * 32 * 32, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, image: Tensor) -> Tensor:
        text = self.report(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return self.head(torch.cat([text, self.image(image)], dim=1))


def _volume_batch(size: int, side: int, columns: int, device: torch.device) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    ct = torch.randn(size, 1, side, side, side, generator=generator)
    return {"ct": ct.to(device), "table": torch.randn(size, columns, generator=generator).to(device)}


def _report_batch(size: int, device: torch.device) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 64, (size,), generator=generator)
    mask = (torch.arange(64)[None] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), torch.randint(5, 500, (size, 64), generator=generator), 0)
    image = torch.randn(size, 1, 32, 32, generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "image": image.to(device)}


def _volume_forward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(batch["ct"], batch["table"])


def _report_forward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(batch["input_ids"], batch["attention_mask"], batch["image"])


Case = tuple[str, Callable[[], nn.Module], dict[str, Tensor], list[Modality], Callable[..., Any], dict[str, Any], str]


def _cases(config: Config) -> list[Case]:
    """``(name, model, batch, modalities, forward_fn, encoders, kind)``; kind picks the target."""
    device = config.device
    size = 4 if config.quick else 16
    side = 16 if config.quick else 32
    volume = _volume_batch(size, side, TABLE_COLUMNS, device)
    volume_encoders = {"ct": "ct", "table": "table"}

    def volume_modalities(fill: str, per_column: bool) -> list[Modality]:
        return [
            Modality("ct", key="ct", occlusion=fill),
            Modality("table", key="table", occlusion=fill, attributes=Columns() if per_column else None),
        ]

    cases: list[Case] = [
        ("3-D CNN + table, whole, zeros", VolumeTableNet, volume, volume_modalities("zeros", False), _volume_forward,
         volume_encoders, "whole, constant fill"),
        ("3-D CNN + table, per column, zeros", VolumeTableNet, volume, volume_modalities("zeros", True),
         _volume_forward, volume_encoders, "table per column"),
    ]  # fmt: skip
    if config.quick:
        return cases
    cases += [
        ("3-D CNN + table, whole, mean", VolumeTableNet, volume, volume_modalities("mean", False), _volume_forward,
         volume_encoders, "per-sample fill"),
        ("3-D CNN + table, per column, mean (the CT too)", VolumeTableNet, volume, volume_modalities("mean", True),
         _volume_forward, volume_encoders, "per-sample fill"),
        ("MONAI Regressor 24³ + 5 columns (example), ct mean, columns zeros", MonaiCTClinical,
         _volume_batch(size, 24, 5, device),
         [Modality("ct", key="ct", occlusion="mean"), Modality("table", key="table", occlusion="zeros",
                                                                 attributes=Columns())],
         _volume_forward, volume_encoders, "example"),
        ("BERT (64 tokens) + CNN, whole, [MASK] and zeros", ReportImageNet, _report_batch(size, device),
         [Modality("report", key="input_ids", occlusion=4), Modality("image", key="image", occlusion="zeros")],
         _report_forward, {"report": "report", "image": "image"}, "reads per-sample inputs"),
    ]  # fmt: skip
    return cases


#: The target of ``check with encoders ÷ plain pass`` by kind of case (``None``: reported, no target: a per-sample
#: fill must run the occluded modality's encoder on every sample, a second pass).
TARGETS = {
    "whole, constant fill": 1.2,
    "table per column": 1.3,
    "per-sample fill": None,
    "reads per-sample inputs": None,
    "example": None,
}
REUSE_TARGET = 0.3


def _max_difference(a: Any, b: Any) -> float:
    return max(
        (x - y).abs().max().item() for x, y in zip([a.clean, *a.occluded.values()], [b.clean, *b.occluded.values()])
    )


def _validation_pass(forward_fn: Callable[..., Any], model: nn.Module, batch: dict[str, Tensor]) -> None:
    with torch.inference_mode():
        forward_fn(model, batch)


def p8_encoders(config: Config) -> tuple[list[Row], Table]:
    """A check ÷ a plain validation pass: without ``encoders``, with them, and with them and ``reuse_outputs``."""
    rows, details = [], []
    for name, build, batch, modalities, forward_fn, encoders, kind in _cases(config):
        torch.manual_seed(0)
        model = build().to(config.device).eval()
        resolved = resolve_modalities(modalities)
        plain = ContributionMeasurement(resolved, forward_fn=forward_fn, output_transform="softmax").engine
        cached = ContributionMeasurement(
            resolved, forward_fn=forward_fn, output_transform="softmax", encoders=encoders
        ).engine
        difference = _max_difference(cached.run(model, batch), plain.run(model, batch))  # also runs the check
        if difference > OUTPUTS_TOLERANCE:
            raise AssertionError(f"{name}: the encoder cache gives other outputs (max |Δ| = {difference:.2e})")
        with torch.inference_mode(), cached.recording_encoders(model) as recording:
            clean = forward_fn(model, batch)  # the validation step's forward, encoders recorded

        times = interleaved(
            {
                "plain pass": partial(_validation_pass, forward_fn, model, batch),
                "check": partial(plain.run, model, batch),
                "check, encoders": partial(cached.run, model, batch),
                "check, encoders, reuse": partial(cached.run, model, batch, clean=clean, encoder_outputs=recording),
            },
            config.repeats,
            config.device,
            inner=config.inner,
        )
        today = ratio(times["check"], times["plain pass"])
        with_encoders = ratio(times["check, encoders"], times["plain pass"])
        reuse = ratio(times["check, encoders, reuse"], times["plain pass"])
        saving = ratio(times["check, encoders"], times["check"])
        target = TARGETS[kind]
        met = None if target is None else with_encoders.median <= target and reuse.median <= REUSE_TARGET
        rows.append(
            Row(
                "P8",
                name,
                "check with encoders ÷ plain validation pass",
                with_encoders,
                "—" if target is None else f"≤ {target} (reuse ≤ {REUSE_TARGET})",
                met,
                note=(
                    f"without encoders {today.format()}; with reuse_outputs {reuse.format()}; "
                    f"÷ without {saving.format()}"
                ),
                extra={
                    "without_encoders_over_plain": today.as_dict(),
                    "reuse_over_plain": reuse.as_dict(),
                    "encoders_over_without": saving.as_dict(),
                    "outputs_max_abs_diff": difference,
                },
            )
        )
        details.append(
            [name, today.format(), with_encoders.format(), reuse.format(), saving.format(), f"{difference:.1e}"]
        )
    table = Table(
        "P8 encoders: a check ÷ a plain validation pass (median [p25–p75])",
        ["case", "without encoders", "with encoders", "with encoders + reuse_outputs", "with ÷ without", "max |Δ|"],
        details,
        note=(
            "With encoders, a copy that occludes modality i runs only i's encoders and the layers after them; a fill "
            "that is the same for every sample (zeros, a number) runs i's encoder on one row per measurement, "
            "'permute' on none, a per-sample fill ('mean') on every sample: a check then costs about two plain "
            "passes, one with reuse_outputs. BERT reads each sample's attention mask, so its [MASK] copy runs on every "
            "row."
        ),
    )
    return rows, table


class _OneSample(nn.Module):
    """One sample's model as MONAI's ``OcclusionSensitivity`` needs it: the CT in, the sample's table fixed."""

    def __init__(self, model: nn.Module, table: Tensor) -> None:
        super().__init__()
        self.model, self.table = model, table

    def forward(self, ct: Tensor) -> Tensor:
        return self.model(ct, self.table.expand(ct.shape[0], -1))


def p8_monai_occlusion(config: Config) -> Table:
    """A map of 3-D patches of 8³ for each sample: ours (batched, encoders) ÷ MONAI's ``OcclusionSensitivity``."""
    from monai.visualize import OcclusionSensitivity

    size, side = (1, 16) if config.quick else (4, 32)
    batch = _volume_batch(size, side, TABLE_COLUMNS, config.device)
    torch.manual_seed(0)
    model = VolumeTableNet().to(config.device).eval()
    modalities = resolve_modalities(
        [Modality("ct", key="ct", attributes=Patches3d((8, 8, 8))), Modality("table", key="table")]
    )
    engines = {
        "ours": ContributionMeasurement(
            modalities, forward_fn=_volume_forward, output_transform="softmax", occlusion="mean"
        ).engine,
        "ours, encoders": ContributionMeasurement(
            modalities,
            forward_fn=_volume_forward,
            output_transform="softmax",
            occlusion="mean",
            encoders={"ct": "ct", "table": "table"},
        ).engine,
    }

    def monai_maps() -> None:
        for k in range(size):
            single = _OneSample(model, batch["table"][k : k + 1])
            sensitivity = OcclusionSensitivity(single, mask_size=8, overlap=0.0, n_batch=64, mode="mean_img")
            sensitivity(batch["ct"][k : k + 1])

    times = interleaved(
        {"MONAI OcclusionSensitivity": monai_maps, **{n: partial(e.run, model, batch) for n, e in engines.items()}},
        config.repeats,
        config.device,
        inner=1,
    )
    rows = [
        [name, f"{Stat.of(values).median * 1e3:.0f}", ratio(values, times["MONAI OcclusionSensitivity"]).format()]
        for name, values in times.items()
    ]
    return Table(
        f"P8 3-D patch maps ({(side // 8) ** 3} patches of 8³ on {side}³ CTs, {size} samples, overlap 0): ms and "
        "÷ MONAI",
        ["method", "ms", "÷ MONAI OcclusionSensitivity"],
        rows,
        note="MONAI takes one sample per call (batch size 1) and reruns the whole model for every patch.",
    )
