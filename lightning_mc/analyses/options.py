"""The measurement options, each declared once: name, type, default, one-line doc and check.

:class:`MeasurementOptions` is the one declaration. :class:`~lightning_mc.ContributionMeasurement`,
:func:`~lightning_mc.functional.modality_contribution`, :func:`~lightning_mc.functional.modality_shapley` and
:class:`~lightning_mc.ModalityContributionMonitor` spell the options out as keyword arguments (what IDEs, type
checkers, Sphinx and LightningCLI's jsonargparse read), collect them with :meth:`MeasurementOptions.pick`, and get their
``Args`` documentation from :func:`document_options`; ``tests/test_options.py`` fails if a signature's name, type,
default or order differs from this declaration.

Each option is checked once, on construction, by the check declared with it; the options an analysis owns (``ci``,
``tolerance``, ``perf_metric``, ...) are checked by that analysis when the measurement builds it
(:meth:`~lightning_mc.analyses.part.Analysis.from_options`). What the engine needs is resolved once, into
:attr:`MeasurementOptions.engine`, and the engine takes that object.

Example:
    >>> options = MeasurementOptions(ci=0.95, occlusion="zeros")
    >>> options.ci, options.n_boot
    (0.95, 1000)
    >>> type(options.engine.fill).__name__
    'ZerosFill'
    >>> MeasurementOptions(max_batch_size=0)
    Traceback (most recent call last):
    ...
    ValueError: max_batch_size=0 must be a positive int or None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import field
from typing import Any

from torchmetrics import Metric

from lightning_mc.core.checks import check_int
from lightning_mc.core.encoders import EncodersSpec, resolve_encoders
from lightning_mc.core.engine import EngineSettings
from lightning_mc.core.forward import ForwardFn
from lightning_mc.core.metric import Normalization, check_normalization
from lightning_mc.core.modality import TargetSpec
from lightning_mc.core.occlusion import FillSpec, resolve_fill
from lightning_mc.core.outputs import OutputKey, OutputReader, OutputTransform

#: Default of ``max_ci_samples``: the most samples per process whose per-sample values are kept for the intervals.
DEFAULT_MAX_CI_SAMPLES = 100_000


def _about(doc: str, check: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """An option's metadata: its one-line doc and its check (``value -> None``; ``None``: an analysis checks it)."""
    return {"doc": doc, "check": check}


def _check_forward_fn(forward_fn: Any) -> None:
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(f"forward_fn={forward_fn!r} must be a callable (model, batch) -> Tensor.")


