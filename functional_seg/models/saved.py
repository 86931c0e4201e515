"""From a checkpoint file to a model ready to run: the one way, for eval, predict, export, the end of
training and the experiments.

    loaded = load_checkpoint(path, device="cpu", weights="auto", member="all")
    loaded.model, loaded.params, loaded.state, loaded.preprocess, loaded.meta

The model is rebuilt with ``create_model(meta["model"], **meta["cfg"])`` and its trees are checked
by name and shape against an init on the META device (no random draws, no memory, and no
pretrained-weights file or package is ever read: the checkpoint holds every weight). The
``Preprocess`` contract comes from ``meta["preprocess"]``.

Which weights (one policy, decided at training time and recorded in the checkpoint as
``meta["selection"]`` by ``fit``):

    weights="auto"    each member's raw or EMA weights, whichever scored the higher validation mean
                      IoU at that checkpoint's epoch ("params" when the run had no EMA or no
                      validation); "params" / "ema" force one
    member="all"      every member of an ensemble (leaves keep their leading [K] axis)
    member="auto"     the member that validated best (0 without validation); a single model is
                      member 0 of 1
    member=i          member i

so ``fseg eval`` scores all members, ``fseg predict``/``export`` run the best one, and the test
split at the end of ``fit`` is scored exactly as ``fseg eval --weights auto`` would.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoint import CheckpointError, compare, group, read
from ..core import random as jr
from ..core.files import jsonable
from ..core.tree import flatten_with_names, tree_map, unflatten_like
from ..data.labels import unnamed
from ..data.preprocess import Preprocess
from ..options import WEIGHTS
from .base import create_model

__all__ = ["model_metadata", "check_model", "load_checkpoint", "Loaded", "preprocess_of", "WEIGHTS"]


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


def preprocess_of(meta: Mapping[str, Any], num_classes: int) -> Preprocess:
    """The checkpoint's ``Preprocess``; classes the run did not name are ``class_0``, ``class_1``, ..."""
    pre = Preprocess.from_dict(meta["preprocess"]) if meta.get("preprocess") else Preprocess(
        size=(meta.get("args") or {}).get("size"))
    if pre.num_classes != num_classes:
        pre = dataclasses.replace(pre, class_names=unnamed(num_classes))
    return pre


@dataclass(frozen=True)
class Loaded:
    """A model rebuilt from a checkpoint with the trees and contract it was saved with.

    ``members`` is K when the trees are stacked over K ensemble members, else None; ``member`` the
    member chosen (None: all); ``weights`` the weights resolved per member ("params" or "ema").
    """

    model: Any
    params: dict
    state: dict
    preprocess: Preprocess
    meta: dict
    path: str
    members: int | None
    member: int | None
    weights: tuple[str, ...]


def _selection(meta: Mapping, k: int) -> dict:
    sel = meta.get("selection") or {}
    weights = list(sel.get("weights") or ["params"] * max(k, 1))
    return {"weights": weights, "member": int(sel.get("member") or 0)}


def _read_trees(path, tensors: Mapping, model, prefix: str, k: int, device) -> tuple[dict, dict]:
    params, state = model.init(jr.key(0, device="meta"))
    expected = {f"{prefix}params.{n}": v for n, v in flatten_with_names(params).items()}
    expected.update({f"{prefix}state.{n}": v for n, v in flatten_with_names(state).items()})
    if k:
        expected = {n: v.expand(k, *v.shape) for n, v in expected.items()}
    found = {n: v for n, v in tensors.items() if n.startswith((f"{prefix}params.", f"{prefix}state."))}
    compare(path, found, expected)
    if device is not None:
        found = {n: v.to(device) for n, v in found.items()}
    return (unflatten_like(params, group(found, f"{prefix}params")),
            unflatten_like(state, group(found, f"{prefix}state")))


def _member_index(path, member, k: int, chosen: int) -> int | None:
    """The member index ``member`` names (None: all), or a one-line error."""
    if member == "all" or member is None:
        return None if k else 0
    if member == "auto":
        return chosen if k else 0
    if isinstance(member, bool) or not isinstance(member, int):
        raise CheckpointError(f"member must be 'all', 'auto' or an integer, got {member!r}")
    if not k:
        if member != 0:
            raise CheckpointError(f"member {member}: {path} holds one model, not an ensemble")
        return 0
    if not 0 <= member < k:
        raise CheckpointError(f"member {member} is out of range: {path} holds {k} members (0..{k - 1})")
    return member


def load_checkpoint(path: str | os.PathLike, *, device: torch.device | str | None = None, weights: str = "auto",
                    member: int | str | None = "all") -> Loaded:
    """Rebuild the model in a checkpoint with its weights and ``Preprocess`` (see the module docstring).

    Raises:
        CheckpointError: unreadable, tampered or foreign file; unknown model; EMA asked for but
            absent; a member out of range. The message names the file.
    """
    if weights not in WEIGHTS:
        raise CheckpointError(f"unknown weights {weights!r}; expected one of {', '.join(WEIGHTS)}")
    tensors, meta = read(path)
    try:
        model = create_model(meta["model"], **_tuplify(meta.get("cfg") or {}))
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot rebuild its model: {err}") from None
    k = int(meta.get("ensemble") or 0)
    has_ema = any(n.startswith("ema.") for n in tensors)
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"{path} holds no EMA weights (the run was trained without --ema); use --weights params")
    sel = _selection(meta, k)
    index = _member_index(path, member, k, sel["member"])
    per_member = [weights] * max(k, 1) if weights != "auto" else [w if has_ema else "params" for w in sel["weights"]]
    trees = {w: _read_trees(path, tensors, model, "" if w == "params" else "ema.", k, device)
             for w in sorted(set(per_member if index is None else [per_member[index]]))}
    if index is not None:
        w = per_member[index]
        params, state = trees[w] if not k else tree_map(lambda t: t[index], trees[w])
        chosen = (w,)
    elif len(trees) == 1:
        (params, state), chosen = next(iter(trees.values())), tuple(per_member)
    else:  # an ensemble whose members chose differently: each member's leaves from its own choice
        pick = torch.tensor([w == "ema" for w in per_member])
        params, state = tree_map(lambda a, b: torch.where(pick.to(a.device).reshape(-1, *[1] * (a.dim() - 1)), b, a),
                                 trees["params"], trees["ema"])
        chosen = tuple(per_member)
    return Loaded(model, params, state, preprocess_of(meta, model.num_classes), meta, str(path),
                  k or None if index is None else None, index if k else None, chosen)
