"""The ecosystem: a real Hugging Face model, LightningCLI configs, the old ``pytorch_lightning`` namespace.

Nothing here downloads: the BERT is built from a tiny config with random weights.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import pytorch_lightning as PL
import torch
from lightning.pytorch.cli import LightningCLI
from tensorboard.backend.event_processing import event_accumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

from lightning_mc import CollapseEarlyStopping, Modality, ModalityContributionMonitor
from lightning_mc.functional import modality_contribution
from lightning_mc.masks import Tokens, Words

from helpers import TwoModalityNet, assert_same_numbers, loader, trainer_kwargs, two_modality_dataset

# ---------------------------------------------------------------------------------------------------------------
# Hugging Face: a real BertForSequenceClassification, per-token and per-word contributions, output_key="logits"
# ---------------------------------------------------------------------------------------------------------------

PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 2, 3, 4
VOCAB_SIZE, LENGTH, MAX_LENGTH, NUM_LABS, NUM_CLASSES = 50, 10, 12, 4, 3
LENGTHS = ([8, 5, 3, 7], [6, 8, 4])  # real tokens per sample, [CLS] and [SEP] included: positions 8, 9 are all padding


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may reach the network: the hub is offline and opening a connection fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a test of test_ecosystem.py tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)


def _bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=NUM_CLASSES,
        initializer_range=0.5,  # random weights large enough that single tokens move the outputs visibly
    )
    return BertForSequenceClassification(config).eval()


class ReportAndLabs(nn.Module):
    """A report (BERT over token ids) and lab values (a linear layer) fused by adding their logits.

    Returns what a Hugging Face model returns, a ``SequenceClassifierOutput``; the prediction is its ``logits``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.text = _bert()
        self.labs = nn.Linear(NUM_LABS, NUM_CLASSES)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labs: Tensor) -> SequenceClassifierOutput:
        text = self.text(input_ids=input_ids, attention_mask=attention_mask).logits
        return SequenceClassifierOutput(logits=text + self.labs(labs))


def _call_with_the_batch(model: nn.Module, batch: dict[str, Tensor]) -> Any:
    return model(batch["input_ids"], batch["attention_mask"], batch["labs"])


def _text_batches() -> list[dict[str, Tensor]]:
    """Padded token ids as a tokenizer gives them: ``[CLS] w w ... [SEP] [PAD] ...``, with word ids (-1: none)."""
    generator = torch.Generator().manual_seed(7)
    batches = []
    for lengths in LENGTHS:
        n = len(lengths)
        input_ids = torch.full((n, LENGTH), PAD_ID)
        attention_mask = torch.zeros(n, LENGTH, dtype=torch.long)
        word_ids = torch.full((n, LENGTH), -1)
        for k, length in enumerate(lengths):
            input_ids[k, 0], input_ids[k, length - 1] = CLS_ID, SEP_ID
            input_ids[k, 1 : length - 1] = torch.randint(5, VOCAB_SIZE, (length - 2,), generator=generator)
            attention_mask[k, :length] = 1
            word, position = 0, 1
            while position < length - 1:  # words of one or two word pieces
                pieces = min(int(torch.randint(1, 3, (1,), generator=generator)), length - 1 - position)
                word_ids[k, position : position + pieces] = word
                word, position = word + 1, position + pieces
        labs = torch.randn(n, NUM_LABS, generator=generator)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "word_ids": word_ids, "labs": labs})
    return batches


def _report(attributes: Any) -> Modality:
    return Modality("report", key="input_ids", occlusion=MASK_ID, attributes=attributes)


