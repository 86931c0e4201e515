"""Full-size maps from small logits, one horizontal strip at a time, in memory bounded by a strip.

Predicting an 8000 x 6000 photo must not hold C x 8000 x 6000 float logits (4 GB for 21
classes): every map we write (mask, uncertainty) needs only a few rows of logits at a time. Two
generators produce logits float [P, C, rows, W] (P predictions: ensemble members and/or test-time
views) for consecutive row ranges that together cover the image top to bottom:

    resized_strips(logits, (H, W), rows)   small logits [P, C, h, w] resized bilinearly to H x W,
                                           the values ``F.interpolate(..., "bilinear",
                                           align_corners=False)`` gives (same indices, weights and
                                           order of operations), ``rows`` output rows at a time
    blended_strips(windows, tiling, ...)   sliding windows blended by a smooth weight, band by
                                           band: a row is emitted as soon as no later window
                                           touches it, so only about one window-height of rows
                                           is ever held

``strip_rows`` turns a byte budget into a strip height. Everything is a pure tensor function of
its inputs on whatever device they live on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["strip_rows", "linear_taps", "resized_strips", "Tiling", "tiling", "blended_strips", "window_weight"]


def strip_rows(budget_bytes: int, bytes_per_row: int) -> int:
    """How many rows of ``bytes_per_row`` fit in ``budget_bytes`` (at least one)."""
    return max(1, int(budget_bytes) // max(1, int(bytes_per_row)))


def linear_taps(in_size: int, out_size: int, start: int, stop: int, device=None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Source indices and weights of output positions ``start..stop-1`` for a linear resize.

    PyTorch's rule for ``align_corners=False`` (``area_pixel_compute_source_index`` and
    ``guard_index_and_lambda`` in ATen), in float32: scale = in / out, src = max(scale (d + 0.5)
    - 0.5, 0) rounded once, i0 = min(floor(src), in - 1), i1 = i0 + 1 except at the last input, w1 = src - i0
    clamped to [0, 1], w0 = 1 - w1; equal sizes copy (w0 = 1, w1 = 0).

    Returns:
        i0, i1: int64 [stop - start]; w0, w1: float32 [stop - start].
    """
    dst = torch.arange(start, stop, device=device)
    if in_size == out_size:
        ones = torch.ones(stop - start, device=device)
        return dst, dst, ones, torch.zeros_like(ones)
    scale = torch.tensor(float(in_size), dtype=torch.float32) / out_size
    # one rounding of scale (d + 0.5) - 0.5, as ATen's compiled fused multiply-add gives (the product
    # of a float32 and d + 0.5 is exact in float64)
    src = (scale.double().to(device) * (dst.double() + 0.5) - 0.5).float().clamp_min(0.0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    w1 = (src - i0.float()).clamp(0.0, 1.0)
    i1 = i0 + (i0 < in_size - 1).long()
    return i0, i1, 1.0 - w1, w1


def resized_strips(logits: Tensor, size: tuple[int, int], rows: int) -> Iterator[tuple[int, Tensor]]:
    """Bilinear resize of ``logits`` [..., h, w] to ``size`` (H, W), yielded as (first row, strip).

    Each strip is float [..., r, W] with r <= ``rows``; together they equal
    ``F.interpolate(logits, size, mode="bilinear", align_corners=False)``: the same taps and
    weights (:func:`linear_taps`), combined columns first, then rows, as ATen does, in float32
    (ATen's compiled kernels may fuse a multiply-add: the two agree to an ulp or two). Only the
    source rows a strip needs are resized across, so memory is O(rows x W) whatever H is.
    """
    height, width = size
    j0, j1, b0, b1 = linear_taps(logits.shape[-1], width, 0, width, logits.device)
    for first in range(0, height, rows):
        last = min(first + rows, height)
        i0, i1, a0, a1 = linear_taps(logits.shape[-2], height, first, last, logits.device)
        lo, hi = int(i0[0]), int(i1[-1]) + 1  # source rows are monotone in the output row
        src = logits[..., lo:hi, :]
        across = src[..., j0] * b0 + src[..., j1] * b1  # [..., hi - lo, W]
        yield first, across[..., i0 - lo, :] * a0[:, None] + across[..., i1 - lo, :] * a1[:, None]


def window_weight(height: int, width: int, device=None) -> Tensor:
    """float32 [height, width]: sin(pi (t + 0.5) / n) along each side, multiplied; positive everywhere,
    falling smoothly towards the window's edges, so overlapping windows blend without seams."""

    def one(n: int) -> Tensor:
        return torch.sin(math.pi * (torch.arange(n, dtype=torch.float32) + 0.5) / n)

    return (one(height)[:, None] * one(width)[None, :]).to(device)


def _starts(length: int, window: int, step: int) -> list[int]:
    if length <= window:
        return [0]
    return sorted(set(range(0, length - window, step)) | {length - window})


@dataclass(frozen=True)
class Tiling:
    """Where the windows of an image go: a canvas of ``canvas`` (H', W') >= the image (a side
    shorter than one window is padded up to it), windows ``window`` (h, w) at rows ``ys`` x
    columns ``xs``, in row-major order."""

    size: tuple[int, int]
    canvas: tuple[int, int]
    window: tuple[int, int]
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def boxes(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]


def tiling(size: tuple[int, int], tile: int, overlap: float, stride: int) -> Tiling:
    """Windows of side ``tile`` (a side shorter than that: one window of that side rounded up to
    ``stride``) whose neighbours share a fraction ``overlap``, covering an image of ``size``."""
    h, w = size
    win_h = min(tile, -(-h // stride) * stride)
    win_w = min(tile, -(-w // stride) * stride)
    full_h, full_w = max(h, win_h), max(w, win_w)
    step_h = max(stride, int(win_h * (1 - overlap)))
    step_w = max(stride, int(win_w * (1 - overlap)))
    return Tiling((h, w), (full_h, full_w), (win_h, win_w), tuple(_starts(full_h, win_h, step_h)),
                  tuple(_starts(full_w, win_w, step_w)))


def blended_strips(windows: Callable[[Sequence[tuple[int, int]]], Tensor], plan: Tiling, *, batch_size: int,
                   rows: int, weight: Tensor | None = None) -> Iterator[tuple[int, Tensor]]:
    """The weighted average of overlapping window logits, yielded as (first row, strip).

    Args:
        windows: boxes [(y, x), ...] -> logits float [P, B, C, h, w] of those windows (the caller
            crops and runs the model); called with up to ``batch_size`` boxes, in row-major order,
            a call never mixing part of a band with another band.
        plan: from :func:`tiling`.
        rows: the most rows per yielded strip.
        weight: float [h, w] per-window weight (default :func:`window_weight`).

    Yields:
        (first row, float [P, C, r, W]) for consecutive rows of the image (canvas padding cut off):
        sum_k weight_k logits_k / sum_k weight_k over the windows k covering each pixel, added in
        row-major window order. Rows are emitted once every window that touches them is in, so
        the sums held span one window height (plus, for bands narrower than a batch, the other
        bands of that batch) by W: ~C x T x W floats for T x T tiles, whatever the image height.
    """
    (h, w), (win_h, win_w), full_w = plan.size, plan.window, plan.canvas[1]
    per_band = len(plan.xs)
    acc = norm = None
    top, done = 0, 0  # acc holds canvas rows [top, top + acc.shape[-2]); done: windows blended so far
    for chunk in _band_chunks(plan.boxes, per_band, batch_size):
        logits = windows(chunk)
        if weight is None:
            weight = window_weight(win_h, win_w, logits.device)
        acc, norm = _cover(acc, norm, top, max(y for y, _ in chunk) + win_h, logits, full_w)
        for (y, x), one in zip(chunk, logits.unbind(1)):
            acc[:, :, y - top:y - top + win_h, x:x + win_w] += one * weight
            norm[y - top:y - top + win_h, x:x + win_w] += weight
        done += len(chunk)
        bands_done = done // per_band
        final = min(plan.ys[bands_done] if bands_done < len(plan.ys) else h, h)  # no later window reaches above
        for row in range(top, final, rows):
            end = min(row + rows, final)
            yield row, acc[:, :, row - top:end - top, :w] / norm[row - top:end - top, :w]
        acc, norm = _drop(acc, norm, final - top)
        top = final


def _band_chunks(boxes: list[tuple[int, int]], per_band: int, batch_size: int) -> Iterator[list[tuple[int, int]]]:
    """Row-major chunks of at most ``batch_size`` boxes that cross no band boundary, except that whole
    bands narrower than a batch share one (so the sums held span one window height plus the extra
    bands of one batch, and narrow images still run full batches)."""
    chunk: list[tuple[int, int]] = []
    for first in range(0, len(boxes), per_band):
        band = boxes[first:first + per_band]
        if chunk and len(chunk) + len(band) > batch_size:
            yield chunk
            chunk = []
        if len(band) >= batch_size:
            yield from (band[i:i + batch_size] for i in range(0, len(band), batch_size))
        else:
            chunk += band
    if chunk:
        yield chunk


def _cover(acc: Tensor | None, norm: Tensor | None, top: int, bottom: int, like: Tensor, width: int
           ) -> tuple[Tensor, Tensor]:
    """Sums covering canvas rows [top, bottom): the held ones, zero-extended where needed."""
    need = bottom - top
    if acc is not None and acc.shape[-2] >= need:
        return acc, norm
    grown = like.new_zeros(like.shape[0], like.shape[2], need, width)
    grown_norm = like.new_zeros(need, width)
    if acc is not None:
        grown[:, :, :acc.shape[-2]] = acc
        grown_norm[:norm.shape[0]] = norm
    return grown, grown_norm


def _drop(acc: Tensor, norm: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Shift out the first ``n`` (emitted) rows in place, zeroing the rows freed at the bottom.

    Rows move up in blocks of ``n``, so no block overlaps its destination and nothing is copied twice.
    """
    if n <= 0:
        return acc, norm
    rows = acc.shape[-2]
    for dst in range(0, rows - n, n):
        size = min(n, rows - n - dst)
        acc[:, :, dst:dst + size] = acc[:, :, dst + n:dst + n + size]
        norm[dst:dst + size] = norm[dst + n:dst + n + size]
    acc[:, :, max(rows - n, 0):] = 0
    norm[max(rows - n, 0):] = 0
    return acc, norm
