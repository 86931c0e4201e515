"""Pure linear layer: params ``{"weight": [out, in], "bias": [out]}``, x [..., in] -> [..., out]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import random as jr
from ._init import kaiming_uniform


def init_linear(key: torch.Tensor, in_features: int, out_features: int, *, bias: bool = True) -> dict:
    """Same distribution as ``torch.nn.Linear``: U(+-1/sqrt(in_features)) for weight and bias."""
    w_key, b_key = jr.split(key)
    params = {"weight": kaiming_uniform(w_key, (out_features, in_features), in_features)}
    if bias:
        params["bias"] = kaiming_uniform(b_key, (out_features,), in_features)
    return params


def linear(params: dict, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, params["weight"], params.get("bias"))
