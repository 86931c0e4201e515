"""Max-pool that returns indices, the matching max-unpool, and bilinear/nearest resize.

``max_unpool2d`` scatters values back to the flat positions recorded by the pool (as
``torch.nn.MaxUnpool2d``), written with ``scatter`` so it vmaps and compiles cleanly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def max_pool2d_with_indices(x: torch.Tensor, kernel_size: int = 2, stride: int | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, C, H, W] -> (pooled [N, C, H', W'], flat indices into H*W, int64)."""
    return F.max_pool2d(x, kernel_size, stride or kernel_size, return_indices=True)


def max_pool2d(x: torch.Tensor, kernel_size: int = 2, stride: int | None = None) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size, stride or kernel_size)


def max_unpool2d(x: torch.Tensor, indices: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """Place x [N, C, h, w] at ``indices`` in a zero map [N, C, *output_size]."""
    n, c = x.shape[:2]
    h, w = output_size
    out = x.new_zeros(n, c, h * w)
    out = out.scatter(2, indices.flatten(2), x.flatten(2))
    return out.reshape(n, c, h, w)


def resize(x: torch.Tensor, size: tuple[int, int], *, mode: str = "bilinear") -> torch.Tensor:
    """Resize [N, C, H, W] to ``size``; bilinear uses align_corners=False (torch's default)."""
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(x, size=size, mode=mode, align_corners=False)
    return F.interpolate(x, size=size, mode=mode)  # nearest, nearest-exact, area take no align_corners
