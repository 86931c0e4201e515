"""The training state: one pytree that holds everything a step reads and writes.

``TrainState(params, state, opt_state, step, key, hparams)``:

- params, state: the model's trees (nested dicts of tensors; state holds batch-norm statistics).
- opt_state: the torchopt optimizer state (NamedTuples of trees).
- step: int64 0-d tensor, the number of updates done so far.
- key: int64 [2] random key; the step's key is ``fold_in(key, step)``.
- hparams: dict of float 0-d tensors, at least ``lr``. Keeping them tensors means changing them
  costs no recompile, and an ensemble can sweep them under ``vmap``.
- ema: ``{}`` (no EMA: no leaves, so tree maps, ``stack`` and checkpoints see nothing), or
  ``{"params": ..., "state": ...}``, the exponential moving average of params and
  model state (``--ema``); a checkpoint stores it as ``ema.params.*`` / ``ema.state.*``, which
  ``models.load_checkpoint(path, weights="ema")`` reads.

For an ensemble of K members every leaf gains a leading axis of size K (``core.tree.stack``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ..core import random as jr
from ..core.tree import stack, tree_map

__all__ = ["TrainState", "init_train_state", "init_ensemble", "ensemble_size", "with_ema"]


class TrainState(NamedTuple):
    params: dict
    state: dict
    opt_state: Any
    step: torch.Tensor
    key: torch.Tensor
    hparams: dict
    ema: dict = {}  # noqa: RUF012 (never mutated: states are replaced, not written)


def with_ema(train_state: TrainState) -> TrainState:
    """The state with its EMA started at the current params and model state (copies)."""
    ema = tree_map(torch.clone, {"params": train_state.params, "state": train_state.state})
    return train_state._replace(ema=ema)


def init_train_state(model, optimizer, key: torch.Tensor, *, hparams: Mapping[str, float] | None = None,
                     device: torch.device | str | None = None) -> TrainState:
    """Initialise params, model state and optimizer state from one key.

    Args:
        model: a ``Model`` (``init(key) -> (params, state)``).
        optimizer: an ``Optimizer`` from :func:`make_optimizer`.
        key: int64 [2]; split into the init key and the training key.
        hparams: float values by name; ``lr`` defaults to ``optimizer.cfg.lr``.
        device: where the state lives (default: the key's device).
    """
    init_key, train_key = jr.split(key)
    params, state = model.init(init_key)
    if device is not None:
        params, state = tree_map(lambda t: t.to(device), (params, state))
    else:
        device = key.device
    values = {"lr": float(optimizer.cfg.lr), **dict(hparams or {})}
    return TrainState(
        params=params,
        state=state,
        opt_state=optimizer.init(params),
        step=torch.zeros((), dtype=torch.int64, device=device),
        key=train_key.to(device),
        hparams={k: torch.tensor(float(v), dtype=torch.float32, device=device) for k, v in values.items()},
    )


def init_ensemble(model, optimizer, key: torch.Tensor, size: int, *,
                  sweep: Mapping[str, Sequence[float]] | None = None, same_init: bool = False,
                  device: torch.device | str | None = None) -> TrainState:
    """K train states stacked along a new leading axis, for a ``vmap``ped step.

    Args:
        size: K, the number of members.
        sweep: optional ``{"lr": [1e-3, 3e-4], ...}``: member i gets the i-th value of each
            (every list must have K values); other hparams keep their defaults.
        same_init: give every member the same init and training key (then members differ only
            by the swept hyperparameters); otherwise member i uses ``split(key, K)[i]``.
    """
    if size < 1:
        raise ValueError(f"ensemble size must be >= 1, got {size}")
    sweep = dict(sweep or {})
    for name, values in sweep.items():
        if len(values) != size:
            raise ValueError(f"sweep {name!r} has {len(values)} values for an ensemble of {size}")
    keys = [key] * size if same_init else list(jr.split(key, size))
    members = [
        init_train_state(model, optimizer, k, hparams={n: v[i] for n, v in sweep.items()}, device=device)
        for i, k in enumerate(keys)
    ]
    return stack(members)


def ensemble_size(train_state: TrainState) -> int | None:
    """K for a stacked state (``step`` has shape [K]), None for a single one."""
    return None if train_state.step.dim() == 0 else int(train_state.step.shape[0])
