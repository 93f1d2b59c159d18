"""Encoder-aware occlusion with our users' real encoders: MONAI's 3-D ``resnet10`` on MetaTensor batches and a Hugging
Face BERT (from a config: nothing is downloaded) give the plain path's numbers, and only the encoders that must run
do."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader as MonaiLoader
from monai.data import MetaTensor
from monai.networks.nets import resnet10
from torch import Tensor, nn
from transformers import BertForSequenceClassification

from lightning_mc import Modality
from lightning_mc.core.modality import resolve_modalities
from lightning_mc.masks import Patches3d, Tokens

from helpers import assert_same_numbers, make_engine, tiny_bert_config

PAD_ID, MASK_ID, LENGTH = 0, 4, 8


class RowCount(nn.Module):
    """Counts the rows a wrapped encoder computes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, *args, **kwargs):
        self.rows += next(a for a in [*args, *kwargs.values()] if isinstance(a, Tensor)).shape[0]
        return self.inner(*args, **kwargs)


class CTAndLabs(nn.Module):
    """MONAI's 3-D resnet10 for a CT volume, an MLP for labs, a linear fusion head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ct = RowCount(resnet10(spatial_dims=3, n_input_channels=1, num_classes=8))
        self.labs = RowCount(nn.Sequential(nn.Linear(5, 8), nn.ReLU()))
        self.head = nn.Linear(16, 3)

    def forward(self, ct: Tensor, labs: Tensor) -> Tensor:
        return self.head(torch.cat([self.ct(ct), self.labs(labs)], dim=1))


def ct_batch(seed: int) -> dict:
    """Four CT volumes of 16³ as MetaTensors with their own affines, batched by MONAI's DataLoader, and labs."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for k in range(4):
        affine = torch.eye(4) * (k + 1)
        volume = MetaTensor(torch.randn(1, 16, 16, 16, generator=generator), affine=affine)
        items.append({"ct": volume, "labs": torch.randn(5, generator=generator)})
    return next(iter(MonaiLoader(items, batch_size=4)))


@pytest.mark.parametrize("attributes", [False, True], ids=["whole", "patches"])
@pytest.mark.parametrize("fill", ["zeros", "mean", "permute"])
@pytest.mark.usefixtures("no_spot_check")  # counts the cached path's own rows
def test_monai_resnet10_encoder_gives_the_plain_numbers_on_metatensor_batches(fill, attributes) -> None:
    model = CTAndLabs().eval()
    modalities = resolve_modalities(
        [
            Modality("ct", key="ct", attributes=Patches3d((8, 8, 8)) if attributes else None),
            Modality("labs", key="labs"),
        ]
    )
    plain = make_engine(modalities, occlusion=fill, forward_fn=lambda m, b: m(b["ct"], b["labs"]))
    cached = make_engine(
        modalities, occlusion=fill, forward_fn=lambda m, b: m(b["ct"], b["labs"]), encoders={"ct": "ct", "labs": "labs"}
    )
    plain.run(model, ct_batch(1))  # the same batches in the same order: "permute" draws the same shuffles
    cached.run(model, ct_batch(1))  # the first batch of a measurement also runs the check
    batch = ct_batch(0)
    expected = plain.run(model, batch)
    model.ct.rows = 0
    actual = cached.run(model, batch)
    assert_same_numbers(actual.clean, expected.clean)
    assert_same_numbers(actual.occluded, expected.occluded)
    patches = 8 if attributes else 1
    # zeros: the one row of the constant fill was run on the first batch and is kept; permute: replayed. A sample
    # that "permute" maps onto itself is unchanged: its rows are not run (patches) or not needed (whole)
    ct_rows = {"zeros": 0, "mean": 4, "permute": 0}[fill] if not attributes else 4 * patches
    if fill == "permute" and attributes:
        # the 8 patch copies of each sample the shuffle moves (the labs' copy, 2 to 4 rows, would break the multiple)
        ct_rows = model.ct.rows - 4
        assert 0 < ct_rows <= 4 * patches and ct_rows % patches == 0
    assert model.ct.rows == 4 + ct_rows  # the clean batch, then the CT's own copies only: never for the labs' copy
    assert isinstance(batch["ct"], MetaTensor) and batch["ct"].meta["affine"].shape == (4, 4, 4)  # untouched


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_labels=3)).eval()


class ReportAndImage(nn.Module):
    """A BERT over the report (its ``logits``) and a small CNN over an image, added."""

    def __init__(self) -> None:
        super().__init__()
        self.report = RowCount(bert())
        torch.manual_seed(1)
        self.image = RowCount(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3)))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, image: Tensor) -> Tensor:
        return self.report(input_ids=input_ids, attention_mask=attention_mask).logits + self.image(image)


def report_batches() -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(3)
    batches = []
    for lengths in ([8, 5, 3, 7], [6, 4, 8]):
        n = len(lengths)
        mask = (torch.arange(LENGTH)[None] < torch.tensor(lengths)[:, None]).long()
        ids = torch.where(mask.bool(), torch.randint(5, 50, (n, LENGTH), generator=generator), PAD_ID)
        batches.append(
            {"input_ids": ids, "attention_mask": mask, "image": torch.randn(n, 1, 8, 8, generator=generator)}
        )
    return batches


def call(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(batch["input_ids"], batch["attention_mask"], batch["image"])


@pytest.mark.parametrize("attributes", [None, Tokens(LENGTH, attention_mask="attention_mask")], ids=["whole", "tokens"])
@pytest.mark.usefixtures("no_spot_check")  # counts the cached path's own rows
def test_a_hugging_face_bert_encoder_gives_the_plain_numbers_and_runs_only_for_the_reports_copies(attributes) -> None:
    modalities = resolve_modalities(
        [
            Modality("report", key="input_ids", occlusion=MASK_ID, attributes=attributes),
            Modality("image", key="image", occlusion="zeros"),
        ]
    )
    model = ReportAndImage().eval()
    plain = make_engine(modalities, forward_fn=call, output_transform="softmax")
    cached = make_engine(
        modalities, forward_fn=call, output_transform="softmax", encoders={"report": "report", "image": "image"}
    )
    first, second = report_batches()
    plain.run(model, first)
    cached.run(model, first)  # the first batch of a measurement also runs the check
    expected = plain.run(model, second)
    model.report.rows = 0
    actual = cached.run(model, second)
    assert_same_numbers(actual.clean, expected.clean)
    assert_same_numbers(actual.occluded, expected.occluded)
    # [MASK] everywhere is a constant fill, but BERT also reads each sample's attention mask: it runs on every row
    report_rows = int(second["attention_mask"].sum()) if attributes is not None else 3
    assert model.report.rows == 3 + report_rows  # clean + the report's own copies; the image's copy replays BERT
    if attributes is not None:  # padding was never run: exactly the clean row
        padded = second["attention_mask"] == 0
        occluded = actual.occluded["report"]
        assert torch.equal(occluded[padded], actual.clean[:, None].expand_as(occluded)[padded])