def _hand_loop(model: ReportAndLabs, batches: list[dict[str, Tensor]], groups: str) -> tuple[dict[str, float], float]:
    """Algorithm 1 by hand, one sample and one occlusion per forward call, on the *unpadded* sequence.

    ``groups="tokens"``: each real position ``p`` is replaced by [MASK] alone (attribute ``t<p>``); ``"words"``: all
    pieces of word ``w`` together (``w<w>``). The labs are replaced by zeros. Returns the mean summed absolute
    change of the softmax per report attribute and for the labs.
    """
    report: dict[str, float] = {}
    labs, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            for k in range(batch["input_ids"].shape[0]):
                length = int(batch["attention_mask"][k].sum())
                ids, lab = batch["input_ids"][k : k + 1, :length], batch["labs"][k : k + 1]
                ones = torch.ones_like(ids)

                def probabilities(ids: Tensor, lab: Tensor, ones: Tensor = ones) -> Tensor:
                    return model(ids, ones, lab).logits.softmax(-1)

                clean = probabilities(ids, lab)
                if groups == "tokens":
                    spans = {f"t{p}": [p] for p in range(length)}
                else:
                    word_ids = batch["word_ids"][k, :length].tolist()
                    spans = {f"w{w}": [p for p, v in enumerate(word_ids) if v == w] for w in set(word_ids) - {-1}}
                for name, positions in spans.items():
                    occluded = ids.clone()
                    occluded[0, positions] = MASK_ID
                    report[name] = report.get(name, 0.0) + (clean - probabilities(occluded, lab)).abs().sum().item()
                labs += (clean - probabilities(ids, torch.zeros_like(lab))).abs().sum().item()
                count += 1
    return {name: value / count for name, value in report.items()}, labs / count


def test_bert_per_token_contributions_equal_a_hand_loop_and_padding_gets_exactly_zero() -> None:
    model, batches = ReportAndLabs().eval(), _text_batches()
    modalities = [_report(Tokens(MAX_LENGTH, attention_mask="attention_mask")), Modality("labs", key="labs")]
    result = modality_contribution(
        model,
        batches,
        modalities,
        forward_fn=_call_with_the_batch,
        output_key="logits",
        output_transform="softmax",
        occlusion="zeros",  # the labs' fill; the report has its own, the [MASK] id
    )
    tokens = result.attribute_raw["report"]
    assert list(tokens) == [f"t{p}" for p in range(MAX_LENGTH)]  # the same attributes in every batch
    # planted: positions 8, 9 are padding in every sample and 10, 11 lie beyond the batches' length
    assert [tokens[f"t{p}"] for p in (8, 9, 10, 11)] == [0.0, 0.0, 0.0, 0.0]
    assert all(tokens[f"t{p}"] > 1e-4 for p in range(8))

    expected_tokens, expected_labs = _hand_loop(model, batches, "tokens")
    assert result.num_samples == 7
    for p in range(8):
        assert tokens[f"t{p}"] == pytest.approx(expected_tokens[f"t{p}"], rel=1e-4, abs=1e-7)
    assert result.raw["labs"] == pytest.approx(expected_labs, rel=1e-5)
    total = sum(expected_tokens.values()) + expected_labs
    assert result.shares["report"] == pytest.approx(sum(expected_tokens.values()) / total, rel=1e-4)
    assert result.shares["report"] + result.shares["labs"] == pytest.approx(1.0)
    assert 0.05 < result.shares["labs"] < 0.95  # both modalities matter in this model


def test_bert_per_word_contributions_equal_a_hand_loop_and_special_tokens_are_never_occluded() -> None:
    model, batches = ReportAndLabs().eval(), _text_batches()
    words = Words(max_words=6, word_ids="word_ids", attention_mask="attention_mask")
    result = modality_contribution(
        model,
        batches,
        [_report(words), Modality("labs", key="labs", occlusion="zeros")],
        forward_fn=_call_with_the_batch,
        output_key="logits",
        output_transform="softmax",
    )
    expected_words, expected_labs = _hand_loop(model, batches, "words")
    assert set(expected_words) < set(result.attribute_raw["report"])  # some samples have fewer words than others
    for name, value in result.attribute_raw["report"].items():
        # [CLS], [SEP] and padding belong to no word: a word no sample has gets exactly 0
        assert value == pytest.approx(expected_words.get(name, 0.0), rel=1e-4, abs=1e-7)
        if name not in expected_words:
            assert value == 0.0
    assert result.raw["labs"] == pytest.approx(expected_labs, rel=1e-5)


