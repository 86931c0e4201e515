"""Reliability diagrams of calibration counts, drawn with PIL alone (no matplotlib in the library).

``reliability_diagram(counts)`` draws the counts float [3, B] of
:func:`functional_seg.metrics.calibration_counts` (summed over a split) as Guo et al. (ICML
2017) do: per confidence bin, a blue bar up to the bin's accuracy and a translucent red gap
between the accuracy and the bin's mean confidence (red above a bar: over-confident), the
diagonal of perfect calibration, and the ECE, MCE, bin count and pixel count in the header. A
strip below shows each bin's share of the pixels (scaled to the fullest bin), since the bars
of nearly empty bins are noise. Empty bins draw nothing. ``save_reliability_diagram`` writes
the PNG atomically. This module imports PIL at the top; nothing in the train step imports it.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .core.files import write_atomic
from .metrics import ece, mce, reliability

__all__ = ["BAR", "GAP", "reliability_diagram", "save_reliability_diagram"]

BAR = (52, 101, 164)  # accuracy bars
GAP = (220, 40, 40)  # the calibration gap, drawn at GAP_ALPHA over whatever lies below
GAP_ALPHA = 110
_GRID = (225, 225, 225)
_INK = (40, 40, 40)
_DIAGONAL = (120, 120, 120)
_STRIP = (150, 150, 150)


class _Frame:
    """Pixel geometry of the plot: a square of side ``side`` with its top-left at (left, top)."""

    def __init__(self, size: int):
        self.left, self.top, self.side = 44, 40, size - 44 - 16
        self.strip_top = self.top + self.side + 30
        self.strip_height = max(16, size // 8)
        self.height = self.strip_top + self.strip_height + 8

    def x(self, value: float) -> int:
        return round(self.left + value * self.side)

    def y(self, value: float) -> int:
        return round(self.top + (1 - value) * self.side)


def _axes(draw: ImageDraw.ImageDraw, f: _Frame, font) -> None:
    for v in (0.2, 0.4, 0.6, 0.8):
        draw.line([(f.x(v), f.y(0)), (f.x(v), f.y(1))], fill=_GRID)
        draw.line([(f.x(0), f.y(v)), (f.x(1), f.y(v))], fill=_GRID)
    for v in (0.0, 0.5, 1.0):
        draw.text((f.x(v), f.y(0) + 4), f"{v:g}", fill=_INK, font=font, anchor="mt")
        draw.text((f.x(0) - 4, f.y(v)), f"{v:g}", fill=_INK, font=font, anchor="rm")
    draw.text((f.x(0.5), f.y(0) + 16), "confidence", fill=_INK, font=font, anchor="mt")
    draw.text((f.x(0) - 4, f.top - 6), "accuracy", fill=_INK, font=font, anchor="rb")


def _bins(image: Image.Image, f: _Frame, confidence: list[float], accuracy: list[float], fraction: list[float]):
    draw = ImageDraw.Draw(image)
    gaps = Image.new("RGBA", image.size, (0, 0, 0, 0))
    gap_draw = ImageDraw.Draw(gaps)
    b = len(confidence)
    peak = max((v for v in fraction if not math.isnan(v)), default=0.0)
    for i, (conf, acc, share) in enumerate(zip(confidence, accuracy, fraction)):
        if math.isnan(acc):
            continue
        x0, x1 = f.x(i / b) + 1, f.x((i + 1) / b) - 1
        if f.y(acc) < f.y(0):
            draw.rectangle([x0, f.y(acc), x1, f.y(0) - 1], fill=BAR)
        top, bottom = sorted((f.y(acc), f.y(conf)))
        if bottom > top:
            gap_draw.rectangle([x0, top, x1, bottom - 1], fill=(*GAP, GAP_ALPHA))
        if peak > 0 and share > 0:
            height = max(1, round(f.strip_height * share / peak))
            draw.rectangle([x0, f.strip_top + f.strip_height - height, x1, f.strip_top + f.strip_height - 1],
                           fill=_STRIP)
    image.alpha_composite(gaps)


def reliability_diagram(counts: Tensor, *, size: int = 480, title: str | None = None) -> Image.Image:
    """Draw calibration counts [3, B] as a reliability diagram.

    Args:
        counts: float [3, B] from ``metrics.calibration_counts``, summed over the split.
        size: the image width in pixels (the plot is square; the height adds the strip).
        title: an optional first header line (a run or model name).

    Returns:
        an RGB ``PIL.Image.Image`` of ``size`` x (about 1.2 ``size``) pixels.
    """
    if not isinstance(counts, Tensor) or counts.ndim != 2 or counts.shape[0] != 3:
        got = list(counts.shape) if isinstance(counts, Tensor) else type(counts)
        raise ValueError(f"counts must be calibration counts [3, B] (sum any batch axes first); got {got}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 160:
        raise ValueError(f"size must be an int >= 160 pixels; got {size!r}")
    counts = counts.detach().cpu()
    confidence, accuracy, fraction = (t.tolist() for t in reliability(counts))
    f = _Frame(size)
    image = Image.new("RGBA", (size, f.height), (255, 255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    _axes(draw, f, font)
    _bins(image, f, confidence, accuracy, fraction)
    draw = ImageDraw.Draw(image)
    draw.line([(f.x(0), f.y(0)), (f.x(1), f.y(1))], fill=_DIAGONAL, width=1)
    draw.rectangle([f.x(0), f.y(1), f.x(1), f.y(0)], outline=_INK)
    header = (f"ECE {float(ece(counts)):.4f}   MCE {float(mce(counts)):.4f}   "
              f"{counts.shape[1]} bins   {int(counts[0].sum()):,} px")
    draw.text((f.x(0), 4), title or "reliability", fill=_INK, font=font)
    draw.text((f.x(0), 18), header, fill=_INK, font=font)
    draw.text((f.x(0), f.strip_top - 4), "share of pixels per bin", fill=_INK, font=font, anchor="lb")
    return image.convert("RGB")


def save_reliability_diagram(path: str | os.PathLike, counts: Tensor, **kwargs) -> Path:
    """Write :func:`reliability_diagram` (same keyword arguments) as a PNG, atomically."""
    buffer = io.BytesIO()
    reliability_diagram(counts, **kwargs).save(buffer, format="PNG")
    return write_atomic(path, buffer.getvalue())


def save_summary_diagrams(path: str | os.PathLike, summary, *, title: str | None = None) -> list[Path]:
    """The diagram of an evaluation summary with ``calibration_counts`` (``evaluate(detail=True)``); a
    list of summaries (an ensemble) gives ``<stem>-member<i>.png`` each."""
    path = Path(path)
    if isinstance(summary, dict):
        return [save_reliability_diagram(path, torch.tensor(summary["calibration_counts"]), title=title)]
    return [save_reliability_diagram(path.with_name(f"{path.stem}-member{i}{path.suffix}"),
                                     torch.tensor(s["calibration_counts"]), title=f"{title or ''} member {i}".strip())
            for i, s in enumerate(summary)]
