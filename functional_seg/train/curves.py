"""``curves.png`` in the run directory: training loss, pixel accuracy and mean IoU per epoch.

Drawn with PIL alone (matplotlib is only an experiments extra), redrawn after every epoch and
written atomically, so the picture always matches metrics.jsonl. For an ensemble each member is
one line in its own colour.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

from ..core.files import write_atomic

__all__ = ["CurvesPlot", "draw_curves"]

_PANELS = (("train loss", "train_loss", None), ("pixel accuracy", "train_pixel_accuracy", "pixel_accuracy"),
           ("mean IoU (validation)", None, "mean_iou"))
_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
_W, _H, _PAD = 300, 220, 34


def _series(history: list[dict], train_key: str | None, val_key: str | None) -> dict[str, list[tuple]]:
    """name -> [(epoch, value)] for the train and validation lines of one panel."""
    out: dict[str, list[tuple]] = {}
    for r in history:
        for kind, key, source in (("train", train_key, r), ("val", val_key, r.get("val"))):
            if key is None or source is None:
                continue
            values = [source[key]] if not isinstance(source, list) else [s[key] for s in source]
            if isinstance(source, dict) and isinstance(source.get(key), list):
                values = source[key]  # an ensemble's train metrics: one value per member
            for i, v in enumerate(values):
                if isinstance(v, (int, float)) and v == v:
                    out.setdefault(f"{kind} {i}" if len(values) > 1 else kind, []).append((r["epoch"], float(v)))
    return out


def draw_curves(history: list[dict]):
    """A PIL image with one panel per curve family (loss, pixel accuracy, mean IoU)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (_W * len(_PANELS), _H), "white")
    draw = ImageDraw.Draw(image)
    for p, (title, train_key, val_key) in enumerate(_PANELS):
        x0, lines = p * _W, _series(history, train_key, val_key)
        draw.text((x0 + _PAD, 6), title, fill="black")
        box = (x0 + _PAD, _PAD, x0 + _W - 10, _H - _PAD)
        draw.rectangle(box, outline=(160, 160, 160))
        points = [pt for pts in lines.values() for pt in pts]
        if not points:
            continue
        xs, ys = [e for e, _ in points], [v for _, v in points]
        lo_x, hi_x, lo_y, hi_y = min(xs), max(xs), min(ys), max(ys)
        span_x, span_y = (hi_x - lo_x) or 1.0, (hi_y - lo_y) or 1.0
        draw.text((x0 + 2, box[1]), f"{hi_y:.3g}", fill="black")
        draw.text((x0 + 2, box[3] - 10), f"{lo_y:.3g}", fill="black")
        draw.text((box[0], box[3] + 4), f"epoch {lo_x:g}", fill="black")
        draw.text((box[2] - 60, box[3] + 4), f"epoch {hi_x:g}", fill="black")
        for i, (name, pts) in enumerate(sorted(lines.items())):
            colour = _COLOURS[i % len(_COLOURS)]
            xy = [(box[0] + (e - lo_x) / span_x * (box[2] - box[0]),
                   box[3] - (v - lo_y) / span_y * (box[3] - box[1])) for e, v in pts]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for cx, cy in xy:
                draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=colour)
            draw.text((box[2] - 70, box[1] + 4 + 12 * i), name, fill=colour)
    return image


class CurvesPlot:
    """A ``fit`` hook that redraws ``RUN_DIR/curves.png`` from metrics.jsonl after every epoch
    (so a resumed run's picture holds the epochs before the resume too)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / "curves.png"
        self.metrics = Path(run_dir) / "metrics.jsonl"

    def on_epoch_end(self, record: dict, epochs: int) -> None:
        history = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                history.append(json.loads(line))
        buffer = io.BytesIO()
        draw_curves(history or [record]).save(buffer, format="PNG")
        write_atomic(self.path, buffer.getvalue())
