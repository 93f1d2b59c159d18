"""The error messages and warnings that ``docs/troubleshooting.md`` quotes, each produced by a small, real trigger.

``docs/test_docs.py`` checks that the page quotes exactly these messages, so the page cannot drift from the code:
a changed message fails the test until the page says what the code says.
``.venv/bin/python docs/troubleshooting_cases.py`` prints them all (to paste a new one into the page).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mc import (
    CollapseEarlyStopping,
    ContributionMeasurement,
    Modality,
    ModalityBalancer,
    ModalityContributionMonitor,
)
from lightning_mc.functional import modality_contribution, modality_shapley
from lightning_mc.masks import ColumnGroups, Columns, Tokens


class _Sum(nn.Module):
    """``a·W + b·V``: two outputs, a 4-column ``a`` and a 3-column ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(3, 2)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.a(a) + self.b(b)


class _Net(L.LightningModule):
    """``Sum`` as a LightningModule, validated on one or several loaders."""

    def __init__(self, zero: bool = False) -> None:
        super().__init__()
        self.model = _Sum()
        if zero:  # a model that ignores its inputs
            for parameter in self.model.parameters():
                nn.init.zeros_(parameter)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.model(a, b)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0], batch[1]).sum() * 0.0

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _ReturnsProbabilities(_Net):
    """A validation step that returns the softmax of the logits (what ``reuse_outputs`` must not be given)."""

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(batch[0], batch[1]).softmax(dim=1)


class _ReturnsOther(_Net):
    """A validation step that returns other logits than the model's forward call (here doubled)."""

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return 2.0 * self(batch[0], batch[1])


class _FlagScaled(nn.Module):
    """``a``'s encoder is scaled by ``1 + b[:, 0]`` (a FiLM term on a table flag): not an encoder of ``a`` alone."""

    def __init__(self) -> None:
        super().__init__()
        self.a_encoder, self.b_encoder = nn.Linear(4, 2), nn.Linear(3, 2)
        self.flag = torch.zeros(1, 1)
        self.a_encoder.register_forward_hook(lambda module, inputs, output: output * (1.0 + self.flag))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        self.flag = b[:, :1]
        return self.a_encoder(a) + self.b_encoder(b)


def _flag_batches(first_on: bool) -> list[dict[str, Tensor]]:
    """Two batches of 6 whose flag ``b[:, 0]`` is 0 in the first (unless ``first_on``) and 1 in the second."""
    batches = [_batch(), _batch()]
    for index, batch in enumerate(batches):
        batch["b"][:, 0] = float(first_on or index > 0)
    return batches


def _encoder_reads_another(first_on: bool) -> None:
    modality_contribution(
        _FlagScaled(), _flag_batches(first_on), {"a": "a", "b": "b"}, occlusion="zeros",
        encoders={"a": "a_encoder", "b": "b_encoder"},
    )  # fmt: skip


def _batch(n: int = 6) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"a": torch.randn(n, 4, generator=generator), "b": torch.randn(n, 3, generator=generator)}


def _tuple_loader(n: int = 6) -> DataLoader:
    data = _batch(n)
    return DataLoader(TensorDataset(data["a"], data["b"], torch.zeros(n)), batch_size=n)


def _fit(callbacks: list[L.Callback], val: Any = None, model: L.LightningModule | None = None, epochs: int = 1) -> None:
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model or _Net(), _tuple_loader(), _tuple_loader() if val is None else val)


def first_row(value: Tensor) -> Tensor:
    """A fill of the wrong shape (the messages name a fill callable by its name)."""
    return value[:1, :2]


def as_double(value: Tensor) -> Tensor:
    """A fill of the wrong dtype."""
    return value.double()


def _with_features(model: nn.Module, data: Any) -> tuple[Tensor, Tensor]:
    """A ``forward_fn`` that returns ``(logits, features)``, as a model with ``return_dict=False`` does."""
    return model(data["a"], data["b"]), data["a"]


def reject_zeros(model: nn.Module, data: Any) -> Tensor:
    """A ``forward_fn`` that fails on the copy with ``b`` occluded."""
    if (data["b"] == 0).all():
        raise ValueError("b must not be all zeros")
    return model(data["a"], data["b"])


