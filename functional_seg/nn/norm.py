"""Batch norm with explicit state, and layer norm.

Batch-norm statistics live in a separate state tree ``{"running_mean": [C], "running_var": [C],
"num_batches_tracked": int64 []}`` that ``batch_norm`` returns updated in training and
unchanged in eval, matching ``torch.nn.BatchNorm2d`` (momentum 0.1, unbiased running variance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def init_batch_norm(num_features: int) -> tuple[dict, dict]:
    params = {"weight": torch.ones(num_features), "bias": torch.zeros(num_features)}
    state = {
        "running_mean": torch.zeros(num_features),
        "running_var": torch.ones(num_features),
        "num_batches_tracked": torch.zeros((), dtype=torch.int64),
    }
    return params, state


def batch_norm(params: dict, state: dict, x: torch.Tensor, *, train: bool, momentum: float = 0.1,
               eps: float = 1e-5) -> tuple[torch.Tensor, dict]:
    """Normalise over (N, H, W) per channel.

    Args:
        x: float [N, C, ...]. In training the batch statistics normalise x and update the state
            out of place; in eval the running statistics do.
    Returns:
        (y, new_state) with y shaped like x.
    """
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if not train:  # one fused kernel; F.batch_norm with training=False reads the stats, never writes
        y = F.batch_norm(x, state["running_mean"], state["running_var"], params["weight"], params["bias"],
                         training=False, eps=eps)
        return y, state
    n = x.numel() // x.shape[1]
    if n < 2:  # as torch: one value per channel has no variance to normalise by
        raise ValueError(f"batch_norm in training needs more than 1 value per channel, got input {tuple(x.shape)}")
    dims = [0] + list(range(2, x.dim()))
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=dims, correction=0)
    unbiased = var * (n / max(n - 1, 1))
    new_state = {
        "running_mean": (1 - momentum) * state["running_mean"] + momentum * mean.detach(),
        "running_var": (1 - momentum) * state["running_var"] + momentum * unbiased.detach(),
        "num_batches_tracked": state["num_batches_tracked"] + 1,
    }
    scale = torch.rsqrt(var + eps) * params["weight"]
    y = (xf - mean.reshape(shape)) * scale.reshape(shape) + params["bias"].reshape(shape)
    return y.to(x.dtype), new_state


def init_layer_norm(dim: int) -> dict:
    return {"weight": torch.ones(dim), "bias": torch.zeros(dim)}


def layer_norm(params: dict, x: torch.Tensor, *, eps: float = 1e-5) -> torch.Tensor:
    """Normalise over the last axis (x: [..., dim])."""
    return F.layer_norm(x, params["weight"].shape, params["weight"], params["bias"], eps)
