"""A model and its weights rebuilt from a checkpoint's metadata (``model`` name and ``cfg``).

``load_model(path)`` -> ``(model, params, state, meta)`` for ``fseg eval``, ``predict`` and
``export``: the model comes from ``create_model(meta["model"], **meta["cfg"])`` and its trees are
checked by name and shape against an init on the meta device (no random draws, no memory). For
an ensemble checkpoint (``meta["ensemble"] = K``) every leaf keeps its leading member axis.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..checkpoint import CheckpointError, compare, group, read
from ..core import random as jr
from ..core.files import jsonable
from ..core.tree import flatten_with_names, unflatten_like
from .base import create_model

__all__ = ["model_metadata", "check_model", "load_model", "WEIGHTS"]

WEIGHTS = ("params", "ema")


def model_metadata(model) -> dict[str, Any]:
    """What a checkpoint records of a model: ``{"model": name, "cfg": cfg as JSON}``."""
    return {"model": model.name, "cfg": jsonable(model.cfg)}


def check_model(meta: Mapping, model, *, path: str | os.PathLike = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming the fields where the file's model and ``model`` differ."""
    if meta.get("model") != model.name:
        raise CheckpointError(f"{path} holds a {meta.get('model')!r} model, not {model.name!r}")
    mine, theirs = jsonable(model.cfg), dict(meta.get("cfg") or {})
    for k, default in _defaults(model.cfg).items():  # a field added since the file was written: its default
        theirs.setdefault(k, default)
    diffs = [f"{k}: file has {theirs.get(k, '<absent>')!r}, model has {mine.get(k, '<absent>')!r}"
             for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if diffs:
        raise CheckpointError(f"{path} holds a {model.name!r} model with another cfg: " + "; ".join(diffs))


def _defaults(cfg) -> dict[str, Any]:
    """The JSON form of each cfg field's default (fields without one are left out)."""
    if not dataclasses.is_dataclass(cfg):
        return {}
    return {f.name: jsonable(f.default) for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}


def _tuplify(x):
    if isinstance(x, list):
        return tuple(_tuplify(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuplify(v) for k, v in x.items()}
    return x


def load_model(path: str | os.PathLike, *, device: torch.device | str | None = None, weights: str = "params"):
    """Rebuild the model recorded in a checkpoint: ``(model, params, state, meta)``.

    Args:
        weights: "params" (the trained weights) or "ema" (their exponential moving average,
            present when the run trained with ``--ema``).
    """
    if weights not in WEIGHTS:
        raise CheckpointError(f"unknown weights {weights!r}; expected one of {', '.join(WEIGHTS)}")
    tensors, meta = read(path)
    try:
        model = create_model(meta["model"], **_tuplify(meta.get("cfg") or {}))
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot rebuild its model: {err}") from None
    prefix = "" if weights == "params" else "ema."
    if weights == "ema" and not any(k.startswith("ema.") for k in tensors):
        raise CheckpointError(f"{path} holds no EMA weights (the run was trained without --ema); "
                              "use --weights params")
    params, state = model.init(jr.key(0, device="meta"))
    k = int(meta.get("ensemble") or 0)
    expected = {f"{prefix}params.{n}": v for n, v in flatten_with_names(params).items()}
    expected.update({f"{prefix}state.{n}": v for n, v in flatten_with_names(state).items()})
    if k:
        expected = {n: v.expand(k, *v.shape) for n, v in expected.items()}
    found = {n: v for n, v in tensors.items() if n.startswith((f"{prefix}params.", f"{prefix}state."))}
    compare(path, found, expected)
    if device is not None:
        found = {n: v.to(device) for n, v in found.items()}
    params = unflatten_like(params, group(found, f"{prefix}params"))
    state = unflatten_like(state, group(found, f"{prefix}state"))
    return model, params, state, meta
