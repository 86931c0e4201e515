"""Pure 2-D convolutions: regular, grouped/depthwise, depthwise-separable and transposed.

Params are dicts ``{"weight": [C_out, C_in/groups, k, k], "bias": [C_out]}``; static
hyperparameters (stride, padding, groups) are passed at apply time, as the model's cfg
knows them. x is float [N, C_in, H, W].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import random as jr
from ._init import kaiming_uniform


def init_conv2d(
    key: torch.Tensor, in_channels: int, out_channels: int, kernel_size: int, *, groups: int = 1,
    bias: bool = True,
) -> dict:
    """Kaiming-uniform weights exactly as ``torch.nn.Conv2d`` draws them (bound 1/sqrt(fan_in))."""
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"channels ({in_channels}->{out_channels}) must be divisible by groups={groups}")
    w_key, b_key = jr.split(key)
    fan_in = in_channels // groups * kernel_size * kernel_size
    params = {"weight": kaiming_uniform(w_key, (out_channels, in_channels // groups, kernel_size, kernel_size),
                                        fan_in)}
    if bias:
        params["bias"] = kaiming_uniform(b_key, (out_channels,), fan_in)
    return params


def conv2d(params: dict, x: torch.Tensor, *, stride: int = 1, padding: int | str = 0, dilation: int = 1,
           groups: int = 1) -> torch.Tensor:
    return F.conv2d(x, params["weight"], params.get("bias"), stride, padding, dilation, groups)


def init_separable_conv2d(key: torch.Tensor, in_channels: int, out_channels: int, kernel_size: int, *,
                          bias: bool = False) -> dict:
    """Depthwise k x k (groups = C_in) then pointwise 1x1: (k*k + C_out) * C_in weights."""
    dw_key, pw_key = jr.split(key)
    return {
        "depthwise": init_conv2d(dw_key, in_channels, in_channels, kernel_size, groups=in_channels, bias=bias),
        "pointwise": init_conv2d(pw_key, in_channels, out_channels, 1, bias=bias),
    }


def separable_conv2d(params: dict, x: torch.Tensor, *, stride: int = 1, padding: int | str = 0,
                     dilation: int = 1) -> torch.Tensor:
    groups = params["depthwise"]["weight"].shape[0]
    x = conv2d(params["depthwise"], x, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return conv2d(params["pointwise"], x)


def init_conv_transpose2d(key: torch.Tensor, in_channels: int, out_channels: int, kernel_size: int, *,
                          bias: bool = True) -> dict:
    """Weights [C_in, C_out, k, k]; torch computes fan_in from dim 1 (C_out * k * k) here."""
    w_key, b_key = jr.split(key)
    fan_in = out_channels * kernel_size * kernel_size
    params = {"weight": kaiming_uniform(w_key, (in_channels, out_channels, kernel_size, kernel_size), fan_in)}
    if bias:
        params["bias"] = kaiming_uniform(b_key, (out_channels,), fan_in)
    return params


def conv_transpose2d(params: dict, x: torch.Tensor, *, stride: int = 1, padding: int = 0) -> torch.Tensor:
    return F.conv_transpose2d(x, params["weight"], params.get("bias"), stride, padding)