def test_padding_gets_zero_because_of_the_attention_mask_even_when_the_model_reads_the_padding() -> None:
    """BERT called with an all-ones attention mask sees the [PAD] tokens: occluding them moves the logits, so the
    zeros of ``Tokens(attention_mask=...)`` are the mask builder's doing, not the model's."""
    model, batches = ReportAndLabs().eval(), _text_batches()

    def reads_the_padding(model: nn.Module, batch: dict[str, Tensor]) -> Any:
        return model(batch["input_ids"], torch.ones_like(batch["attention_mask"]), batch["labs"])

    def measure(attributes: Tokens) -> dict[str, float]:
        modalities = [_report(attributes), Modality("labs", key="labs", occlusion="zeros")]
        result = modality_contribution(
            model, batches, modalities, forward_fn=reads_the_padding, output_key="logits", output_transform="softmax"
        )
        return result.attribute_raw["report"]

    masked = measure(Tokens(MAX_LENGTH, attention_mask="attention_mask"))
    every_position = measure(Tokens(MAX_LENGTH))
    assert masked["t8"] == masked["t9"] == 0.0
    assert every_position["t8"] > 1e-4 and every_position["t9"] > 1e-4  # the model does react to the padding
    assert every_position["t10"] == every_position["t11"] == 0.0  # beyond the length: nothing to occlude
    assert masked["t0"] > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# LightningCLI: both callbacks from a YAML config
# ---------------------------------------------------------------------------------------------------------------