def _model_with_nan(a: Tensor, b: Tensor) -> Tensor:
    out = a[:, :2] + b[:, :2]
    out[0] = float("nan")
    return out


class _NanModel(nn.Module):
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return _model_with_nan(a, b)


class _OneOutput(nn.Module):
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a.sum(1, keepdim=True) + b.sum(1, keepdim=True)


class _WidthChanges(nn.Module):
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a if (b == 0).all() else a[:, :2]


class _MaxOfBoth(nn.Module):
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.maximum(a.sum(1, keepdim=True), b.sum(1, keepdim=True))


class _Segmentation(nn.Module):
    """Channel-first logits ``(N, 2, 3, 3)``, as a segmentation net returns."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return (a[:, :2] + b[:, :2]).reshape(-1, 2, 1, 1).expand(-1, 2, 3, 3)


class _MaskFirst(nn.Module):
    """``forward(mask, a)``: the dict key ``"a"`` names its second parameter."""

    def forward(self, mask: Tensor, a: Tensor) -> Tensor:
        return mask[:, :2] + a[:, :2]


class _Confident(nn.Module):
    """A classifier whose logits are far apart: its softmax is exactly 0 and 1 in float32."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        logits = a[:, :2] + b[:, :2]
        return torch.stack([logits[:, 0] + 200.0, logits[:, 1]], dim=1)


def _redundant() -> None:
    generator = torch.Generator().manual_seed(0)
    scan = torch.rand(64, 3, generator=generator)
    report = scan + 0.02 * torch.randn(64, 3, generator=generator)  # the same evidence, a little noise
    modality_contribution(_MaxOfBoth(), [(scan, report)], {"a": 0, "b": 1}, occlusion="zeros", check_redundancy=True)


class _FirstColumns(nn.Module):
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a[:, :2] + b[:, :2]


def _batches_change() -> None:
    measurement = ContributionMeasurement([Modality("a", key="a", attributes=Columns()), Modality("b", key="b")])
    measurement.update(_FirstColumns(), _batch())
    measurement.update(_FirstColumns(), {"a": torch.randn(6, 5), "b": torch.randn(6, 3)})


def _ids_batch() -> dict[str, Tensor]:
    return {"a": torch.randn(6, 4), "b": torch.randint(1, 5, (6, 3))}


class _IdsModel(nn.Module):
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a[:, :2] + b[:, :2].float()


def _stopper_sees_nan() -> None:
    monitor = ModalityContributionMonitor({"a": 0, "b": 1})
    _fit([monitor, CollapseEarlyStopping(min_share=0.1)], model=_Net(zero=True))


class _NanWhenEvaluated(_Net):
    """Trains as ``_Net`` and gives NaN outputs in eval mode (a model that diverged, as validation sees it)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        out = self.model(a, b)
        return out if self.training else out * float("nan")


def _stopper_sees_nan_outputs() -> None:
    monitor = ModalityContributionMonitor({"a": 0, "b": 1})
    _fit([monitor, CollapseEarlyStopping(min_share=0.1)], model=_NanWhenEvaluated())


def _balancer_sees_nan() -> None:
    monitor = ModalityContributionMonitor({"a": 0, "b": 1})
    _fit([monitor, ModalityBalancer({"a": "model.a", "b": "model.b"}, min_share=None)], model=_Net(zero=True))


def _validate_unmeasured() -> None:
    trainer = L.Trainer(
        callbacks=[ModalityContributionMonitor({"a": 0, "b": 1})],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.validate(_Net(), _tuple_loader(), verbose=False)


def _labels(labels: Any, label_kind: str = "auto", val: int = 6, **options: Any) -> Callable[[], None]:
    """A fit whose stopper reads ``labels`` on ``val`` validation samples (problems: at the first training batch)."""

    def fit() -> None:
        torch.manual_seed(0)
        stopper = CollapseEarlyStopping(min_share=0.99, patience=1, labels=labels, label_kind=label_kind, **options)
        _fit([ModalityContributionMonitor({"a": 0, "b": 1}, occlusion="zeros"), stopper], val=_tuple_loader(val))

    return fit


def first_three(batch: Any) -> Tensor:
    """Labels of the wrong length."""
    return batch[2][:3]


def sign_of_a(batch: Any) -> Tensor:
    """Two classes, by the sign of ``a``'s first column."""
    return (batch[0][:, 0] > 0).long()


