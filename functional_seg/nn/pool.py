"""Max-pool that returns indices, the matching max-unpool, and bilinear/nearest resize.

``max_unpool2d`` puts values back at the flat positions recorded by the pool (as
``torch.nn.MaxUnpool2d``). For non-overlapping windows (kernel == stride, SegNet's 2x2 pools)
every value returns inside its own window, so the unpool is elementwise: each value spread
over its window, masked by "is this the recorded slot". Under compile that is one fused kernel
written in whatever layout the next conv wants, with a plain reduction as its backward; the
general case is a ``scatter``.
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


def max_unpool2d(x: torch.Tensor, indices: torch.Tensor, output_size: tuple[int, int],
                 kernel_size: int | None = None, stride: int | None = None) -> torch.Tensor:
    """Place x [N, C, h, w] at ``indices`` in a zero map [N, C, *output_size].

    Pass the pool's ``kernel_size`` (and ``stride``, default the kernel) to take the elementwise
    path when the windows do not overlap; without them, or for overlapping windows, it scatters.
    Both give the same result for indices from :func:`max_pool2d_with_indices`.
    """
    stride = stride or kernel_size
    if kernel_size is not None and kernel_size == stride:
        return _unpool_windows(x, indices, output_size, kernel_size)
    n, c = x.shape[:2]
    h, w = output_size
    out = x.new_zeros(n, c, h * w)
    out = out.scatter(2, indices.flatten(2), x.flatten(2))
    return out.reshape(n, c, h, w)


def _unpool_windows(x: torch.Tensor, indices: torch.Tensor, output_size: tuple[int, int], k: int) -> torch.Tensor:
    """Unpool for k x k windows at stride k: each index lies in its own window.

    Every pooled value is spread over its window's k*k slots, kept where the slot is the
    recorded one; the backward is then a where and a sum over the slots (a nearest upsample
    would differentiate into an atomic index_put).
    """
    *lead, h, w = x.shape
    out_h, out_w = output_size
    if k * h > out_h or k * w > out_w:
        raise ValueError(f"max_unpool2d: output_size {tuple(output_size)} is smaller than {k} x the pooled size "
                         f"{(h, w)}")
    rows = torch.arange(h, device=x.device) * k
    cols = torch.arange(w, device=x.device) * k
    # slot of the max inside its window, dy * k + dx in [0, k*k)
    slot = (indices // out_w - rows[:, None]) * k + (indices % out_w - cols)
    slots = torch.arange(k * k, device=x.device)
    spread = torch.where(slot[..., None] == slots, x[..., None], 0.0)  # [..., h, w, k*k]
    out = spread.unflatten(-1, (k, k)).transpose(-3, -2).reshape(*lead, k * h, k * w)  # [..., h, dy, w, dx]
    if (k * h, k * w) != (out_h, out_w):  # the pool floored an odd size: zero rows / columns at the end
        out = F.pad(out, (0, out_w - k * w, 0, out_h - k * h))
    return out


def resize(x: torch.Tensor, size: tuple[int, int], *, mode: str = "bilinear") -> torch.Tensor:
    """Resize [N, C, H, W] to ``size``; bilinear uses align_corners=False (torch's default)."""
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(x, size=size, mode=mode, align_corners=False)
    return F.interpolate(x, size=size, mode=mode)  # nearest, nearest-exact, area take no align_corners
