"""Checkpoints: one tree of tensors plus JSON metadata in one safetensors file, written atomically.

This module knows trees and metadata only (it imports neither ``train/`` nor ``models/``). A tree
(nested dicts and NamedTuples of tensors, e.g. a ``TrainState``) is stored under its flattened
names (``params.encoder.0.conv.weight``, ``opt_state.0.mu...``, ``step``); metadata is a flat
mapping of JSON-able values, each stored as a JSON string, plus what this module adds:

    format   "functional_seg/2"        version, torch   who wrote the file
    sha256   digest of every tensor's name, dtype, shape and bytes AND of every metadata entry

so a flipped bit in the data, an edited header value (a changed ``size`` would silently change
predictions) and a stripped digest are all refused. Reading parses the JSON header and raw tensor
bytes only; no code from the file is ever executed. Writes go through ``core.files.write_atomic``:
a process killed at any moment, or a full disk, leaves the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .core.files import dumps, write_atomic
from .core.tree import flatten_with_names, unflatten_like, unflatten_names

__all__ = ["FORMAT", "CheckpointError", "save", "to_bytes", "read", "load", "compare", "group"]

FORMAT = "functional_seg/2"
_RESERVED = ("format", "version", "torch", "sha256")
_EXPECTED = "expected a safetensors checkpoint written by functional_seg"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupted, or made for another model."""


# ----------------------------------------------------------------------------------------------
# Writing


def _flat_tensors(tree) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, leaf in flatten_with_names(tree).items():
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{name} is a {type(leaf).__name__}, not a tensor")
        # safetensors wants contiguous CPU tensors that share no storage.
        tensors[name] = leaf.detach().to("cpu", copy=True).contiguous()
    return tensors


def _digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for key in sorted(k for k in metadata if k != "sha256"):
        h.update(f"meta|{key}|{metadata[key]}|".encode())
    return h.hexdigest()


def to_bytes(tree, metadata: Mapping[str, Any] | None = None) -> bytes:
    """Serialise a tree of tensors and JSON-able metadata to safetensors bytes."""
    from safetensors.torch import save as st_save

    metadata = dict(metadata or {})
    clash = [k for k in metadata if k in _RESERVED]
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved for the checkpoint format")
    tensors = _flat_tensors(tree)
    raw = {k: dumps(v) for k, v in metadata.items()}
    raw.update(format=FORMAT, version=__version__, torch=torch.__version__)
    raw["sha256"] = _digest(tensors, raw)
    return st_save(tensors, metadata=raw)


def save(path: str | os.PathLike, tree, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically; see the module docstring for the layout. Returns the path."""
    return write_atomic(path, to_bytes(tree, metadata))


# ----------------------------------------------------------------------------------------------
# Reading


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint: ``(tensors by flattened name, decoded metadata)``.

    Raises:
        CheckpointError: the file is missing, is not a safetensors file, was not written by
            functional_seg (format 2), has no digest, or its tensors or metadata do not match it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    try:
        tensors = st_load(data)
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (SafetensorError, ValueError, struct.error, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: {_EXPECTED} (cannot read it: {err})") from None
    raw = header.get("__metadata__") or {}
    found = raw.get("format")
    if found != FORMAT:
        hint = " (an older functional_seg wrote it; retrain or re-save it)" if str(found).startswith(
            "functional_seg/") else ""
        raise CheckpointError(f"{path}: {_EXPECTED}; its format tag is {found!r}, not {FORMAT!r}{hint}")
    if "sha256" not in raw:
        raise CheckpointError(f"{path} has no digest (sha256): its contents cannot be verified; {_EXPECTED}")
    if _digest(tensors, raw) != raw["sha256"]:
        raise CheckpointError(f"{path} is corrupted or was edited: its tensors or metadata do not match the "
                              "digest recorded when it was written")
    meta: dict[str, Any] = {k: raw[k] for k in _RESERVED}
    try:
        meta.update({k: json.loads(v) for k, v in raw.items() if k not in _RESERVED})
    except ValueError as err:
        raise CheckpointError(f"{path}: unreadable metadata ({err})") from None
    return tensors, meta


def group(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.``, with the prefix removed."""
    prefix += "."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def compare(path, tensors: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and mis-shaped names."""
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected)
    mismatched = [
        f"{k}: file {tensors[k].dtype} {list(tensors[k].shape)}, expected {expected[k].dtype} "
        f"{list(expected[k].shape)}"
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


def load(path: str | os.PathLike, *, template=None, device: torch.device | str | None = None):
    """Load a checkpoint as ``(tree, meta)``.

    Args:
        template: a tree of the expected structure (e.g. a freshly initialised ``TrainState``):
            names, shapes and dtypes must match exactly, and the result has its tree types
            (NamedTuples) and each leaf's device. Without it the tree comes back as nested dicts.
        device: where to put the tensors when there is no template (default CPU).
    Raises:
        CheckpointError: see :func:`read`, plus structure mismatches, each named.
    """
    tensors, meta = read(path)
    if template is None:
        if device is not None:
            tensors = {k: v.to(device) for k, v in tensors.items()}
        return unflatten_names(tensors), meta
    expected = flatten_with_names(template)
    compare(path, tensors, expected)
    tensors = {k: v.to(expected[k].device) for k, v in tensors.items()}
    return unflatten_like(template, tensors), meta
