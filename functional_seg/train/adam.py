"""Adam's moment scaling as a torchopt ``GradientTransformation`` that compiles on torch >= 2.11.

torchopt 0.7.3's ``scale_by_adam`` computes the bias correction as the builtin
``pow(float, Tensor)``, which dynamo in torch < 2.14 cannot trace, so a whole compiled step
breaks. This transform is the same maths (Kingma & Ba, 2014, Algorithm 1) with the power
written as ``exp(count * log(decay))`` on tensors. Its state is torchopt's own
``ScaleByAdamState(mu, nu, count)``, so it chains with torchopt's transforms and checkpoints
read the same names.
"""

from __future__ import annotations

import math

import torch
from torchopt.base import GradientTransformation
from torchopt.transform.scale_by_adam import ScaleByAdamState

from ..core.tree import tree_leaves, tree_map, tree_map_indexed

__all__ = ["scale_by_adam"]


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Rescale gradients to Adam's direction m_hat / (sqrt(v_hat) + eps); the caller applies -lr."""
    if not 0.0 <= b1 < 1.0 or not 0.0 <= b2 < 1.0:
        raise ValueError(f"Adam betas must lie in [0, 1), got b1={b1}, b2={b2}")
    if eps < 0:
        raise ValueError(f"Adam eps must be >= 0, got {eps}")
    log_b1, log_b2 = math.log(b1) if b1 > 0 else -math.inf, math.log(b2) if b2 > 0 else -math.inf

    def init_fn(params):
        count = tree_map(lambda t: torch.zeros((), dtype=torch.int64, device=t.device), params)
        mu = tree_map(torch.zeros_like, params)
        nu = tree_map(torch.zeros_like, params)
        return ScaleByAdamState(mu=mu, nu=nu, count=count)

    def update_fn(updates, state, *, params=None, inplace=True):
        del params, inplace  # always out of place: the step must not mutate its inputs
        mu = tree_map(lambda g, m: m.lerp(g, 1 - b1), updates, state.mu)
        nu = tree_map(lambda g, v: v.lerp(g * g, 1 - b2), updates, state.nu)
        count = tree_map(lambda c: c + 1, state.count)
        counts = tree_leaves(count)
        if not counts:
            return updates, ScaleByAdamState(mu=mu, nu=nu, count=count)
        # m_hat / (sqrt(v_hat) + eps) == m / (sqrt(v) + eps * sqrt(bc2)) * (sqrt(bc2) / bc1): the bias
        # corrections of all the leaves come from one [L] vector (a handful of ops, not a dozen a
        # leaf: at small widths those tiny ops cost a tenth of the step), and each leaf then takes
        # four passes, not five
        c = torch.stack(counts).to(torch.float32)
        bc1, sqrt_bc2 = 1 - torch.exp(c * log_b1), (1 - torch.exp(c * log_b2)).sqrt()
        factors, eps_terms = (sqrt_bc2 / bc1).unbind(0), (eps * sqrt_bc2).unbind(0)
        directions = tree_map_indexed(lambda i, m, v: torch.div(m, v.sqrt() + eps_terms[i]).mul_(factors[i]), mu, nu)
        return directions, ScaleByAdamState(mu=mu, nu=nu, count=count)

    return GradientTransformation(init_fn, update_fn)
