"""Each measurement option is declared once; every public signature that takes it agrees with the declaration.

The declaration (:class:`~lightning_mc.analyses.options.MeasurementOptions`) holds the name, type, default, doc and
check of each option. The entry points spell the options out as keyword arguments (for IDEs, Sphinx and
LightningCLI), so these tests are what keeps them from drifting: a new option, a changed default or a reordered
signature fails here until every entry point agrees.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_mc import ContributionMeasurement, ModalityContribution, ModalityContributionMonitor
from lightning_mc.analyses.options import OPTION_NAMES, MeasurementOptions
from lightning_mc.callbacks.monitor_keys import MONITOR_DOCS
from lightning_mc.callbacks.validation_batches import SCHEDULE_DOCS, CheckSchedule
from lightning_mc.core.engine import EngineSettings, OcclusionEngine
from lightning_mc.core.outputs import OutputReader
from lightning_mc.functional import SHAPLEY_OPTIONS, modality_contribution, modality_shapley

FIELDS = {field.name: field for field in dataclasses.fields(MeasurementOptions)}
#: The options MeasurementOptions checks itself (the analyses check the others when a measurement builds them).
CHECKED_ON_DECLARATION = {name for name, field in FIELDS.items() if field.metadata["check"] is not None}
CHECKED_ON_DECLARATION |= {"output_key", "output_transform", "encoders"}  # by the reader and the encoders' resolution
#: entry point -> (its callable whose signature users see, the options it takes)
ENTRY_POINTS: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "ContributionMeasurement": (ContributionMeasurement.__init__, OPTION_NAMES),
    "modality_contribution": (modality_contribution, OPTION_NAMES),
    "modality_shapley": (modality_shapley, SHAPLEY_OPTIONS),
    "ModalityContributionMonitor": (ModalityContributionMonitor.__init__, OPTION_NAMES),
}
DOCUMENTED = {
    "ContributionMeasurement": ContributionMeasurement,
    "modality_contribution": modality_contribution,
    "modality_shapley": modality_shapley,
    "ModalityContributionMonitor": ModalityContributionMonitor,
}


def _options_in(function: Callable[..., Any]) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(function).parameters.values() if p.name in FIELDS]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_signature_has_each_option_with_the_declared_type_default_and_order(entry: str) -> None:
    function, names = ENTRY_POINTS[entry]
    parameters = _options_in(function)
    assert [p.name for p in parameters] == list(names)
    for parameter in parameters:
        field = FIELDS[parameter.name]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, parameter.name
        assert parameter.annotation == field.type, parameter.name
        assert parameter.default == field.default, parameter.name


@pytest.mark.parametrize("entry", list(DOCUMENTED))
def test_every_argument_of_an_entry_point_is_documented_once(entry: str) -> None:
    documented = DOCUMENTED[entry]
    doc = inspect.getdoc(documented) or ""
    function = ENTRY_POINTS[entry][0]
    arguments = [name for name in inspect.signature(function).parameters if name != "self"]
    for name in arguments:
        assert doc.count(f"\n    {name}: ") == 1, f"{entry}: {name} documented {doc.count(f'    {name}: ')} times"
    for name in ENTRY_POINTS[entry][1]:
        assert f"    {name}: {FIELDS[name].metadata['doc']}" in doc


def test_the_monitor_takes_the_schedule_arguments_with_the_schedule_defaults() -> None:
    monitor = inspect.signature(ModalityContributionMonitor.__init__).parameters
    schedule = inspect.signature(CheckSchedule.__init__).parameters
    assert list(SCHEDULE_DOCS) == [name for name in schedule if name != "self"]
    for name in SCHEDULE_DOCS:
        assert (monitor[name].annotation, monitor[name].default) == (schedule[name].annotation, schedule[name].default)
    assert set(MONITOR_DOCS) <= set(monitor)


def test_a_call_written_before_the_declaration_still_configures_the_same_options() -> None:
    monitor = ModalityContributionMonitor({"image": 0, "table": 1}, output_transform="softmax", ci=0.95)
    assert monitor.measurement.options == MeasurementOptions(output_transform="softmax", ci=0.95)
    assert monitor.measurement.options.ci == 0.95 and monitor.measurement.options.n_boot == 1000
    assert monitor.engine.outputs.output_transform == "softmax"


def test_below_the_public_signatures_no_option_has_a_default() -> None:
    for function in (EngineSettings, OcclusionEngine.__init__, OutputReader.__init__):
        parameters = inspect.signature(function).parameters.values()
        assert all(p.default is inspect.Parameter.empty for p in parameters), function
    # the metric is public too: its one option agrees with the declaration
    normalization = inspect.signature(ModalityContribution.__init__).parameters["normalization"]
    assert (normalization.annotation, normalization.default) == (FIELDS["normalization"].type, "ratio_of_sums")
    assert FIELDS["normalization"].default == "ratio_of_sums"


def test_occlusion_is_resolved_once_on_its_way_from_the_monitor_to_the_fill() -> None:
    monitor = ModalityContributionMonitor({"image": 0, "table": 1}, occlusion=0.5)
    settings = monitor.measurement.options.engine
    assert monitor.engine.settings is settings
    assert monitor.engine.fills == (settings.fill, settings.fill)
    assert all(fill is settings.fill for fill in monitor.engine.fills)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"n_boot": 0}, ValueError, "n_boot=0 must be a positive int."),
        ({"max_batch_size": 0}, ValueError, "max_batch_size=0 must be a positive int or None."),
        ({"ci": 95}, ValueError, "ci=95 must be None or a coverage in (0, 1), e.g. 0.95."),
        ({"tolerance": 2}, ValueError, "tolerance=2 must be None or a half-width in (0, 1), e.g. 0.02."),
        ({"normalization": "sum"}, ValueError, "normalization='sum' is not one of"),
        ({"output_key": ""}, TypeError, "output_key='' must be None, the non-empty name of the prediction"),
        ({"forward_fn": 3}, TypeError, "forward_fn=3 must be a callable (model, batch) -> Tensor."),
        ({"target": 1}, ValueError, "perf_metric and target go together"),
        ({"encoders": []}, TypeError, "encoders=[] must be None, 'auto' or a non-empty mapping"),
        ({"encoders": {"image": ""}}, ValueError, "encoders['image']='' must be a submodule name"),
        ({"encoders": {"image": ["a", 2]}}, TypeError, "encoders['image']=['a', 2] must be a submodule name"),
        ({"encoders": {"text": "t"}}, ValueError, "encoders names modality 'text'; the modalities are"),
    ],
)
def test_an_invalid_option_is_refused_by_every_entry_point_with_the_same_message(options, error, message) -> None:
    # the declaration checks the options the engine takes; the analyses check theirs, the engine the modalities
    checked_by_the_declaration = set(options) <= CHECKED_ON_DECLARATION and "modalities" not in message
    builds = [lambda: MeasurementOptions(**options)] if checked_by_the_declaration else []
    for build in (
        *builds,
        lambda: ContributionMeasurement({"image": 0, "table": 1}, **options),
        lambda: ModalityContributionMonitor({"image": 0, "table": 1}, **options),
        lambda: modality_contribution(nn.Identity(), [], {"image": 0, "table": 1}, **options),
    ):
        with pytest.raises(error) as raised:
            build()
        assert message in str(raised.value)


def test_encoders_reach_the_engine_and_the_monitor_exposes_them_as_tuples_of_names() -> None:
    monitor = ModalityContributionMonitor({"image": 0, "table": 1}, encoders={"image": "image_branch"})
    assert monitor.measurement.options.encoders == {"image": "image_branch"}
    assert monitor.encoders == monitor.found_encoders == {"image": ("image_branch",)}
    assert ModalityContributionMonitor({"image": 0, "table": 1}, encoders="auto").encoders == "auto"
    options = inspect.signature(modality_shapley).parameters["encoders"]
    assert options.default is None and "encoders" in SHAPLEY_OPTIONS


def test_modality_shapley_refuses_more_than_six_modalities_before_reading_data() -> None:
    modalities = {f"m{index}": index for index in range(7)}
    with pytest.raises(ValueError, match="Exact modality Shapley values need 1 to 6 modalities"):
        modality_shapley(nn.Identity(), [(torch.zeros(1),) * 7], modalities)
