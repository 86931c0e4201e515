"""Activations and dropout. Dropout draws its mask from an explicit key, never global RNG."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import random as jr

relu = F.relu
gelu = F.gelu
silu = F.silu
sigmoid = torch.sigmoid


def dropout(x: torch.Tensor, rate: float, *, train: bool, key: torch.Tensor | None = None) -> torch.Tensor:
    """Inverted dropout: zero each element with probability ``rate`` and scale the rest by 1/(1-rate).

    Identity in eval or when rate == 0. In training a key is required (raises otherwise).
    """
    if not train or rate == 0.0:
        return x
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if key is None:
        raise ValueError("dropout in training needs a key (key=...), got None")
    keep = jr.bernoulli(key, 1.0 - rate, x.shape)
    return torch.where(keep, x / (1.0 - rate), torch.zeros_like(x))


def channel_dropout(x: torch.Tensor, rate: float, *, train: bool, key: torch.Tensor | None = None) -> torch.Tensor:
    """Spatial dropout (``torch.nn.Dropout2d``): zero whole channels of x [N, C, H, W] with probability
    ``rate`` (one draw per sample and channel) and scale the rest by 1/(1-rate).

    Identity in eval or when rate == 0. In training a key is required (raises otherwise).
    """
    if not train or rate == 0.0:
        return x
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if key is None:
        raise ValueError("dropout in training needs a key (key=...), got None")
    keep = jr.bernoulli(key, 1.0 - rate, (x.shape[0], x.shape[1], 1, 1))
    return torch.where(keep, x / (1.0 - rate), torch.zeros_like(x))
