"""Checkpoints: one safetensors file per training state, written atomically, read without pickle.

Tensors are named by group and flattened tree path::

    params.<dotted>      model parameters            state.<dotted>    batch-norm statistics
    opt_state.<dotted>   torchopt state              step, key         int64 [] and [2]
    hparams.<name>       float 0-d hyperparameters (lr, ...)

For an ensemble of K members every tensor has a leading axis of size K. The safetensors
metadata (string values only) holds ``format`` ("functional_seg/1"), ``model``, ``cfg`` (JSON),
``optimizer`` (JSON), ``version``, ``torch``, ``args`` (JSON: the training arguments),
``extra`` (JSON: loop bookkeeping such as the best score), ``ensemble`` (K, or 0 for a single
model) and ``sha256``, a digest of every tensor's name, dtype, shape and bytes, so that a flipped
bit in the data is caught as well as a broken header.

Writes go to a temporary file in the same directory, which is flushed and fsynced, then renamed
over the target (``os.replace``) and the directory fsynced: a process killed at any moment leaves
either the old file or the new one. Reading parses the JSON header and raw tensor bytes only; no
code from the file is ever executed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .core.tree import flatten_with_names, unflatten_like, unflatten_names

__all__ = ["FORMAT", "CheckpointError", "save", "to_bytes", "write_atomic", "read", "load", "load_model",
           "check_model"]

FORMAT = "functional_seg/1"
_GROUPS = ("params", "state", "opt_state", "hparams")
_EXPECTED = "expected a safetensors checkpoint written by functional_seg"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupted, or made for another model."""


# ----------------------------------------------------------------------------------------------
# Writing


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    return json.loads(json.dumps(x, default=str))


def _cfg_dict(model) -> dict:
    return _jsonable(model.cfg)


def _flat_tensors(train_state) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for group in ("params", "state", "opt_state"):
        tree = getattr(train_state, group)
        if tree is None:
            continue
        for name, leaf in flatten_with_names(tree).items():
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"{group}.{name} is a {type(leaf).__name__}, not a tensor")
            tensors[f"{group}.{name}"] = leaf
    for name, value in dict(train_state.hparams or {}).items():
        tensors[f"hparams.{name}"] = torch.as_tensor(value)
    tensors["step"] = train_state.step
    tensors["key"] = train_state.key
    # safetensors wants contiguous CPU tensors that share no storage.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def to_bytes(train_state, *, model, optimizer_cfg=None, args: Mapping | None = None,
             extra: Mapping | None = None) -> bytes:
    """Serialise a :class:`TrainState` (single or stacked ensemble) to safetensors bytes."""
    from safetensors.torch import save as st_save

    tensors = _flat_tensors(train_state)
    step = train_state.step
    metadata = {
        "format": FORMAT,
        "model": str(model.name),
        "cfg": json.dumps(_cfg_dict(model)),
        "optimizer": json.dumps(_jsonable(optimizer_cfg)),
        "version": __version__,
        "torch": torch.__version__,
        "args": json.dumps(_jsonable(dict(args or {}))),
        "extra": json.dumps(_jsonable(dict(extra or {}))),
        "ensemble": str(0 if step.dim() == 0 else int(step.shape[0])),
        "sha256": _digest(tensors),
    }
    return st_save(tensors, metadata=metadata)


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to ``path`` via a fsynced temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
        with contextlib.suppress(OSError):
            stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def save(path: str | os.PathLike, train_state, *, model, optimizer_cfg=None, args: Mapping | None = None,
         extra: Mapping | None = None) -> Path:
    """Write a checkpoint atomically; see the module docstring for the layout.

    Args:
        train_state: a ``TrainState`` (``opt_state`` may be None for an inference-only file).
        model: the ``Model`` (its name and cfg go in the metadata).
        optimizer_cfg: an ``OptimizerConfig`` or dict, stored as JSON.
        args: the training arguments (JSON-able), stored as JSON.
        extra: loop bookkeeping (JSON-able).
    Returns:
        The path written.
    """
    data = to_bytes(train_state, model=model, optimizer_cfg=optimizer_cfg, args=args, extra=extra)
    return write_atomic(path, data)