#: ``case id -> trigger``; each raises (or warns) the message the page quotes for that case.
CASES: dict[str, Callable[[], Any]] = {
    # constructor arguments
    "one_modality": lambda: ModalityContributionMonitor({"a": 0}),
    "duplicate_names": lambda: ModalityContributionMonitor([Modality("a", key=0), Modality("a", key=1)]),
    "shared_location": lambda: ModalityContributionMonitor({"image": 0, "table": 0}),
    "modality_location": lambda: ModalityContributionMonitor({"a": 0, "b": 2.5}),
    "modality_key_and_getter": lambda: Modality("a"),
    "modality_slash": lambda: Modality("ct/pet", key=0),
    "unknown_fill": lambda: ModalityContributionMonitor({"a": 0, "b": 1}, occlusion="median"),
    "output_transform": lambda: ModalityContributionMonitor({"a": 0, "b": 1}, output_transform="relu"),
    "normalization": lambda: ModalityContributionMonitor({"a": 0, "b": 1}, normalization="mean"),
    "limit_batches": lambda: ModalityContributionMonitor({"a": 0, "b": 1}, limit_batches=1.5),
    "every_n_epochs": lambda: ModalityContributionMonitor({"a": 0, "b": 1}, every_n_epochs=0),
    "max_batch_size": lambda: ModalityContributionMonitor({"a": 0, "b": 1}, max_batch_size=0),
    "prefix": lambda: ModalityContributionMonitor({"a": 0, "b": 1}, prefix="mc/val"),
    "ci": lambda: ModalityContributionMonitor({"a": 0, "b": 1}, ci=95),
    "ci_normalization": lambda: ModalityContributionMonitor(
        {"a": 0, "b": 1}, ci=0.95, normalization="per_sample_output"
    ),
    "shapley_seven": lambda: modality_shapley(_Sum(), [], {str(i): i for i in range(7)}),
    "perf_without_target": lambda: ModalityContributionMonitor({"a": 0, "b": 1}, perf_metric=_accuracy()),
    "min_share": lambda: CollapseEarlyStopping(min_share=10),
    "action": lambda: CollapseEarlyStopping(action="pause"),
    "stopper_labels": lambda: CollapseEarlyStopping(labels=2.5),
    # at the first training batch
    "labels_out_of_range": _labels(5),
    "labels_wrong_length": _labels(first_three),
    "labels_auto_ambiguous": _labels(lambda batch: batch[2] + 40),
    "labels_kind_mismatch": _labels(2, "survival"),
    "labels_not_classes": _labels(lambda batch: batch[0][:, 0], "classes"),
    # at the check: the labels are the sign of a; b is noise, on too few samples to show it
    "probe_informative": _labels(sign_of_a, val=30, action="warn"),
    "probe_undecided": _labels(sign_of_a, val=30, action="warn"),
    # at setup, with a trainer
    "same_monitor_twice": lambda: _fit(
        [ModalityContributionMonitor({"a": 0, "b": 1}), ModalityContributionMonitor({"a": 0, "b": 1})]
    ),
    "same_prefix": lambda: _fit(
        [
            ModalityContributionMonitor({"a": 0, "b": 1}),
            ModalityContributionMonitor({"a": 0, "b": 1}, dataloader_idx=1),
        ],
        val=[_tuple_loader(), _tuple_loader()],
    ),
    "stopper_alone": lambda: _fit([CollapseEarlyStopping()]),
    "stopper_two_monitors": lambda: _fit(
        [
            ModalityContributionMonitor({"a": 0, "b": 1}),
            ModalityContributionMonitor({"a": 0, "b": 1}, prefix="mc_external"),
            CollapseEarlyStopping(),
        ]
    ),
    "stopper_unknown_modality": lambda: _fit(
        [ModalityContributionMonitor({"a": 0, "b": 1}), CollapseEarlyStopping(modalities=["image"])]
    ),
    "reuse_probabilities": lambda: _fit(
        [ModalityContributionMonitor({"a": 0, "b": 1}, output_transform="softmax", reuse_outputs=True)],
        model=_ReturnsProbabilities(),
    ),
    "reuse_other": lambda: _fit(
        [ModalityContributionMonitor({"a": 0, "b": 1}, reuse_outputs=True)], model=_ReturnsOther()
    ),
    "dataloader_idx": lambda: _fit([ModalityContributionMonitor({"a": 0, "b": 1}, dataloader_idx=2)]),
    # during a check: the _batch
    "dict_key": lambda: modality_contribution(_Sum(), [_batch()], {"a": "a", "b": "B"}),
    "index": lambda: modality_contribution(_Sum(), _tuple_loader(), {"a": 0, "b": 5}),
    "key_on_tuple": lambda: modality_contribution(_Sum(), _tuple_loader(), {"a": "a", "b": "b"}),
    "not_a_tensor": lambda: modality_contribution(
        _Sum(), [{"a": torch.randn(6, 4), "b": [[0.0] * 3] * 6}], {"a": "a", "b": "b"}
    ),
    "sample_counts": lambda: modality_contribution(
        _Sum(), [{"a": torch.randn(6, 4), "b": torch.randn(5, 3)}], {"a": "a", "b": "b"}
    ),
    # during a check: the model's output
    "output_dict": lambda: modality_contribution(
        _Sum(), [_batch()], {"a": "a", "b": "b"}, forward_fn=lambda model, data: {"logits": model(data["a"], data["b"])}
    ),
    "encoder_reads_another": lambda: _encoder_reads_another(first_on=True),
    "encoder_reads_another_later": lambda: _encoder_reads_another(first_on=False),
    "output_tuple": lambda: modality_contribution(_Sum(), [_batch()], {"a": "a", "b": "b"}, forward_fn=_with_features),
    "output_name_on_tuple": lambda: modality_contribution(
        _Sum(), [_batch()], {"a": "a", "b": "b"}, forward_fn=_with_features, output_key="logits"
    ),
    "output_key": lambda: modality_contribution(
        _Sum(),
        [_batch()],
        {"a": "a", "b": "b"},
        forward_fn=lambda model, data: {"logits": model(data["a"], data["b"])},
        output_key="prediction",
    ),
    "output_not_per_sample": lambda: modality_contribution(
        _Sum(), [_batch()], {"a": "a", "b": "b"}, forward_fn=lambda model, data: model(data["a"], data["b"]).sum()
    ),
    "output_width": lambda: modality_contribution(
        _WidthChanges(), [_batch()], {"a": "a", "b": "b"}, occlusion="zeros", max_batch_size=6
    ),
    "forward_raises": lambda: modality_contribution(
        _Sum(), [_batch()], {"a": "a", "b": "b"}, forward_fn=reject_zeros, occlusion="zeros", max_batch_size=6
    ),
    # during a check: fills and attributes
    "float_fill_on_ids": lambda: modality_contribution(
        _IdsModel(), [_ids_batch()], {"a": "a", "b": "b"}, occlusion=0.5
    ),
    "mean_fill_on_ids": lambda: modality_contribution(_IdsModel(), [_ids_batch()], {"a": "a", "b": "b"}),
    "fill_shape": lambda: modality_contribution(_Sum(), [_batch()], {"a": "a", "b": "b"}, occlusion=first_row),
    "fill_dtype": lambda: modality_contribution(_Sum(), [_batch()], {"a": "a", "b": "b"}, occlusion=as_double),
    "columns_names": lambda: modality_contribution(
        _Sum(), [_batch()], [Modality("a", key="a", attributes=Columns(["x", "y"])), Modality("b", key="b")]
    ),
    "column_groups": lambda: modality_contribution(
        _Sum(), [_batch()], [Modality("a", key="a"), Modality("b", key="b", attributes=ColumnGroups({"labs": [2, 3]}))]
    ),
    "tokens_max_length": lambda: modality_contribution(
        _IdsModel(),
        [_ids_batch()],
        [Modality("a", key="a"), Modality("b", key="b", occlusion=0, attributes=Tokens(max_length=2, pad_id=0))],
    ),
    # the measurement object and the functional API
    "batches_change": _batches_change,
    "compute_first": lambda: ContributionMeasurement({"a": 0, "b": 1}).compute(),
    "empty_data": lambda: modality_contribution(_Sum(), [], {"a": 0, "b": 1}),
    "target_missing": lambda: modality_contribution(
        _Sum(), [_batch()], {"a": "a", "b": "b"}, perf_metric=_accuracy(), target="label"
    ),
    # warnings
    "nothing_moves": lambda: modality_contribution(_Net(zero=True).model, _tuple_loader(), {"a": 0, "b": 1}),
    "nan_outputs": lambda: modality_contribution(_NanModel(), [_batch()], {"a": "a", "b": "b"}, occlusion="zeros"),
    "softmax_one_output": lambda: modality_contribution(
        _OneOutput(), [_batch()], {"a": "a", "b": "b"}, output_transform="softmax"
    ),
    "class_dim": lambda: modality_contribution(
        _Segmentation(), [_batch()], {"a": "a", "b": "b"}, output_transform="softmax"
    ),
    "dict_mapping": lambda: modality_contribution(_MaskFirst(), [_batch()], {"a": "a", "b": "b"}),
    "one_sample_permute": lambda: modality_contribution(
        _Sum(), [_batch(1), _batch(1)], {"a": "a", "b": "b"}, occlusion="permute"
    ),
    "saturated": lambda: modality_contribution(
        _Confident(), [_batch()], {"a": "a", "b": "b"}, output_transform="softmax"
    ),
    "tolerance_unmet": lambda: modality_contribution(
        _OneOutput(), [_batch(60)], {"a": "a", "b": "b"}, occlusion="zeros", tolerance=0.01
    ),
    "redundant": _redundant,
    "stopper_nan": _stopper_sees_nan,
    "stopper_nan_outputs": _stopper_sees_nan_outputs,
    "balancer_nan": _balancer_sees_nan,
    "validate_unmeasured": _validate_unmeasured,
    "empty_loader": lambda: _fit(
        [ModalityContributionMonitor({"a": 0, "b": 1}, dataloader_idx=1)],
        val=[_tuple_loader(), DataLoader(TensorDataset(torch.zeros(0)))],
    ),
}