class TwoModalityData(L.LightningDataModule):
    """The helpers' two-modality data set as a LightningDataModule (what a LightningCLI config names)."""

    def __init__(self, num_train: int = 48, num_val: int = 32, batch_size: int = 16) -> None:
        super().__init__()
        self.num_train, self.num_val, self.batch_size = num_train, num_val, batch_size

    def train_dataloader(self) -> DataLoader:
        return loader(two_modality_dataset(self.num_train, seed=0), self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return loader(two_modality_dataset(self.num_val, seed=1), self.batch_size)


TRAINER_YAML = """\
trainer:
  max_epochs: 2
  accelerator: cpu
  devices: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
"""

CALLBACKS_YAML = """\
  callbacks:
    - class_path: lightning_mc.ModalityContributionMonitor
      init_args:
        modalities: {image: 0, table: 1}
        output_transform: softmax
        prefix: mc_val
    - class_path: lightning_mc.CollapseEarlyStopping
      init_args:
        min_share: 0.01
        patience: 2
        modalities: [image]
        action: warn
"""


def _cli(tmp_path: Path, yaml: str, monkeypatch: pytest.MonkeyPatch, cli: type[LightningCLI] = LightningCLI) -> Any:
    config = tmp_path / "config.yaml"
    config.write_text(yaml)
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI warns when args= and pytest's argv are both set
    return cli(
        TwoModalityNet,
        TwoModalityData,
        args=["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"],
        save_config_kwargs={"overwrite": True},
    )


def _only(callbacks: list[Any], kind: type) -> Any:
    matches = [callback for callback in callbacks if isinstance(callback, kind)]
    assert len(matches) == 1, callbacks
    return matches[0]


def test_lightning_cli_yaml_configures_the_monitor_and_the_stopper(tmp_path, monkeypatch) -> None:
    cli = _cli(tmp_path, TRAINER_YAML + CALLBACKS_YAML, monkeypatch)
    monitor = _only(cli.trainer.callbacks, ModalityContributionMonitor)
    stopper = _only(cli.trainer.callbacks, CollapseEarlyStopping)
    assert monitor.prefix == "mc_val" and monitor.engine.outputs.output_transform == "softmax"
    assert [entry["epoch"] for entry in monitor.history] == [0, 1]
    assert stopper.monitor is monitor and stopper.watched_modalities == ("image",)
    assert [entry["epoch"] for entry in stopper.history] == [0, 1] and stopper.action == "warn"
    # the last check ran on the final weights: the functional API on the trained model gives the logged numbers
    offline = modality_contribution(
        cli.model, cli.datamodule.val_dataloader(), {"image": 0, "table": 1}, output_transform="softmax"
    )
    for name in ("image", "table"):
        logged = cli.trainer.callback_metrics[f"mc_val/share/{name}"].item()
        assert_same_numbers(logged, offline.shares[name], f"mc_val/share/{name}")
    assert (tmp_path / "config.yaml").read_text().count("lightning_mc.") == 2


class LinkedCLI(LightningCLI):
    """Two monitors and a stopper as parser groups; the stopper's ``monitor`` is linked to the external monitor."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(ModalityContributionMonitor, "internal")
        parser.add_lightning_class_args(ModalityContributionMonitor, "external")
        parser.add_lightning_class_args(CollapseEarlyStopping, "collapse")
        parser.link_arguments("external", "collapse.monitor", apply_on="instantiate")


LINKED_YAML = """\
internal:
  modalities: {image: 0, table: 1}
  output_transform: softmax
external:
  modalities: {image: 0, table: 1}
  output_transform: softmax
  occlusion: zeros
  prefix: mc_external
collapse:
  min_share: 0.01
  action: warn
"""


def test_lightning_cli_links_the_stopper_to_one_of_two_monitors(tmp_path, monkeypatch) -> None:
    cli = _cli(tmp_path, TRAINER_YAML + LINKED_YAML, monkeypatch, cli=LinkedCLI)
    monitors = [cb for cb in cli.trainer.callbacks if isinstance(cb, ModalityContributionMonitor)]
    stopper = _only(cli.trainer.callbacks, CollapseEarlyStopping)
    assert [monitor.prefix for monitor in monitors] == ["mc", "mc_external"]
    assert stopper.monitor is monitors[1]  # the very object in trainer.callbacks, not a copy
    assert len(stopper.history) == 2
    assert [entry["shares"] for entry in stopper.history] == [entry["shares"] for entry in monitors[1].history]
    assert monitors[0].history[-1]["shares"] != monitors[1].history[-1]["shares"]  # mean vs zeros fill


UNLINKED_YAML = """\
  callbacks:
    - class_path: lightning_mc.ModalityContributionMonitor
      init_args: {modalities: {image: 0, table: 1}}
    - class_path: lightning_mc.ModalityContributionMonitor
      init_args: {modalities: {image: 0, table: 1}, prefix: mc_external}
    - class_path: lightning_mc.CollapseEarlyStopping
"""

NESTED_YAML = """\
  callbacks:
    - class_path: lightning_mc.ModalityContributionMonitor
      init_args: {modalities: {image: 0, table: 1}}
    - class_path: lightning_mc.CollapseEarlyStopping
      init_args:
        monitor:
          class_path: lightning_mc.ModalityContributionMonitor
          init_args: {modalities: {image: 0, table: 1}}
"""


def test_lightning_cli_with_two_monitors_and_no_link_asks_which_one(tmp_path, monkeypatch) -> None:
    expected = (
        "trainer.callbacks has 2 ModalityContributionMonitor callbacks (ModalityContributionMonitor(modalities="
        "['image', 'table'], dataloader_idx=0, prefix='mc'), ModalityContributionMonitor(modalities=['image', "
        "'table'], dataloader_idx=0, prefix='mc_external')); pass the one to read as "
        "CollapseEarlyStopping(monitor=...)."
    )
    with pytest.raises(RuntimeError) as raised:
        _cli(tmp_path, TRAINER_YAML + UNLINKED_YAML, monkeypatch)
    assert str(raised.value) == expected


def test_lightning_cli_a_monitor_nested_in_the_stopper_is_a_copy_and_is_refused(tmp_path, monkeypatch) -> None:
    # YAML builds a second monitor object for the stopper: it is not the one in trainer.callbacks
    with pytest.raises(RuntimeError, match=r"given a ModalityContributionMonitor that is not in trainer.callbacks"):
        _cli(tmp_path, TRAINER_YAML + NESTED_YAML, monkeypatch)


def test_lightning_cli_reports_a_bad_callback_argument_with_the_valid_values(tmp_path, monkeypatch, capsys) -> None:
    with pytest.raises(SystemExit) as raised:
        _cli(
            tmp_path,
            TRAINER_YAML + CALLBACKS_YAML.replace("output_transform: softmax", "output_transform: softmx"),
            monkeypatch,
        )
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "Problem with given class_path 'lightning_mc.ModalityContributionMonitor'" in err
    assert "Expected a typing.Literal['softmax', 'log_softmax', 'sigmoid', 'softmax:1'" in err
    assert "Given value: softmx" in err


# ---------------------------------------------------------------------------------------------------------------
# The old `pytorch_lightning` namespace: its Trainer and LightningModule with our callbacks
# ---------------------------------------------------------------------------------------------------------------


class OldNamespaceNet(PL.LightningModule):
    """A ``pytorch_lightning`` module with frozen linear branches: the table's share is planted small."""

    def __init__(self, table_scale: float = 0.002) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table_scale = table_scale
        self.image_head = nn.Linear(64, 3)
        self.table_head = nn.Linear(5, 3)
        self.bias = nn.Parameter(torch.zeros(3))  # the only trained parameter (lr 0): the shares stay as planted
        for parameter in (*self.image_head.parameters(), *self.table_head.parameters()):
            parameter.requires_grad_(False)

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return self.image_head(image.flatten(1)) + self.table_scale * self.table_head(table) + self.bias

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        image, table, label = batch
        return nn.functional.cross_entropy(self(image, table), label)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.bias], lr=0.0)