# ----------------------------------------------------------------------------------------------
# Reading


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a checkpoint: ``(tensors by name, parsed metadata)``.

    Raises:
        CheckpointError: the file is missing, is not a safetensors file, was not written by
            functional_seg, or its contents do not match the recorded digest.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (SafetensorError, ValueError, struct.error, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: {_EXPECTED} (cannot read it: {err})") from None
    raw = header.get("__metadata__") or {}
    if raw.get("format") != FORMAT:
        found = raw.get("format")
        raise CheckpointError(f"{path}: {_EXPECTED}; its format tag is {found!r}, not {FORMAT!r}")
    if "sha256" in raw and _digest(tensors) != raw["sha256"]:
        raise CheckpointError(f"{path} is corrupted: its tensors do not match the digest recorded when it was "
                              "written")
    meta: dict[str, Any] = dict(raw)
    try:
        for field in ("cfg", "optimizer", "args", "extra"):
            meta[field] = json.loads(raw.get(field, "null"))
        meta["ensemble"] = int(raw.get("ensemble", "0"))
    except ValueError as err:
        raise CheckpointError(f"{path}: unreadable metadata ({err})") from None
    for name in ("step", "key"):
        if name not in tensors:
            raise CheckpointError(f"{path}: no {name!r} tensor; {_EXPECTED}")
    return tensors, meta


def check_model(meta: Mapping, model, *, path: str | os.PathLike = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming the fields where the file's model and ``model`` differ."""
    if meta.get("model") != model.name:
        raise CheckpointError(f"{path} holds a {meta.get('model')!r} model, not {model.name!r}")
    mine, theirs = _cfg_dict(model), meta.get("cfg") or {}
    diffs = [f"{k}: file has {theirs.get(k, '<absent>')!r}, model has {mine.get(k, '<absent>')!r}"
             for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if diffs:
        raise CheckpointError(f"{path} holds a {model.name!r} model with another cfg: " + "; ".join(diffs))


def _shape(t) -> list[int]:
    return list(t.shape)


def _compare(path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected)
    mismatched = [
        f"{k}: file {tensors[k].dtype} {_shape(tensors[k])}, expected {expected[k].dtype} {_shape(expected[k])}"
        for k in expected
        if k in tensors and (tensors[k].shape != expected[k].shape or tensors[k].dtype != expected[k].dtype)
    ]
    if not (missing or unexpected or mismatched):
        return

    def lines(title, items):
        if not items:
            return []
        shown = items[:12] + ([f"... and {len(items) - 12} more"] if len(items) > 12 else [])
        return [f"  {title} ({len(items)}): " + ", ".join(shown) + ";"]

    msg = [f"{path} does not match the model:"]
    msg += lines("missing", missing) + lines("unexpected", unexpected) + lines("shape/dtype mismatch", mismatched)
    if all(k.startswith("opt_state.") for k in missing + unexpected) and (missing or unexpected) and not mismatched:
        msg.append("  (only the optimizer state differs: was the file written with another optimizer?)")
    raise CheckpointError("\n".join(msg))


def _group(tensors: Mapping[str, torch.Tensor], group: str) -> dict[str, torch.Tensor]:
    prefix = group + "."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load(path: str | os.PathLike, *, model=None, template=None, device: torch.device | str | None = None):
    """Load a checkpoint as ``(train_state, meta)``.

    Args:
        model: if given, the file's model name and cfg must equal it.
        template: a ``TrainState`` of the expected structure (e.g. a freshly initialised one):
            names, shapes and dtypes must match exactly, and the result has its tree types
            (torchopt NamedTuples) and devices. Without it, ``params``/``state``/``opt_state``
            come back as nested dicts.
        device: where to put the tensors when there is no template (default CPU).
    Raises:
        CheckpointError: see :func:`read`, plus model and structure mismatches, each named.
    """
    from .train.state import TrainState

    tensors, meta = read(path)
    if model is not None:
        check_model(meta, model, path=path)
    if template is not None:
        expected = _flat_tensors_meta(template)
        _compare(path, tensors, expected)
        devices = _flat_devices(template)
        tensors = {k: v.to(devices[k]) for k, v in tensors.items()}
        trees = [unflatten_like(getattr(template, g), _group(tensors, g)) if getattr(template, g) is not None
                 else None for g in ("params", "state", "opt_state")]
        hparams = {k: tensors[f"hparams.{k}"] for k in template.hparams}  # the template's order
        return TrainState(*trees, step=tensors["step"], key=tensors["key"], hparams=hparams), meta
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    groups = {g: unflatten_names(_group(tensors, g)) for g in _GROUPS}
    return TrainState(groups["params"], groups["state"], groups["opt_state"] or None, tensors["step"],
                      tensors["key"], groups["hparams"]), meta


def _flat_tensors_meta(train_state) -> dict[str, torch.Tensor]:
    """Flattened names of a template without copying data (shapes and dtypes only)."""
    out: dict[str, torch.Tensor] = {}
    for group in ("params", "state", "opt_state"):
        tree = getattr(train_state, group)
        if tree is not None:
            out.update({f"{group}.{k}": v for k, v in flatten_with_names(tree).items()})
    out.update({f"hparams.{k}": torch.as_tensor(v) for k, v in dict(train_state.hparams or {}).items()})
    out["step"], out["key"] = train_state.step, train_state.key
    return out


def _flat_devices(train_state) -> dict[str, torch.device]:
    return {k: v.device for k, v in _flat_tensors_meta(train_state).items()}


def _tuplify(x):
    if isinstance(x, list):
        return tuple(_tuplify(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuplify(v) for k, v in x.items()}
    return x


def load_model(path: str | os.PathLike, *, device: torch.device | str | None = None):
    """Rebuild the model recorded in a checkpoint: ``(model, params, state, meta)``.

    The model comes from ``create_model(meta["model"], **meta["cfg"])``; params and state are
    checked against a fresh ``model.init`` by name and shape. For an ensemble checkpoint
    (``meta["ensemble"] = K``) every leaf keeps its leading member axis of size K.
    """
    from .core import random as jr
    from .models import create_model

    tensors, meta = read(path)
    cfg = _tuplify(meta.get("cfg") or {})
    try:
        model = create_model(meta["model"], **cfg)
    except ValueError as err:
        raise CheckpointError(f"{path}: cannot rebuild its model: {err}") from None
    # Only names and shapes are needed: init on the meta device draws nothing (ViT-Base: seconds saved).
    params, state = model.init(jr.key(0, device="meta"))
    k = meta["ensemble"]
    expected = {f"params.{n}": v for n, v in flatten_with_names(params).items()}
    expected.update({f"state.{n}": v for n, v in flatten_with_names(state).items()})
    if k:
        expected = {n: v.expand(k, *v.shape) for n, v in expected.items()}
    found = {n: v for n, v in tensors.items() if n.startswith(("params.", "state."))}
    _compare(path, found, expected)
    if device is not None:
        tensors = {n: v.to(device) for n, v in tensors.items()}
    params = unflatten_like(params, _group(tensors, "params"))
    state = unflatten_like(state, _group(tensors, "state"))
    return model, params, state, meta
