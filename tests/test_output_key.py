"""output_key picks the prediction out of what the model returns; show_progress draws a bar and changes nothing."""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from transformers.modeling_outputs import SequenceClassifierOutput

from lightning_mc import ContributionMeasurement, Modality, ModalityContributionMonitor
from lightning_mc.functional import modality_contribution, modality_shapley
from lightning_mc.masks import Columns

from helpers import TwoModalityNet, assert_same_numbers, loader, trainer_kwargs, two_modality_dataset

# the table measured per column, so attribute values are compared too
MODALITIES = [Modality("image", key=0), Modality("table", key=1, attributes=Columns())]
OPTIONS: dict[str, Any] = {"output_transform": "softmax", "occlusion": "zeros"}


@dataclasses.dataclass
class Prediction:
    """A model output that is an object with attributes, as some libraries return."""

    logits: Tensor
    features: Tensor


def _as_dict(logits: Tensor, features: Tensor) -> dict[str, Tensor]:
    return {"logits": logits, "features": features}


def _as_namespace(logits: Tensor, features: Tensor) -> SimpleNamespace:
    return SimpleNamespace(logits=logits, features=features)


def _as_hugging_face(logits: Tensor, features: Tensor) -> SequenceClassifierOutput:
    return SequenceClassifierOutput(logits=logits, hidden_states=(features,))


class Wrapped(nn.Module):
    """``net``'s logits packed into another output type, next to a ``features`` tensor of another shape."""

    def __init__(self, net: nn.Module, pack: Any) -> None:
        super().__init__()
        self.net, self.pack = net, pack

    def forward(self, image: Tensor, table: Tensor) -> Any:
        logits = self.net(image, table)
        return self.pack(logits, torch.cat([logits, table], dim=1))  # (N, 8): wrong width if it were picked


@pytest.fixture(scope="module")
def net() -> TwoModalityNet:
    torch.manual_seed(0)
    return TwoModalityNet().eval()


@pytest.fixture(scope="module")
def batches() -> list[tuple[Tensor, ...]]:
    return list(loader(two_modality_dataset(40, seed=3), batch_size=16))  # 16, 16, 8 samples


@pytest.fixture(scope="module")
def reference(net, batches):
    """The numbers of the model that returns the logits tensor itself."""
    return modality_contribution(net, batches, MODALITIES, **OPTIONS)


@pytest.mark.parametrize(
    ("pack", "output_key"),
    [(_as_dict, "logits"), (_as_namespace, "logits"), (Prediction, "logits"), (_as_hugging_face, "logits")],
    ids=["dict", "namespace", "dataclass", "hf-SequenceClassifierOutput"],
)
def test_output_key_gives_exactly_the_numbers_of_the_tensor_model(net, batches, reference, pack, output_key) -> None:
    result = modality_contribution(Wrapped(net, pack), batches, MODALITIES, output_key=output_key, **OPTIONS)
    # bit-equal: the wrapper only repacks the same logits tensor, so the same kernels run on the same rows
    assert result == reference  # every field: shares, raw, attribute values, per-output shares, counts
    assert reference.shares["image"] > 0.05 and reference.shares["table"] > 0.05  # both modalities matter


def test_output_key_on_the_measurement_object(net, batches, reference) -> None:
    measurement = ContributionMeasurement(MODALITIES, output_key="logits", **OPTIONS)
    for batch in batches:
        measurement.update(Wrapped(net, _as_hugging_face), batch)
    assert measurement.compute() == reference


def test_output_key_on_modality_shapley(net, batches) -> None:
    expected = modality_shapley(net, batches, {"image": 0, "table": 1}, **OPTIONS)
    result = modality_shapley(Wrapped(net, _as_dict), batches, {"image": 0, "table": 1}, output_key="logits", **OPTIONS)
    assert result == expected
    assert expected.values["image"] > 0 and expected.values["table"] > 0


def test_forward_fn_runs_first_then_output_key_picks_from_what_it_returned(net, batches, reference) -> None:
    calls = []

    def forward_fn(model: nn.Module, batch: tuple[Tensor, ...]) -> dict[str, Tensor]:
        calls.append(batch[0].shape[0])
        return {"prediction": model(batch[0], batch[1]), "other": torch.zeros(batch[0].shape[0], 2)}

    result = modality_contribution(net, batches, MODALITIES, forward_fn=forward_fn, output_key="prediction", **OPTIONS)
    assert result == reference
    # 1 clean + 1 image + 5 column copies per batch, in calls of at most 4 copies: 7 copies x 40 samples in all
    assert sum(calls) == 7 * 40


class DictOutputNet(TwoModalityNet):
    """TwoModalityNet whose forward returns ``{"logits": ..., "features": ...}``."""

    def forward(self, image: Tensor, table: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        logits = super().forward(image, table)
        return {"logits": logits, "features": torch.cat([logits, table], dim=1)}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        image, table, label = batch
        return nn.functional.cross_entropy(self(image, table)["logits"], label)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass


def test_monitor_with_output_key_logs_the_shares_of_the_functional_api(tmp_path) -> None:
    torch.manual_seed(0)
    model = DictOutputNet()
    monitor = ModalityContributionMonitor(MODALITIES, output_key="logits", **OPTIONS)
    trainer = L.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path))
    val_loader = loader(two_modality_dataset(32, seed=1))
    trainer.fit(model, loader(two_modality_dataset(48, seed=0)), val_loader)
    assert len(monitor.history) == 2
    # the final check ran on the final weights: the plain tensor forward of the same weights gives the same numbers
    offline = modality_contribution(_TensorView(model), val_loader, MODALITIES, **OPTIONS)
    assert_same_numbers(monitor.latest, offline, "monitor.latest")  # another entry point
    for name in ("image", "table"):
        assert_same_numbers(
            trainer.callback_metrics[f"mc/share/{name}"].item(), offline.shares[name], f"mc/share/{name}"
        )
        assert_same_numbers(trainer.callback_metrics[f"mc/raw/{name}"].item(), offline.raw[name], f"mc/raw/{name}")


