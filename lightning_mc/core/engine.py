"""Builds the occluded copies of a batch and runs them through the model in as few forward calls as allowed.

For a batch of ``N`` samples and ``H`` attributes over all modalities the engine needs ``(1 + H) · N`` rows of
model input: the clean batch and one copy per attribute. It lays these rows out as one virtual batch (clean copy
first, then each modality's attributes in order), cuts it into chunks of at most ``max_batch_size`` rows and runs
each chunk in one forward call. Nothing here knows about Lightning.

Example:
    >>> import torch
    >>> from lightning_mc.core.modality import resolve_modalities
    >>> model = torch.nn.Bilinear(3, 2, 4)
    >>> engine = OcclusionEngine(resolve_modalities({"a": 0, "b": 1}), occlusion="zeros")
    >>> outputs = engine.run(model, (torch.randn(5, 3), torch.randn(5, 2)))
    >>> outputs.clean.shape, outputs.occluded["a"].shape
    (torch.Size([5, 4]), torch.Size([5, 1, 4]))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torchmetrics.utilities import rank_zero_warn

from lightning_mc.core.modality import Batch, Modality
from lightning_mc.core.occlusion import (
    AttributeMasks,
    Fill,
    FillSpec,
    WholeModality,
    occlude,
    plain_tensor,
    resolve_fill,
    rows_like,
)
from lightning_mc.core.outputs import OutputTransform, check_output_key, resolve_output_transform, select_prediction

ForwardFn = Callable[[nn.Module, Batch], Any]

#: With ``max_batch_size=None``, one forward call takes this many batch-sized copies at most.
DEFAULT_COPIES_PER_CALL = 4
#: Mixed into the user's seed so the fills' random stream never equals data drawn with the same seed.
_SEED_SALT = 0x6C6D63


class GivenCleanError(ValueError):
    """The clean prediction handed to :meth:`OcclusionEngine.run` does not fit the batch or the model's outputs."""


@dataclass(frozen=True)
class OccludedOutputs:
    """Model outputs of one batch, clean and under each occlusion.

    Attributes:
        clean: ``(N, C)``, after the output transform, outputs flattened per sample.
        occluded: ``name -> (N, h_i, C)``: outputs with attribute ``l`` of modality ``name`` occluded.
        attribute_names: ``name -> h_i`` attribute names.
    """

    clean: Tensor
    occluded: dict[str, Tensor]
    attribute_names: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class _Piece:
    """Rows ``start:stop`` of copy ``copy`` (0 = clean, then one per attribute) of the virtual batch."""

    copy: int
    start: int
    stop: int


def plan_chunks(num_copies: int, batch_size: int, max_rows: int) -> list[list[_Piece]]:
    """Split ``num_copies`` copies of ``batch_size`` rows into chunks of at most ``max_rows`` rows.

    Example:
        >>> [[(p.copy, p.start, p.stop) for p in chunk] for chunk in plan_chunks(3, 2, 4)]
        [[(0, 0, 2), (1, 0, 2)], [(2, 0, 2)]]
    """
    chunks: list[list[_Piece]] = [[]]
    room = max_rows
    for copy in range(num_copies):
        start = 0
        while start < batch_size:
            if room == 0:
                chunks.append([])
                room = max_rows
            stop = min(batch_size, start + room)
            chunks[-1].append(_Piece(copy, start, stop))
            room -= stop - start
            start = stop
    return chunks


def default_forward(modalities: Sequence[Modality]) -> ForwardFn:
    """The default ``forward_fn``: the model called with the modality tensors as positional arguments, in order.

    For ``modalities={"image": "x_img", "table": "x_tab"}`` this is ``model(batch["x_img"], batch["x_tab"])``.
    """
    return _PositionalForward(tuple(modalities))


