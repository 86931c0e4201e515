"""Optimizers as torchopt gradient transformations, with the learning rate kept outside.

An :class:`Optimizer` bundles a torchopt ``GradientTransformation`` that knows nothing of the
learning rate (clip -> weight decay -> Adam/momentum scaling) with a pure schedule
``schedule(step) -> factor``. The step multiplies the transformed updates by
``-lr * schedule(step)``, where ``lr`` is a 0-d tensor held in ``TrainState.hparams`` and
``step`` the int64 step tensor: neither is a Python number, so ``torch.compile`` never guards
on them (no recompiles as they change) and ``torch.func.vmap`` can sweep ``lr`` over an
ensemble.

Three transformations are not taken from torchopt 0.7.3, because torchopt's versions are not
pure tensor functions of their inputs:

- ``torchopt.transform.scale_by_adam`` computes ``pow(float, Tensor)``, which dynamo in torch
  < 2.14 cannot trace; ``adam.scale_by_adam`` is the same maths on tensors (same state type).
- ``torchopt.clip_grad_norm`` calls ``float(total_norm)``: a device sync, a graph break under
  ``torch.compile`` and an error under ``vmap``. :func:`clip_by_global_norm` stays in tensors.
- ``torchopt.transform.trace`` (SGD momentum) keeps a Python ``first_call`` flag in its
  closure: a resumed run (or a second compiled trace) would see ``first_call=True`` with a
  non-zero trace and take a different path. :func:`momentum` is stateless.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torchopt
from torchopt.base import EmptyState, GradientTransformation

from ..core.tree import tree_leaves, tree_map
from ..options import OPTIMIZERS, SCHEDULES
from .adam import scale_by_adam
from .config import OptimizerConfig

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "OptimizerConfig",
    "Optimizer",
    "make_optimizer",
    "make_schedule",
    "clip_by_global_norm",
    "momentum",
]


# ----------------------------------------------------------------------------------------------
# Pure transformations


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all updates by ``min(1, max_norm / (||g||_2 + 1e-6))`` (torch's clip_grad_norm_)."""

    def init_fn(params):
        return EmptyState()

    def update_fn(updates, state, *, params=None, inplace=True):
        leaves = [g for g in tree_leaves(updates) if g is not None]
        if not leaves:
            return updates, state
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in leaves]))
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return tree_map(lambda g: None if g is None else g * factor.to(g.dtype), updates), state

    return GradientTransformation(init_fn, update_fn)


class MomentumState(NamedTuple):
    trace: Any


