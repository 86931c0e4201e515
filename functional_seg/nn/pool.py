"""Max-pool that returns indices, the matching max-unpool, and bilinear/nearest resize.

``max_unpool2d`` puts values back at the flat positions recorded by the pool (as
``torch.nn.MaxUnpool2d``). For non-overlapping windows (kernel == stride, SegNet's 2x2 pools)
every value returns inside its own window, so the unpool is elementwise: each value spread
over its window, masked by "is this the recorded slot". Under compile that is one fused kernel
that writes channels-last, with a plain reduction as its backward; the general case is a
``scatter``. In eager mode outside ``vmap`` the windowed form runs as a dozen separate ops whose
temporaries and saved mask cost memory (SegNet widths 16..64, batch 32, CPU: +170 MB of peak
step memory), so there, for an NCHW-contiguous x, ATen's ``max_unpool2d`` runs instead: one kernel, its
backward a gather that keeps only the indices, an NCHW result. (A channels-last x keeps the
windowed form and a channels-last result; ATen's kernel has no vmap batch rule, hence the
windowed form under vmap.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.autodiff import eager_outside

_VMAP = frozenset({"Vmap"})


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
        if x.dim() == 4 and x.is_contiguous() and eager_outside(_VMAP):
            return F.max_unpool2d(x, indices, kernel_size, stride, output_size=tuple(output_size))
        return _unpool_windows(x, indices, output_size, kernel_size)
    n, c = x.shape[:2]
    h, w = output_size
    out = x.new_zeros(n, c, h * w)
    out = out.scatter(2, indices.flatten(2), x.flatten(2))
    return out.reshape(n, c, h, w)


def _unpool_windows(x: torch.Tensor, indices: torch.Tensor, output_size: tuple[int, int], k: int) -> torch.Tensor:
    """Unpool for k x k windows at stride k: each index lies in its own window.

    Every pooled value is spread over its window's k*k slots and kept where the slot is the
    recorded one. The spreading is done channels-last ([N, h, w, C] views), so the result is
    channels-last: under compile the one fused kernel writes straight into the layout the next
    conv reads (laid out NCHW, cuDNN converted every decoder conv's input: 1.9 ms per SegNet step
    on an H200). The backward is a where and a sum over the slots; a nearest upsample instead
    differentiates into an atomic index_put (0.9 ms per step there).
    """
    if x.dim() != 4:
        raise ValueError(f"max_unpool2d: expected x [N, C, h, w], got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    out_h, out_w = output_size
    if k * h > out_h or k * w > out_w:
        raise ValueError(f"max_unpool2d: output_size {tuple(output_size)} is smaller than {k} x the pooled size "
                         f"{(h, w)}")
    rows = torch.arange(h, device=x.device) * k
    cols = torch.arange(w, device=x.device) * k
    # slot of the max inside its window, dy * k + dx in [0, k*k)
    slot = (indices // out_w - rows[:, None]) * k + (indices % out_w - cols)
    slots = torch.arange(k * k, device=x.device)
    x_hwc, slot_hwc = x.permute(0, 2, 3, 1), slot.permute(0, 2, 3, 1)  # [N, h, w, C]
    spread = torch.where(slot_hwc[..., None] == slots, x_hwc[..., None], 0.0)  # [N, h, w, C, k*k]
    # [N, h, w, C, dy, dx] -> [N, h, dy, w, dx, C] -> [N, k*h, k*w, C] -> [N, C, k*h, k*w]
    out = spread.unflatten(-1, (k, k)).permute(0, 1, 4, 2, 5, 3).reshape(n, k * h, k * w, c).permute(0, 3, 1, 2)
    if (k * h, k * w) != (out_h, out_w):  # the pool floored an odd size: zero rows / columns at the end
        out = F.pad(out, (0, out_w - k * w, 0, out_h - k * h))
    return out


def resize(x: torch.Tensor, size: tuple[int, int], *, mode: str = "bilinear", align_corners: bool = False
           ) -> torch.Tensor:
    """Resize [N, C, H, W] to ``size``; bilinear and bicubic use ``align_corners`` (False: torch's default;
    True: corner pixels stay put, as SMP's decoders upsample)."""
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(x, size=size, mode=mode, align_corners=align_corners)
    return F.interpolate(x, size=size, mode=mode)  # nearest, nearest-exact, area take no align_corners
