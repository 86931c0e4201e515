"""Starting a run from somewhere other than a random init: another run's weights (``--init-from``),
and state templates that need no pretrained file (a resume fills them from its checkpoint).

    train_state = warm_start(train_state, "runs/pets/best.safetensors")

Every params and state tensor of ``train_state`` whose name and shape the other checkpoint holds
is copied from it (the member that validated best, with the weights it validated best with); the
others keep their fresh init, and one warning names them (a head with another number of
classes). The optimizer state starts fresh: a new run on new data.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch

from ..core.tree import flatten_with_names, unflatten_like
from ..models.saved import load_checkpoint

__all__ = ["warm_start", "without_pretrained"]


def without_pretrained(model):
    """``model`` whose init draws every weight at random: a template for a checkpoint to fill, so a
    resumed run needs neither the pretrained file nor the package it came from."""
    if getattr(model.cfg, "encoder_weights", None) is None:
        return model
    plain = dataclasses.replace(model.cfg, encoder_weights=None)
    return dataclasses.replace(model, init_fn=lambda cfg, key: model.init_fn(plain, key))


def _copy(tree, source: dict, members: int | None, where) -> tuple[dict, list[str]]:
    """``tree`` with each leaf named and shaped as in ``source`` replaced; the names left as they were."""
    flat, kept = flatten_with_names(tree), []
    for name, leaf in flat.items():
        value = source.get(name)
        shape = leaf.shape[1:] if members else leaf.shape
        if value is None or tuple(value.shape) != tuple(shape):
            kept.append(f"{where}.{name}" + ("" if value is None else f" ({list(value.shape)} -> {list(shape)})"))
            continue
        value = value.to(device=leaf.device, dtype=leaf.dtype)
        flat[name] = value.expand_as(leaf).clone() if members else value.clone()
    return unflatten_like(tree, flat), kept


def warm_start(train_state, checkpoint: str | os.PathLike):
    """``train_state`` with its params and model state taken from ``checkpoint`` where names and shapes
    agree (see the module docstring); an ensemble's members all start from the same weights.

    Raises:
        ValueError: the checkpoint shares no tensor with this model (another architecture).
    """
    members = None if train_state.step.dim() == 0 else int(train_state.step.shape[0])
    loaded = load_checkpoint(checkpoint, member="auto")
    params, p_kept = _copy(train_state.params, flatten_with_names(loaded.params), members, "params")
    state, s_kept = _copy(train_state.state, flatten_with_names(loaded.state), members, "state")
    total = len(flatten_with_names(train_state.params)) + len(flatten_with_names(train_state.state))
    kept = p_kept + s_kept
    if len(kept) == total:
        raise ValueError(f"--init-from {checkpoint}: its {loaded.model.name} model shares no tensor (name and "
                         "shape) with this one; expected a checkpoint of the same architecture")
    if kept:
        shown = ", ".join(kept[:4]) + (f" and {len(kept) - 4} more" if len(kept) > 4 else "")
        warnings.warn(f"--init-from {checkpoint}: {len(kept)} of {total} tensors re-initialised (no match in the "
                      f"checkpoint): {shown}", UserWarning, stacklevel=2)
    with torch.no_grad():
        return train_state._replace(params=params, state=state)
