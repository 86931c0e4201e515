"""Export a trained model to ONNX or a ``torch.export`` program (.pt2) for inference elsewhere.

The exported graph is the pure ``apply`` in eval mode (``train=False``) with the checkpoint's
normalisation inside, so a consumer needs no knowledge of this library::

    x float32 RGB [N, 3, H, W] in [0, 1] --(x - mean) / std--> model --> logits float32 [N, C, H, W]

The weights are registered on an ``nn.Module`` (:class:`ExportModule`): parameters as parameters,
batch-norm statistics and the normalisation constants as buffers, so an ONNX file holds them as
initializers and a .pt2 file in its state dict. N is always dynamic; H and W are dynamic multiples
of the model's stride where the model allows it, else fixed at the training size:

    model        batch    H, W                         why
    segnet       dynamic  dynamic, multiple of stride
    segnet_dsc   dynamic  dynamic, multiple of stride
    unet         dynamic  dynamic, multiple of stride
    segformer    dynamic  dynamic, multiple of stride
    vit          dynamic  static (training size)       the position embedding is learned for one
                                                       grid and resampled only when the grid differs:
                                                       a branch on the input size that a graph with
                                                       symbolic H, W cannot hold
    lifted       dynamic  tried dynamic, else static   (torchvision modules; see EXPORT_NOTES)

:func:`export_model` tries dynamic H, W first and falls back to the static training size when
tracing refuses it, saying why in words in ``ExportResult.note`` (``fseg export`` prints it); e.g.
a model trained at ``--size`` equal to its stride has a 1 x 1 coarsest feature map, and
``torch.export`` fixes every dimension of size 1.

The output path is checked before anything is loaded or traced (:func:`check_target`): a folder
at ``out``, a file in the way of its folder, or a folder that cannot be written is one line
naming ``out``, not an internal temporary file's name after the whole export has run.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .core.files import write_atomic
from .core.tree import flatten_with_names, unflatten_names
from .data.preprocess import Preprocess
from .data.sizes import size_hw, size_text

__all__ = ["FORMATS", "ExportModule", "ExportResult", "ExportError", "export_model", "export_checkpoint",
           "to_pt2_bytes", "to_onnx_bytes", "check_target"]

FORMATS = ("onnx", "pt2")
# H and W may go up to this many multiples of the stride in a dynamic export (a bound keeps the
# shape constraints finite; 4096 px at stride 16 is 256 blocks).
MAX_BLOCKS = 512
MAX_BATCH = 4096


class ExportError(ValueError):
    """The model cannot be exported as asked; the message says why and what to do."""


class _Tree(torch.nn.Module):
    """An empty module to hang a nested dict of tensors on (names as in the checkpoint)."""


def _register(root: torch.nn.Module, flat: dict[str, torch.Tensor], *, as_parameters: bool) -> None:
    for name, tensor in flat.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, _Tree())
            module = getattr(module, part)
        tensor = tensor.detach().clone()
        if as_parameters and tensor.is_floating_point():
            module.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            module.register_buffer(leaf, tensor)


def _collect(root: torch.nn.Module, names: list[str]) -> dict:
    flat = {}
    for name in names:
        obj = root
        for part in name.split("."):
            obj = getattr(obj, part)
        flat[name] = obj
    return unflatten_names(flat)


class ExportModule(torch.nn.Module):
    """The pure model in eval mode as an ``nn.Module``: RGB in [0, 1] -> logits.

    forward(x float32 [N, 3, H, W] in [0, 1]) -> logits float32 [N, C, H, W]. Params live under
    ``params.``, model state under ``state.``, the normalisation under ``mean`` / ``std`` [1, 3, 1, 1].
    """

    def __init__(self, model, params: dict, state: dict, preprocess: Preprocess):
        super().__init__()
        self.model = model
        flat_params, flat_state = flatten_with_names(params), flatten_with_names(state)
        self._param_names, self._state_names = list(flat_params), list(flat_state)
        self.params, self.state = _Tree(), _Tree()
        _register(self.params, flat_params, as_parameters=True)
        _register(self.state, flat_state, as_parameters=False)
        self.register_buffer("mean", torch.tensor(preprocess.mean, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std, dtype=torch.float32).reshape(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.model.check_input(x)  # a wrong channel count is named before the normalisation trips on it
        params = _collect(self.params, self._param_names)
        state = _collect(self.state, self._state_names)
        logits, _ = self.model.apply(params, state, (x - self.mean) / self.std, train=False)
        return logits


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    dynamic_hw: bool
    example_size: int | tuple[int, int]  # S (square) or (H, W), as ``Preprocess.size`` records it
    note: str = ""


def _example(model, size: int | tuple[int, int], batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, model.in_channels, *size_hw(size), generator=torch.Generator().manual_seed(0))


def _dynamic_shapes(model, dynamic_hw: bool):
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if not dynamic_hw:
        return ({0: batch},)
    h_blocks = torch.export.Dim("h_blocks", min=1, max=MAX_BLOCKS)
    w_blocks = torch.export.Dim("w_blocks", min=1, max=MAX_BLOCKS)
    return ({0: batch, 2: model.stride * h_blocks, 3: model.stride * w_blocks},)


def _trace(module: ExportModule, size: int | tuple[int, int], dynamic_hw: bool) -> torch.export.ExportedProgram:
    x = _example(module.model, size)
    with torch.no_grad():
        return torch.export.export(module, (x,), dynamic_shapes=_dynamic_shapes(module.model, dynamic_hw),
                                   strict=False)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def _in_words(err: BaseException, model, size: int | tuple[int, int]) -> str:
    """Why H, W could not stay symbolic, in words (torch's own text is a constraint dump)."""
    text = str(err)
    cells = min(size_hw(size)) // model.stride
    if "Constraints violated" in text or "specializ" in text.lower():
        if cells == 1:
            return (f"at the training size {size_text(size)} px the model's coarsest feature map is 1 x 1 (stride "
                    f"{model.stride}), and torch.export fixes every dimension of size 1; a model trained at --size "
                    f"{2 * model.stride} or more exports with dynamic H, W")
        return "tracing fixed H and W to the example's size (the model computes with them as plain numbers)"
    if "Guard failed" in text or isinstance(err, AssertionError):
        return "the traced graph holds only at its example size (the model branches on the input size)"
    return f"tracing with symbolic H, W failed ({_first_line(err)})"


def _probe(program: torch.export.ExportedProgram, model, size: int | tuple[int, int]) -> None:
    """Run the program at another H and W: a graph that guards on its example size fails here.

    ``torch.export`` accepts a branch on the input size (ViT's "is this the trained grid?") by
    adding a runtime assertion, so a dynamic export is only trusted after one call off its example.
    """
    s = model.stride
    h, w = size_hw(size)
    x = torch.zeros(1, model.in_channels, h + s, w + 2 * s)
    with torch.no_grad():
        program.module()(x)


def trace(module: ExportModule, size: int | tuple[int, int], *, dynamic_hw: bool | None = None
          ) -> tuple[torch.export.ExportedProgram, bool, str]:
    """``torch.export`` the module: ``(program, dynamic_hw, note)``.

    ``dynamic_hw=None`` tries dynamic H, W and falls back to static at ``size`` with a note naming
    the reason; True insists (raising :class:`ExportError`), False asks for static.
    """
    if dynamic_hw is not False:
        try:
            program = _trace(module, size, True)
            _probe(program, module.model, size)
            return program, True, ""
        except Exception as err:  # torch raises many kinds here; any of them means "not dynamic"
            if dynamic_hw:
                raise ExportError(f"{module.model.name}: cannot export with dynamic H, W: "
                                  f"{_in_words(err, module.model, size)}") from err
            reason = _in_words(err, module.model, size)
    else:
        reason = "static export asked for"
    try:
        program = _trace(module, size, False)
    except Exception as err:
        raise ExportError(f"{module.model.name}: cannot be exported with torch.export: {_first_line(err)}") from err
    return program, False, (f"{module.model.name}: exported with static H, W = {size_text(size)} (dynamic batch only): "
                            f"{reason}")


def to_pt2_bytes(program: torch.export.ExportedProgram) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _remainder_scalar(self, other):
    """aten.remainder.Scalar for a symbolic divisor (SegNet's unpool takes ``indices % W`` with a
    dynamic W, which torch's own translation cannot take). ONNX Mod with fmod=0 is Python's
    remainder for integers; floats use a - floor(a / b) * b."""
    from onnxscript import opset18 as op

    other = op.CastLike(other, self)
    if self.dtype is not None and self.dtype.is_floating_point():
        return op.Sub(self, op.Mul(op.Floor(op.Div(self, other)), other))
    return op.Mod(self, other)


def to_onnx_bytes(program: torch.export.ExportedProgram) -> bytes:
    """The ONNX model of an exported program (opset from torch's default), as bytes.

    Input ``x`` [N, 3, H, W], output ``logits`` [N, C, H, W]; the weights are initializers.
    """
    import contextlib
    import warnings

    table = {torch.ops.aten.remainder.Scalar: _remainder_scalar}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=["x"], output_names=["logits"],
                                         custom_translation_table=table, verbose=False)
    return onnx_program.model_proto.SerializeToString()