class _PositionalForward:
    """``model(*modality_tensors)``; a class, not a closure, so monitors pickle (``ddp_spawn`` sends callbacks)."""

    def __init__(self, modalities: tuple[Modality, ...]) -> None:
        self.modalities = modalities

    def __call__(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(*(modality.select(batch) for modality in self.modalities))


class OcclusionEngine:
    """Runs a model on a batch and on its occluded copies, batched.

    Args:
        modalities: The resolved modalities.
        forward_fn: ``(model, batch) -> output``; default :func:`default_forward`.
        output_key: Where the prediction is in the output (a dict key, ``ModelOutput`` field or attribute, e.g.
            ``"logits"``); ``None``: the output is the prediction tensor. Applied after ``forward_fn``.
        output_transform: Output activation applied before differences are taken: ``None``, ``"softmax"``
            (over the last dimension), ``"sigmoid"`` or a callable.
        occlusion: Default fill for modalities that do not set their own.
        max_batch_size: Most rows per forward call. ``None``: ``4 ×`` the incoming batch size, so a call holds the
            clean batch and up to three occluded copies.
        seed: Seed of the engine's own random generator (used by ``"noise"`` and ``"permute"``); the global RNG is
            never touched.
        encoders: ``modality -> submodule name(s)`` of the model (as ``model.get_submodule`` reads them) whose
            outputs are recorded on the clean pass and replayed for the copies that occlude another modality.

    Raises:
        ValueError: On an invalid ``max_batch_size`` or ``output_transform``.
    """

    def __init__(
        self,
        modalities: Sequence[Modality],
        forward_fn: ForwardFn | None = None,
        output_transform: OutputTransform = None,
        occlusion: FillSpec = "mean",
        max_batch_size: int | None = None,
        seed: int = 0,
        output_key: str | None = None,
        encoders: Mapping[str, str | Sequence[str]] | None = None,
    ) -> None:
        if max_batch_size is not None and (
            isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1
        ):
            raise ValueError(f"max_batch_size={max_batch_size!r} must be a positive int or None.")
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"forward_fn={forward_fn!r} must be a callable (model, batch) -> Tensor.")
        check_output_key(output_key)
        self.output_key = output_key
        self.encoders = encoders
        self.modalities = tuple(modalities)
        self.forward_fn = forward_fn if forward_fn is not None else default_forward(self.modalities)
        self.output_transform = output_transform
        self._transform = resolve_output_transform(output_transform)
        default_fill = resolve_fill(occlusion)
        self.fills = tuple(m.fill if m.fill is not None else default_fill for m in self.modalities)
        self.max_batch_size = max_batch_size
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._warned_single_output_softmax = False
        #: Model input rows run so far (clean and occluded copies), for progress reports.
        self.rows_forwarded = 0

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed + _SEED_SALT)
        return self._generators[device]

    def run(self, model: nn.Module, batch: Batch, clean: Tensor | None = None) -> OccludedOutputs:
        """Return the outputs of ``model`` on ``batch`` and on every occluded copy.

        The model runs in eval mode under :func:`torch.inference_mode`; its previous mode is restored. ``batch`` is
        never modified.

        Args:
            model: The model.
            batch: The batch.
            clean: The model's prediction on ``batch`` if it was already computed (e.g. by the validation step), as
                ``forward_fn`` and ``output_key`` would give it, before the output transform: then only the occluded
                copies are run. ``None``: the clean batch runs too.

        Raises:
            TypeError: If the model output is not a tensor.
            ValueError: If the outputs have a different shape in the occluded passes or a wrong batch dimension.
        """
        originals, values, batch_size = self._modality_values(batch)
        with _evaluating(model), torch.inference_mode():
            return self._run(model, batch, originals, values, batch_size, clean)

    def _run(
        self,
        model: nn.Module,
        batch: Batch,
        originals: list[Tensor],
        values: list[Tensor],
        batch_size: int,
        clean: Tensor | None = None,
    ) -> OccludedOutputs:
        masks = [_attribute_masks(modality, value, batch) for modality, value in zip(self.modalities, values)]
        for modality, attribute_masks in zip(self.modalities, masks):
            if not isinstance(attribute_masks, AttributeMasks):
                raise TypeError(
                    f"Modality {modality.name!r}: attributes returned {type(attribute_masks).__name__}, expected "
                    "lightning_mc.masks.AttributeMasks."
                )
        fills = [
            self._fill(modality, fill, value) for modality, fill, value in zip(self.modalities, self.fills, values)
        ]
        # copy c > 0 is attribute `attribute` of modality `owner`
        copies: list[tuple[int, int]] = [(-1, -1)] + [
            (owner, attribute) for owner, m in enumerate(masks) for attribute in range(m.masks.shape[0])
        ]

        def part(owner: int, copy: int, rows: slice) -> Tensor:
            copy_owner, attribute = copies[copy]
            if copy_owner != owner:
                return _take(values[owner], rows, batch_size)
            if masks[owner].whole:
                return _take(fills[owner], rows, batch_size)
            return occlude(values[owner][rows], fills[owner][rows], _rows_of(masks[owner].masks[attribute], rows))

        def copy_name(copy: int) -> str | None:
            return None if copy == 0 else self._copy_name(*copies[copy], masks)

        if clean is None:
            flat = self._run_copies(model, batch, originals, batch_size, len(copies), part, copy_name)
            clean_rows, occluded_flat = flat[0], flat[1:]
        else:  # copy 0 is given: run copies 1, 2, ... only
            occluded_flat = self._run_copies(
                model,
                batch,
                originals,
                batch_size,
                len(copies) - 1,
                lambda owner, copy, rows: part(owner, copy + 1, rows),
                lambda copy: copy_name(copy + 1),
            )
            clean_rows = self.given_clean(clean, occluded_flat.shape[-1], batch_size)
        occluded, start = {}, 0
        for modality, attribute_masks in zip(self.modalities, masks):
            count = attribute_masks.masks.shape[0]
            occluded[modality.name] = occluded_flat[start : start + count].transpose(0, 1)
            start += count
        return OccludedOutputs(
            clean=clean_rows,
            occluded=occluded,
            attribute_names={m.name: a.names for m, a in zip(self.modalities, masks)},
        )

    def run_coalitions(
        self, model: nn.Module, batch: Batch, coalitions: Sequence[frozenset[int]], include_clean: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        """Return the outputs of ``model`` on ``batch`` and on one copy per coalition of whole modalities occluded.

        Copy 0 is the clean batch, copy ``k + 1`` has every modality whose index (in ``self.modalities``) is in
        ``coalitions[k]`` replaced by its fill at once (the whole modality; attributes are ignored). The copies are
        laid out and cut into forward calls exactly as in :meth:`run`. The model runs in eval mode under
        :func:`torch.inference_mode`; its previous mode is restored. With ``include_clean=False`` the clean copy is
        left out (when the caller already has the clean outputs from :meth:`run`) and ``clean`` is ``None``.

        Returns:
            ``(clean, occluded)``: ``(N, C)`` and ``(N, len(coalitions), C)``, after the output transform.

        Raises:
            ValueError: On a coalition naming no known modality index, or mismatched batch dimensions.
        """
        coalitions = [frozenset(coalition) for coalition in coalitions]
        for coalition in coalitions:
            if not coalition or not coalition <= frozenset(range(len(self.modalities))):
                raise ValueError(
                    f"Coalition {sorted(coalition)} must be a non-empty set of modality indices in "
                    f"range({len(self.modalities)})."
                )
        originals, values, batch_size = self._modality_values(batch)
        with _evaluating(model), torch.inference_mode():
            return self._run_coalitions(model, batch, originals, values, batch_size, coalitions, include_clean)

    def _modality_values(self, batch: Batch) -> tuple[list[Tensor], list[Tensor], int]:
        """Each modality's tensor in ``batch``, as it is and as a plain view, and the common batch size.

        The engine's rows, fills and masks are computed on the plain views, never through a tensor subclass
        (MetaTensor); :func:`~lightning_mc.core.occlusion.rows_like` gives the model rows of the batch's own class.

        Raises:
            ValueError: If the modalities have different numbers of samples.
        """
        originals = [modality.select(batch) for modality in self.modalities]
        batch_size = originals[0].shape[0]
        for modality, value in zip(self.modalities, originals):
            if value.shape[0] != batch_size:
                raise ValueError(
                    f"Modality {modality.name!r} has {value.shape[0]} samples but {self.modalities[0].name!r} has "
                    f"{batch_size}; every modality needs the samples along dimension 0."
                )
        return originals, [plain_tensor(value) for value in originals], batch_size

    def _run_coalitions(
        self,
        model: nn.Module,
        batch: Batch,
        originals: list[Tensor],
        values: list[Tensor],
        batch_size: int,
        coalitions: list[frozenset[int]],
        include_clean: bool,
    ) -> tuple[Tensor | None, Tensor]:
        fills = [
            self._fill(modality, fill, value) for modality, fill, value in zip(self.modalities, self.fills, values)
        ]
        copies: list[frozenset[int]] = [frozenset(), *coalitions] if include_clean else coalitions

        def part(owner: int, copy: int, rows: slice) -> Tensor:
            return _take(fills[owner] if owner in copies[copy] else values[owner], rows, batch_size)

        def copy_name(copy: int) -> str | None:
            return "+".join(self.modalities[i].name for i in sorted(copies[copy])) if copies[copy] else None

        flat = self._run_copies(model, batch, originals, batch_size, len(copies), part, copy_name)
        if not include_clean:
            return None, flat.transpose(0, 1)
        return flat[0], flat[1:].transpose(0, 1)

    def _run_copies(
        self,
        model: nn.Module,
        batch: Batch,
        originals: list[Tensor],
        batch_size: int,
        num_copies: int,
        part: Callable[[int, int, slice], Tensor],
        copy_name: Callable[[int], str | None],
    ) -> Tensor:
        """Run ``num_copies`` copies of ``batch`` laid out as one virtual batch, at most ``max_batch_size`` rows a call.

        Args:
            model: The model (already in eval mode, under inference mode).
            batch: The user's batch; its non-modality tensors are cut along with the copies.
            originals: Each modality's tensor in ``batch``, of the batch's own (sub)class.
            batch_size: ``N``.
            num_copies: Copies in the virtual batch (the clean one included, if any).
            part: ``(owner, copy, rows) -> Tensor``, rows ``rows`` of modality ``owner`` in copy ``copy``.
            copy_name: What copy ``copy`` occludes, for error messages; ``None`` for the clean copy.

        Returns:
            The transformed outputs, ``(num_copies, N, C)``.
        """
        max_rows = self.max_batch_size or DEFAULT_COPIES_PER_CALL * batch_size
        outputs, labels = [], []
        for chunk in plan_chunks(num_copies, batch_size, max_rows):
            # the modality tensors are replaced below: only the other tensors of the batch are cut here
            chunk_batch = apply_to_collection(
                batch, Tensor, _concat_rows, pieces=chunk, batch_size=batch_size, skip={id(o) for o in originals}
            )
            ranges = [(piece.start, piece.stop) for piece in chunk]
            for owner, modality in enumerate(self.modalities):
                parts = [part(owner, piece.copy, slice(piece.start, piece.stop)) for piece in chunk]
                chunk_batch = modality.replace(chunk_batch, rows_like(originals[owner], torch.cat(parts), ranges))
            rows = sum(piece.stop - piece.start for piece in chunk)
            copy_names = [copy_name(piece.copy) for piece in chunk]
            holds_clean = None in copy_names
            names = list(dict.fromkeys(name for name in copy_names if name is not None))
            labels.append(_call_label(holds_clean, names))
            outputs.append(
                self._forward(model, chunk_batch, rows, occluded=names, holds_clean=holds_clean, batch_size=batch_size)
            )
        self._check_output_shapes(outputs, labels)
        return torch.cat(outputs).reshape(num_copies, batch_size, -1)

    def given_clean(self, clean: Tensor, num_outputs: int, batch_size: int) -> Tensor:
        """A clean prediction computed elsewhere, transformed as the engine's own: ``(batch_size, num_outputs)``.

        Raises:
            GivenCleanError: If ``clean`` is not a tensor, has another batch size, or another number of outputs than
                the occluded passes.
        """
        try:
            rows = self.transform_outputs(clean, batch_size)
        except (TypeError, ValueError) as err:
            raise GivenCleanError(f"The clean outputs given for this batch are wrong: {err}") from None
        if rows.shape[1] != num_outputs:
            raise GivenCleanError(
                f"The clean outputs given for this batch have shape {tuple(clean.shape)}: {rows.shape[1]} outputs per "
                f"sample, but the model gives {num_outputs} on the occluded copies; they must be the model's "
                "prediction on this batch (what forward_fn and output_key return), before the output transform."
            )
        return rows

    def _fill(self, modality: Modality, fill: Fill, value: Tensor) -> Tensor:
        try:
            return fill(value, self._generator(value.device))
        except (TypeError, ValueError) as err:
            raise type(err)(f"Modality {modality.name!r}: {err}") from None

    def _copy_name(self, owner: int, attribute: int, masks: list[AttributeMasks]) -> str:
        names = masks[owner].names
        name = self.modalities[owner].name
        return name if len(names) == 1 else f"{name}/{names[attribute]}"

    def _forward(
        self,
        model: nn.Module,
        batch: Batch,
        rows: int,
        occluded: Sequence[str] = (),
        holds_clean: bool = True,
        batch_size: int | None = None,
    ) -> Tensor:
        self.rows_forwarded += rows
        try:
            output = self.forward_fn(model, batch)
        except Exception as err:
            what = f"while occluding modality {', '.join(map(repr, occluded))}" if occluded else "on the clean batch"
            raise RuntimeError(
                f"The model's forward call raised {type(err).__name__} {what} (one call of {rows} stacked rows: "
                f"{_call_label(holds_clean, occluded)}): {err}\n"
                "Reproduce it on this batch, one occluded copy per call, with the functional API: "
                "lightning_mc.functional.modality_contribution(model, [batch], modalities, forward_fn=forward_fn, "
                f"occlusion=occlusion, max_batch_size={batch_size or rows}), with the same modalities, forward_fn "
                "and occlusion as here."
            ) from err
        return self.transform_outputs(select_prediction(output, self.output_key), rows)

    def transform_outputs(self, output: object, rows: int) -> Tensor:
        """Check one prediction of ``rows`` samples, flatten it per sample and apply the output transform.

        Raises:
            TypeError: If ``output`` is not a tensor.
            ValueError: If ``output`` does not hold ``rows`` samples along dimension 0.
        """
        if not isinstance(output, Tensor):
            where = "The model returned" if self.output_key is None else f"output_key={self.output_key!r} selected"
            raise TypeError(
                f"{where} a {type(output).__name__}, not a tensor. Name the prediction tensor with output_key (e.g. "
                "output_key='logits' for a dict or a Hugging Face ModelOutput) or pass a forward_fn that returns it."
            )
        if output.ndim == 0 or output.shape[0] != rows:
            raise ValueError(
                f"The model output has shape {tuple(output.shape)} for an input of {rows} samples; expected the "
                "samples along dimension 0. Use `forward_fn` to return per-sample outputs."
            )
        output = plain_tensor(output).reshape(rows, -1)  # a MetaTensor output would slice by sample metadata
        if self.output_transform == "softmax" and output.shape[1] == 1 and not self._warned_single_output_softmax:
            self._warned_single_output_softmax = True
            rank_zero_warn(
                "output_transform='softmax' on a model with 1 output: the softmax of one logit is always 1, so every "
                "share will be NaN. Use output_transform='sigmoid' for a binary model with a single logit.",
                UserWarning,
            )
        transformed = self._transform(output)
        if not isinstance(transformed, Tensor) or transformed.shape[0] != rows:
            raise ValueError(
                f"output_transform returned {getattr(transformed, 'shape', type(transformed).__name__)} for "
                f"{rows} samples; it must return a tensor with the samples along dimension 0."
            )
        return transformed.reshape(rows, -1)

    @staticmethod
    def _check_output_shapes(outputs: list[Tensor], labels: list[str]) -> None:
        """Raise if the forward calls gave different numbers of outputs per sample, naming the first that differs."""
        first_width = outputs[0].shape[1]
        for output, label in zip(outputs, labels):
            if output.shape[1] != first_width:
                raise ValueError(
                    f"The model returned {sorted({o.shape[1] for o in outputs})} outputs per sample in different "
                    f"passes: {first_width} in the call holding {labels[0]} but {output.shape[1]} in the call holding "
                    f"{label}. The occluded passes must give outputs of the same shape as the clean pass."
                )


def _call_label(holds_clean: bool, occluded: Sequence[str]) -> str:
    """What one forward call holds, for error messages: ``the clean batch, 'b' occluded``."""
    return ", ".join((["the clean batch"] if holds_clean else []) + [f"{name!r} occluded" for name in occluded])


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and give each submodule its own mode back afterwards.

    A model already in eval mode (the monitor's case, inside validation) is left alone: no second module-tree walk.
    A user's frozen submodule that was in eval mode inside a training model stays in eval mode.
    """
    modes = [module.training for module in model.modules()]
    needs_eval = any(modes)
    if needs_eval:
        model.eval()
    try:
        yield
    finally:
        if needs_eval:
            for module, training in zip(model.modules(), modes):
                module.training = training


def _attribute_masks(modality: Modality, value: Tensor, batch: Batch) -> AttributeMasks:
    """The modality's attribute masks; builders with ``reads_batch`` (a padding mask in the batch) get the batch too."""
    if modality.attributes is None:  # the whole modality: the same single mask every batch
        return _whole_modality_masks(value.ndim, value.device)
    builder = modality.attribute_masks
    return builder(value, batch=batch) if getattr(builder, "reads_batch", False) else builder(value)


@functools.cache
def _whole_modality_masks(ndim: int, device: torch.device) -> AttributeMasks:
    """One all-true mask for a modality of ``ndim`` dimensions (built once: the engine only reads its count)."""
    return WholeModality()(torch.empty((0,) * ndim, device=device))


def _take(tensor: Tensor, rows: slice, batch_size: int) -> Tensor:
    """``tensor[rows]``; the tensor itself when ``rows`` are all of its ``batch_size`` rows (no view op per copy)."""
    return tensor if rows.start == 0 and rows.stop == batch_size else tensor[rows]


def _rows_of(mask: Tensor, rows: slice) -> Tensor:
    """The rows of a per-sample mask (``(N, ...)``); masks shared by all samples (``(1, ...)``) pass unchanged."""
    return mask if mask.shape[0] == 1 else mask[rows]


def _concat_rows(
    tensor: Tensor, pieces: list[_Piece], batch_size: int, skip: frozenset[int] | set[int] = frozenset()
) -> Tensor:
    """Rows of a batch tensor for one chunk; tensors without the batch dimension or in ``skip`` (ids) pass unchanged."""
    if id(tensor) in skip or tensor.ndim == 0 or tensor.shape[0] != batch_size:
        return tensor
    rows = torch.cat([plain_tensor(tensor)[piece.start : piece.stop] for piece in pieces])
    return rows_like(tensor, rows, [(piece.start, piece.stop) for piece in pieces])