class _TensorView(nn.Module):
    """The logits tensor of a DictOutputNet, computed by TwoModalityNet's own forward (the reference)."""

    def __init__(self, model: DictOutputNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return TwoModalityNet.forward(self.model, image, table)


@pytest.mark.parametrize(
    ("pack", "type_name"),
    [(_as_dict, "dict"), (_as_namespace, "SimpleNamespace"), (Prediction, "Prediction")],
    ids=["dict", "namespace", "dataclass"],
)
def test_a_missing_key_is_a_key_error_naming_it_and_listing_what_there_is(net, batches, pack, type_name) -> None:
    with pytest.raises(KeyError) as raised:
        modality_contribution(Wrapped(net, pack), batches, MODALITIES, output_key="logit", **OPTIONS)
    message = raised.value.args[0]
    assert message.startswith(f"output_key='logit' is not in the model's output ({type_name}); it has ")
    assert "['logits', 'features']" in message
    assert "forward_fn" in message


def test_a_missing_key_of_a_hugging_face_output_lists_its_fields(net, batches) -> None:
    with pytest.raises(KeyError) as raised:
        modality_contribution(Wrapped(net, _as_hugging_face), batches, MODALITIES, output_key="loss", **OPTIONS)
    # a ModelOutput's keys are its fields that are not None: loss was not computed
    assert (
        "output_key='loss' is not in the model's output (SequenceClassifierOutput); it has ['logits', "
        in (raised.value.args[0])
    )


@pytest.mark.parametrize("output_key", [True, ["logits"], b"logits", ""], ids=["bool", "list", "bytes", "empty"])
@pytest.mark.parametrize("entry_point", ["functional", "shapley", "measurement", "monitor"])
def test_an_output_key_neither_a_name_nor_an_index_is_a_type_error(net, batches, output_key, entry_point) -> None:
    expected = re.escape(
        f"output_key={output_key!r} must be None, the non-empty name of the prediction (e.g. 'logits') or its index in "
        "a tuple output (e.g. 0)."
    )
    with pytest.raises(TypeError, match=expected):
        if entry_point == "functional":
            modality_contribution(Wrapped(net, _as_dict), batches, MODALITIES, output_key=output_key)
        elif entry_point == "shapley":
            modality_shapley(Wrapped(net, _as_dict), batches, {"image": 0, "table": 1}, output_key=output_key)
        elif entry_point == "measurement":
            ContributionMeasurement(MODALITIES, output_key=output_key)
        else:
            ModalityContributionMonitor(MODALITIES, output_key=output_key)


@pytest.mark.parametrize(
    ("pack", "type_name"), [(_as_dict, "dict"), (_as_hugging_face, "SequenceClassifierOutput")], ids=["dict", "hf"]
)
def test_a_dict_output_without_output_key_is_a_type_error_that_suggests_it(net, batches, pack, type_name) -> None:
    with pytest.raises(TypeError) as raised:
        modality_contribution(Wrapped(net, pack), batches, MODALITIES, **OPTIONS)
    message = str(raised.value)
    assert message.startswith(f"The model returned a {type_name}, not a tensor.")
    assert "output_key='logits'" in message


def test_an_output_key_that_selects_no_tensor_is_a_type_error(net, batches) -> None:
    def pack(logits: Tensor, features: Tensor) -> dict[str, Any]:
        return {"logits": logits, "names": ["a"] * logits.shape[0]}

    with pytest.raises(TypeError, match=re.escape("output_key='names' selected a list, not a tensor.")):
        modality_contribution(Wrapped(net, pack), batches, MODALITIES, output_key="names", **OPTIONS)


def _bar_lines(err: str) -> list[str]:
    """The lines tqdm drew (it redraws with carriage returns)."""
    return [line for line in re.split(r"[\r\n]", err) if line.strip()]


@pytest.mark.parametrize("function", [modality_contribution, modality_shapley], ids=["contribution", "shapley"])
def test_show_progress_draws_a_bar_with_rows_per_second_and_changes_no_number(net, batches, function, capsys) -> None:
    modalities = MODALITIES if function is modality_contribution else {"image": 0, "table": 1}
    quiet = function(net, batches, modalities, **OPTIONS)
    assert capsys.readouterr().err == ""  # show_progress=False (default) draws nothing
    shown = function(net, batches, modalities, show_progress=True, **OPTIONS)
    assert shown == quiet
    final = _bar_lines(capsys.readouterr().err)[-1]
    assert "3/3" in final  # three batches
    rows_per_s = re.search(r"rows_per_s=(\d+)", final)
    assert rows_per_s is not None and int(rows_per_s.group(1)) > 0, final


def test_show_progress_counts_limit_batches_and_iterables_without_a_length(net, batches, capsys) -> None:
    modality_contribution(net, batches, MODALITIES, limit_batches=2, show_progress=True, **OPTIONS)
    assert "2/2" in _bar_lines(capsys.readouterr().err)[-1]
    modality_contribution(net, iter(batches), MODALITIES, show_progress=True, **OPTIONS)
    final = _bar_lines(capsys.readouterr().err)[-1]
    assert re.search(r"\b3batch", final) and "/" not in final.split("batch")[0], final  # a count, no total