@dataclasses.dataclass(frozen=True)
class MeasurementOptions:
    """How one measurement runs and what it computes besides the shares; every option checked on construction.

    Each field is one option of :class:`~lightning_mc.ContributionMeasurement` and of the entry points that drive it
    (the docs of the fields are the ``Args`` of those signatures).

    Raises:
        ValueError: On an invalid option (the message names it, the value received and what is valid).
        TypeError: If ``forward_fn``, ``output_key``, ``occlusion``, ``perf_metric`` or ``target`` has the wrong type
            (``encoders``: when the measurement checks it against its modalities).
    """

    forward_fn: ForwardFn | None = field(
        default=None,
        metadata=_about(
            "``(model, batch) -> output``. Default: ``model(*modality_tensors)``, the modality tensors as positional "
            "arguments in the order of ``modalities``, e.g. ``model(batch['image'], batch['table'])``.",
            _check_forward_fn,
        ),
    )
    output_key: OutputKey = field(
        default=None,
        metadata=_about(
            "Where the prediction is in the model's output: a dict key, a Hugging Face ``ModelOutput`` field or an "
            "attribute, e.g. ``'logits'``, or an index into a tuple output, e.g. ``0`` (applied after "
            "``forward_fn``). ``None``: the output is the prediction tensor.",
            None,  # checked by OutputReader, built once in __post_init__
        ),
    )
    output_transform: OutputTransform = field(
        default=None,
        metadata=_about(
            "Activation applied to the outputs before they are compared: ``None`` (regression, or a model that already "
            "returns probabilities), ``'softmax'``, ``'sigmoid'`` or a callable.",
            None,  # checked by OutputReader, built once in __post_init__
        ),
    )
    occlusion: FillSpec = field(
        default="mean",
        metadata=_about(
            "Default fill of modalities that set none: ``'mean'`` (per-sample mean, the paper's image fill), "
            "``'zeros'``, ``'noise'``, ``'permute'``, a number or a callable.",
            resolve_fill,
        ),
    )
    normalization: Normalization = field(
        default="ratio_of_sums",
        metadata=_about(
            "``'ratio_of_sums'`` (Algorithm 1, default), ``'per_sample'`` or ``'per_sample_output'``.",
            check_normalization,
        ),
    )
    max_batch_size: int | None = field(
        default=None,
        metadata=_about(
            "Most rows per forward call (``None``: 4 × the batch size).",
            lambda value: check_int("max_batch_size", value, optional=True),
        ),
    )
    seed: int = field(
        default=0,
        metadata=_about(
            "Seed of the ``'noise'`` and ``'permute'`` fills and of the bootstrap (the global RNG is never touched).",
            lambda value: check_int("seed", value, minimum=0),
        ),
    )
    check_redundancy: bool = field(
        default=False,
        metadata=_about(
            "Also occlude every modality at once (``N`` more rows per batch), store ``v(all)`` in "
            "``all_occluded_raw`` and warn (once per measurement) when the one-at-a-time raw values sum to less than "
            "a quarter of it: the modalities then look redundant (use "
            ":func:`~lightning_mc.functional.modality_shapley`).",
        ),
    )
    ci: float | None = field(
        default=None,
        metadata=_about(
            "Coverage of percentile bootstrap intervals for the shares (e.g. ``0.95``; ``'ratio_of_sums'`` and "
            "``'per_sample'``), stored in ``share_low``/``share_high`` (:mod:`lightning_mc.analyses.bootstrap`). "
            "``None``: none.",
        ),
    )
    n_boot: int = field(default=1000, metadata=_about("Bootstrap replicates (with ``ci``)."))
    max_ci_samples: int = field(
        default=DEFAULT_MAX_CI_SAMPLES,
        metadata=_about(
            "Most samples per process whose per-sample values (``N × M`` float64) are kept for the intervals (with "
            "``ci``).",
        ),
    )
    shapley: bool = field(
        default=False,
        metadata=_about(
            "Also compute exact modality Shapley values and pairwise interactions (``M ≤ 6``; ``2^M − 1`` copies per "
            "batch, which include the one-at-a-time occlusions of whole modalities), stored in ``shapley`` with "
            "``all_occluded_raw`` (:mod:`lightning_mc.analyses.shapley`).",
        ),
    )
    perf_metric: Metric | None = field(
        default=None,
        metadata=_about(
            "Label-aware view: a torchmetrics metric (e.g. ``BinaryAUROC()``) on the clean outputs "
            "(``perf_clean``) and with each whole modality occluded; ``perf_drop[m]`` is ``perf_clean`` minus the "
            "latter (:mod:`lightning_mc.analyses.perf_drop`). Needs ``target``. The instance is cloned, never updated.",
        ),
    )
    target: TargetSpec | None = field(
        default=None,
        metadata=_about(
            "Where the targets (labels) of ``perf_metric`` are in each batch: a dict key, a tuple index or "
            "``batch -> Tensor``.",
        ),
    )
    tolerance: float | None = field(
        default=None,
        metadata=_about(
            "Precision asked for: batches are added in order until every share's 95% half-width is at most "
            "``tolerance`` (delta method, at least 50 samples, :mod:`lightning_mc.analyses.precision`), then the rest "
            "are skipped; the half-widths are in ``share_half_width``. ``None``: every batch counts.",
        ),
    )
    encoders: EncodersSpec | None = field(
        default=None,
        metadata=_about(
            "``modality -> submodule name(s)`` as ``model.get_submodule`` reads them (for the monitor: on the "
            "LightningModule): the encoders whose outputs are recorded on the clean pass and replayed for the copies "
            "that occlude another modality; ``'auto'`` finds them on the first batch; ``None``: every copy runs the "
            "whole model (checked against the modalities by :func:`~lightning_mc.core.encoders.resolve_encoders`).",
        ),
    )

    def __post_init__(self) -> None:
        for option in dataclasses.fields(self):
            check = option.metadata["check"]
            if check is not None:
                check(getattr(self, option.name))
        settings = EngineSettings(
            forward_fn=self.forward_fn,
            outputs=OutputReader(self.output_key, self.output_transform),
            fill=resolve_fill(self.occlusion),
            max_batch_size=self.max_batch_size,
            seed=self.seed,
            encoders=resolve_encoders(self.encoders, None),
        )
        object.__setattr__(self, "_engine", settings)

    @property
    def engine(self) -> EngineSettings:
        """The settings the engine takes (the fill, the output reader, the encoders spec), resolved on construction."""
        return self._engine  # type: ignore[attr-defined]

    @classmethod
    def pick(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The options among ``arguments`` (an entry point's ``locals()``), by name, in declaration order.

        Example:
            >>> MeasurementOptions.pick({"model": None, "seed": 3, "ci": 0.9})
            {'seed': 3, 'ci': 0.9}
        """
        return {name: arguments[name] for name in OPTION_NAMES if name in arguments}

    def arguments(self) -> dict[str, Any]:
        """``option -> value``, the keyword arguments that rebuild these options (no copies are made)."""
        return {name: getattr(self, name) for name in OPTION_NAMES}


#: The option names, in declaration order (the order of every signature that takes them).
OPTION_NAMES: tuple[str, ...] = tuple(option.name for option in dataclasses.fields(MeasurementOptions))
#: ``option -> one-line doc``.
OPTION_DOCS: dict[str, str] = {option.name: option.metadata["doc"] for option in dataclasses.fields(MeasurementOptions)}


def document_options(
    names: Iterable[str] | None = None, after: str = "modalities", docs: Mapping[str, str] | None = None
) -> Callable[[Any], Any]:
    """Decorator: add the docs of the arguments ``names`` to the ``Args:`` of a docstring.

    The entry point's own arguments stay in its docstring; the docs of the options come from their declaration
    (``docs``: default, :class:`MeasurementOptions`'s), so Sphinx, ``help()`` and jsonargparse show every argument with
    its doc.

    Args:
        names: The arguments to document, in the order of the signature; default: every one in ``docs``.
        after: The entry they follow (``"Args"``: the start of the section).
        docs: ``argument -> doc``; default: the measurement options' docs.
    """
    docs = OPTION_DOCS if docs is None else docs
    chosen = tuple(docs) if names is None else tuple(names)

    def decorate(obj: Any) -> Any:
        if obj.__doc__:
            obj.__doc__ = _with_args(obj.__doc__, [(name, docs[name]) for name in chosen], after)
        return obj

    return decorate


def _with_args(doc: str, entries: list[tuple[str, str]], after: str) -> str:
    """``doc`` with ``name: text`` entries added after the entry of ``after`` in its ``Args:`` section."""
    lines = doc.split("\n")
    start = next(index for index, line in enumerate(lines) if line.strip().startswith(f"{after}:"))
    indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())] + ("    " if after == "Args" else "")
    end = start + 1
    while end < len(lines) and lines[end].startswith(indent + " "):  # the entry's continuation lines
        end += 1
    added = [f"{indent}{name}: {text}" for name, text in entries]
    return "\n".join(lines[:end] + added + lines[end:])


__all__ = ["DEFAULT_MAX_CI_SAMPLES", "OPTION_NAMES", "MeasurementOptions", "document_options"]
