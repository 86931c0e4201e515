"""Multi-head self-attention with explicit-key dropout.

Params match ``torch.nn.MultiheadAttention`` (one fused in-projection [3*dim, dim] + bias and
an out-projection), so parameter counts agree. Tokens x are [N, L, dim]; heads are split and
merged with einops. Eval uses ``scaled_dot_product_attention`` (fused kernels); training with
attention dropout computes the weights explicitly so the mask comes from the key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from ..core import random as jr
from ._init import uniform_init
from .activation import dropout
from .linear import init_linear, linear


def dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_rate: float = 0.0,
                          train: bool = False, key: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q [..., Lq, d], k and v [..., Lk, d]."""
    if not train or dropout_rate == 0.0:
        return F.scaled_dot_product_attention(q, k, v)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return dropout(weights, dropout_rate, train=True, key=key) @ v


def init_self_attention(key: torch.Tensor, dim: int) -> dict:
    """``nn.MultiheadAttention``'s scheme: Xavier-uniform fused in-projection, zero biases."""
    in_key, out_key = jr.split(key)
    bound = math.sqrt(6.0 / (dim + 3 * dim))  # xavier_uniform_ on the [3*dim, dim] in_proj_weight
    out_proj = init_linear(out_key, dim, dim)
    return {
        "in_proj": {"weight": uniform_init(in_key, (3 * dim, dim), bound), "bias": torch.zeros(3 * dim)},
        "out_proj": {"weight": out_proj["weight"], "bias": torch.zeros(dim)},
    }


def self_attention(params: dict, x: torch.Tensor, *, num_heads: int, dropout_rate: float = 0.0,
                   train: bool = False, key: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, L, dim] -> [N, L, dim]."""
    qkv = rearrange(linear(params["in_proj"], x), "n l (three h d) -> three n h l d", three=3, h=num_heads)
    out = dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_rate=dropout_rate, train=train, key=key)
    return linear(params["out_proj"], rearrange(out, "n h l d -> n l (h d)"))