_REASONS = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.ENOSPC: "no space left on the device"}


def check_target(out: str | os.PathLike) -> Path:
    """``out`` as a Path, once it is known that the export can be written there.

    Raises:
        ExportError: ``out`` is a folder, a file stands where one of its folders should be, or its
            folder (the nearest existing one, when it is still to be created) cannot take a file.
    """
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; expected a file path, e.g. {out / 'model.onnx'}")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ExportError(f"cannot write {out}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=folder)
    except OSError as err:
        reason = _REASONS.get(err.errno, err.strerror or str(err))
        raise ExportError(f"cannot write {out}: {reason} ({folder})") from None
    os.close(fd)
    os.unlink(probe)
    return out


def export_model(model, params: dict, state: dict, preprocess: Preprocess, out: str | os.PathLike, *,
                 format: str, dynamic_hw: bool | None = None) -> ExportResult:
    """Export ``model`` with one member's ``params``/``state`` to ``out`` (written atomically).

    Args:
        format: "onnx" or "pt2".
        dynamic_hw: see :func:`trace`.
    Returns:
        an :class:`ExportResult` saying whether H, W are dynamic, with a note when they are not.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    check_target(out)
    size = preprocess.size or 8 * model.stride
    if any(side % model.stride for side in size_hw(size)):
        raise ExportError(f"{model.name}: size {size_text(size)} is not a multiple of the model's stride "
                          f"{model.stride}")
    module = ExportModule(model, params, state, preprocess).eval()
    program, dynamic, note = trace(module, size, dynamic_hw=dynamic_hw)
    data = to_pt2_bytes(program) if format == "pt2" else to_onnx_bytes(program)
    path = write_atomic(out, data)
    return ExportResult(path=path, format=format, dynamic_hw=dynamic, example_size=size, note=note)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, format: str,
                      weights: str = "auto", member: int | str = "auto") -> ExportResult:
    """Load one model of a checkpoint (``models.load_checkpoint``: by default the weights and the
    ensemble member that validated best) and export it; see :func:`export_model`."""
    from .models.saved import load_checkpoint

    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    check_target(out)
    loaded = load_checkpoint(checkpoint, device="cpu", weights=weights, member=member)
    return export_model(loaded.model, loaded.params, loaded.state, loaded.preprocess, out, format=format)