def _accuracy() -> Any:
    from torchmetrics.classification import BinaryAccuracy

    return BinaryAccuracy()


#: For a trigger that warns: a phrase that picks the warning the page quotes among those the trigger emits.
PICK = {
    "redundant": "look redundant",
    "one_sample_permute": "changed no input",
    "saturated": "saturated outputs",
    "stopper_nan": "CollapseEarlyStopping",
    "stopper_nan_outputs": "CollapseEarlyStopping",
    "balancer_nan": "ModalityBalancer",
    "empty_loader": "measured no batch",
    "validate_unmeasured": "does not measure trainer.validate()",
    "probe_informative": "Modality 'a' collapsed",
    "probe_undecided": "Modality 'b' collapsed",
}

#: Warnings of other libraries that some triggers also raise (Lightning's tips); not part of the page.
_FOREIGN = ("does not have many workers", "LeafSpec", "GPU available", "litlogger", "Trainer.fit", "TPU available")


def message(case: str) -> str:
    """``"<ExceptionType>: <message>"`` of the error the trigger raises, or ``"UserWarning: <message>"``.

    For a trigger that warns: the first of its warnings that comes from this package (or the one ``PICK`` names).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            CASES[case]()
        except Exception as err:
            return f"{type(err).__name__}: {_text(err)}"
    ours = [w for w in caught if not any(part in str(w.message) for part in _FOREIGN)]
    if case in PICK:
        ours = [w for w in ours if PICK[case] in str(w.message)]
    if not ours:
        raise AssertionError(f"case {case!r} neither raised nor warned")
    return f"{ours[0].category.__name__}: {ours[0].message}"


def _text(err: BaseException) -> str:
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    return str(err)


if __name__ == "__main__":
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for name in CASES:
        print(f"[{name}]\n{message(name)}\n")