def momentum(beta: float, *, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum ``t <- beta * t + g`` (``torch.optim.SGD`` with dampening 0).

    Returns ``t`` as the update, or ``g + beta * t`` with Nesterov. The trace starts at zero,
    so the first update is ``g`` as in torch, without a first-call flag.
    """

    def init_fn(params):
        return MomentumState(trace=tree_map(torch.zeros_like, params))

    def update_fn(updates, state, *, params=None, inplace=True):
        trace = tree_map(lambda t, g: t * beta + g, state.trace, updates)
        if nesterov:
            updates = tree_map(lambda g, t: g + beta * t, updates, trace)
        else:
            updates = trace
        return updates, MomentumState(trace=trace)

    return GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------------------
# Schedules


def make_schedule(cfg: OptimizerConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """A pure ``schedule(step) -> factor``: step is an int64 tensor (any shape), factor float32.

    The factor for the first update (step 0) is 1 for "constant", ``1 / warmup_steps`` with a
    warmup. Only tensor ops: safe under ``torch.compile`` (no guards on step) and ``vmap``.
    """
    kind, warmup = cfg.schedule, int(cfg.warmup_steps)
    if kind in ("cosine", "poly") and not cfg.total_steps:
        raise ValueError(f"the {kind!r} schedule needs total_steps (fit fills it in from epochs)")
    if kind == "step" and not cfg.steps_per_epoch:
        raise ValueError("the 'step' schedule needs steps_per_epoch (fit fills it in)")
    floor = float(cfg.min_lr_ratio)

    def schedule(step: torch.Tensor) -> torch.Tensor:
        s = step.to(torch.float32)
        if kind == "constant":
            factor = torch.ones_like(s)
        elif kind in ("cosine", "poly"):
            t = torch.clamp((s - warmup) / max(int(cfg.total_steps) - warmup, 1), 0.0, 1.0)
            if kind == "cosine":
                decay = 0.5 * (1.0 + torch.cos(math.pi * t))
            else:
                decay = (1.0 - t) ** cfg.power
            factor = floor + (1.0 - floor) * decay
        else:  # step: gamma ** (epoch // step_size), as torch's StepLR stepped once per epoch
            epoch = torch.floor(s / int(cfg.steps_per_epoch))
            factor = torch.pow(torch.full_like(s, cfg.gamma), torch.floor(epoch / int(cfg.step_size)))
        if warmup > 0:
            factor = factor * torch.clamp((s + 1.0) / warmup, max=1.0)
        return factor

    return schedule


# ----------------------------------------------------------------------------------------------
# The optimizer bundle


@dataclass(frozen=True)
class Optimizer:
    """A torchopt transformation without learning rate, plus the schedule that scales it.

    ``update`` is pure (``inplace=False`` throughout) and safe inside ``torch.compile``/``vmap``.
    """

    cfg: OptimizerConfig
    tx: GradientTransformation = dataclasses.field(repr=False)
    schedule: Callable[[torch.Tensor], torch.Tensor] = dataclasses.field(repr=False)

    def init(self, params):
        return self.tx.init(params)

    def learning_rate(self, step: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        return lr * self.schedule(step)

    def update(self, grads, opt_state, params, *, step: torch.Tensor, lr: torch.Tensor):
        """Returns ``(updates, new_opt_state)``; add the updates with ``torchopt.apply_updates``.

        Args:
            grads: gradient tree shaped like params.
            step: int64 0-d tensor, the number of updates done so far (0 for the first).
            lr: float 0-d tensor, the base learning rate.
        """
        directions, opt_state = self.tx.update(grads, opt_state, params=params, inplace=False)
        scale = -self.learning_rate(step, lr)
        updates = tree_map(lambda u: None if u is None else u * scale.to(u.dtype), directions)
        return updates, opt_state

    def apply(self, grads, opt_state, params, *, step: torch.Tensor, lr: torch.Tensor,
              scales: dict[str, float] | None = None):
        """Returns ``(new_params, new_opt_state)``: ``update`` and ``torchopt.apply_updates`` in one.

        Each new leaf is ``addcmul(p, direction, -lr * schedule(step))``: one pass over the leaf
        where scaling and adding take two (and a tree of updates the size of the params).

        Args:
            scales: optional learning-rate factor per top-level key of ``params`` (static Python
                floats; e.g. ``{"encoder": 0.1, "decoder": 1.0}``); a factor of 0 leaves that
                subtree unchanged.
        """
        directions, opt_state = self.tx.update(grads, opt_state, params=params, inplace=False)
        scale = -self.learning_rate(step, lr)
        if scales is None:
            return tree_map(lambda p, d: torch.addcmul(p, d, scale.to(d.dtype)), params, directions), opt_state
        new = {}
        for name, sub in params.items():
            factor = scales.get(name, 1.0)
            new[name] = sub if factor == 0 else tree_map(
                lambda p, d, f=factor: torch.addcmul(p, d, (scale * f).to(d.dtype)), sub, directions[name])
        return new, opt_state


def make_optimizer(cfg: OptimizerConfig | None = None, **overrides) -> Optimizer:
    """Build an :class:`Optimizer` from a config (or keyword overrides of the defaults)."""
    cfg = dataclasses.replace(cfg or OptimizerConfig(), **overrides) if overrides else (cfg or OptimizerConfig())
    parts: list[GradientTransformation] = []
    if cfg.clip_norm is not None:
        parts.append(clip_by_global_norm(cfg.clip_norm))
    if cfg.name in ("adam", "sgd") and cfg.weight_decay > 0:
        parts.append(torchopt.transform.add_decayed_weights(cfg.weight_decay))  # L2, as torch.optim
    if cfg.name in ("adam", "adamw"):
        parts.append(scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    elif cfg.momentum > 0:
        parts.append(momentum(cfg.momentum, nesterov=cfg.nesterov))
    if cfg.name == "adamw" and cfg.weight_decay > 0:
        parts.append(torchopt.transform.add_decayed_weights(cfg.weight_decay))  # decoupled
    tx = torchopt.chain(*parts) if parts else torchopt.base.identity()
    return Optimizer(cfg=cfg, tx=tx, schedule=make_schedule(cfg))