MODALITIES = {"image": 0, "table": 1}


def _old_fit(tmp_path: Path, callbacks: list[Any], **overrides: Any) -> tuple[PL.Trainer, OldNamespaceNet]:
    model = OldNamespaceNet()
    trainer = PL.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **{"max_epochs": 5, **overrides}))
    trainer.fit(model, loader(two_modality_dataset(48, seed=0)), loader(two_modality_dataset(32, seed=1)))
    return trainer, model


def test_pytorch_lightning_trainer_runs_the_monitor_and_stops_at_the_planted_collapse(tmp_path) -> None:
    monitor = ModalityContributionMonitor(MODALITIES, occlusion="zeros")
    stopper = CollapseEarlyStopping(min_share=0.05, patience=2)
    trainer, model = _old_fit(tmp_path, [monitor, stopper])
    assert isinstance(trainer, PL.Trainer) and not isinstance(trainer, L.Trainer)  # really the old namespace
    assert [entry["epoch"] for entry in monitor.history] == [0, 1]  # stopped after the second check
    assert stopper.collapsed_modality == "table" and stopper.stopped_epoch == 1
    offline = modality_contribution(model, loader(two_modality_dataset(32, seed=1)), MODALITIES, occlusion="zeros")
    assert offline.shares["table"] < 0.05
    assert_same_numbers(trainer.callback_metrics["mc/share/table"].item(), offline.shares["table"], "mc/share/table")
    assert_same_numbers(monitor.history[-1]["shares"], offline.shares, "history shares")


def test_pytorch_lightning_checkpoint_restores_the_callbacks_state(tmp_path) -> None:
    checkpoint = PL.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = ModalityContributionMonitor(MODALITIES, occlusion="zeros")
    _old_fit(tmp_path, [first, checkpoint], max_epochs=1, enable_checkpointing=True)
    resumed = ModalityContributionMonitor(MODALITIES, occlusion="zeros")
    trainer = PL.Trainer(callbacks=[resumed], **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(
        OldNamespaceNet(),
        loader(two_modality_dataset(48, seed=0)),
        loader(two_modality_dataset(32, seed=1)),
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
    )
    assert [entry["epoch"] for entry in resumed.history] == [0, 1]  # epoch 0 restored from the checkpoint
    assert resumed.history[0] == first.history[0]


def test_pytorch_lightning_tensorboard_logger_gets_the_dashboard(tmp_path) -> None:
    logger = PL.loggers.TensorBoardLogger(tmp_path, name="tb", version=0)
    monitor = ModalityContributionMonitor(MODALITIES, occlusion="zeros")
    _old_fit(tmp_path, [monitor], max_epochs=2, logger=logger)
    size = {event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0, event_accumulator.TENSORS: 0}
    events = event_accumulator.EventAccumulator(logger.log_dir, size_guidance=size).Reload()
    assert len(events.Scalars("mc/share/image")) == 2
    assert len(events.Images("mc/shares_stacked")) == 3  # one per check and the final one
    assert len(events.Tensors("custom_scalars__config__")) == 1
