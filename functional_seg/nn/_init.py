"""Weight initialisers drawn from explicit keys, with torch's default schemes."""

from __future__ import annotations

import math

import torch

from ..core import random as jr


def uniform_init(key: torch.Tensor, shape: tuple[int, ...], bound: float) -> torch.Tensor:
    return jr.uniform(key, shape, low=-bound, high=bound)


def kaiming_uniform(key: torch.Tensor, shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    """torch's default for conv/linear weights: kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in))."""
    return uniform_init(key, shape, 1.0 / math.sqrt(fan_in))


def trunc_normal(key: torch.Tensor, shape: tuple[int, ...], std: float = 0.02) -> torch.Tensor:
    """Normal(0, std) truncated at +-2 std by clamping (as ViT implementations init embeddings)."""
    return (jr.normal(key, shape) * std).clamp(-2 * std, 2 * std)
