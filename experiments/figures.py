"""The experiments' figures: per-epoch curves and an image / truth / prediction grid, as PNGs.

matplotlib is imported lazily: without it the figures are skipped and everything else runs.
Files are written atomically (``core.files.write_atomic``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch

from functional_seg.core.files import write_atomic
from functional_seg.render import colour_labels

from .harness import guarded


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: figures skipped (pip install '.[experiments]')", flush=True)
        return None
    return plt


def plot_curves(histories: dict[str, list[dict]], keys: Sequence[tuple[str, str]], path: Path,
                title: str) -> Path | None:
    """One panel per (history key, label); one line per run. ``histories[name]`` is a list of epoch dicts."""
    plt = _pyplot()
    if plt is None or not histories:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for name, hist in histories.items():
            points = [(h["epoch"], h[key]) for h in hist if h.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=2.5, label=name)
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save_fig(fig, plt, path)


def _colour(mask: torch.Tensor) -> torch.Tensor:
    """Labels [H, W] -> uint8 [H, W, 3] in the library's one palette (``render.colour_labels``)."""
    return torch.from_numpy(colour_labels(mask.numpy()))


def plot_predictions(images: torch.Tensor, masks: torch.Tensor, preds: dict[str, torch.Tensor], path: Path,
                     title: str) -> Path | None:
    """Grid: one row per image; columns image / truth / one prediction per model.

    images uint8 [N, 3, S, S], masks [N, S, S], preds name -> labels [N, S, S] (all on CPU).
    """
    plt = _pyplot()
    if plt is None:
        return None
    n = images.shape[0]
    cols = ["image", "truth", *preds]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.6 * len(cols), 1.6 * n), squeeze=False)
    for i in range(n):
        panels = [images[i].permute(1, 2, 0), _colour(masks[i])] + [_colour(p[i]) for p in preds.values()]
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(panel.numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=7)
    fig.suptitle(title + "  (orange pet, dark background, white border, cream ignored)", fontsize=8)
    fig.tight_layout()
    return _save_fig(fig, plt, path)


def _save_fig(fig, plt, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    print(f"wrote {path.name}", flush=True)
    return path


def write_figures(curves: dict[str, dict], predictions: dict[str, dict], test, out: Path, stem: str, *,
                  loss_label: str, title: str) -> None:
    """The two figures every experiment writes: per-epoch curves of ``curves``' runs (train loss,
    validation pixel accuracy and mean IoU), and the image / truth / prediction grid of
    ``predictions``' runs on the first test images."""
    guarded("curves", lambda: {"path": plot_curves(
        {n: r["history"] for n, r in curves.items()},
        [("train_loss", loss_label), ("val_pixel_accuracy", "val pixel accuracy"), ("val_mean_iou", "val mean IoU")],
        out / f"{stem}_curves.png", title)})
    guarded("predictions", lambda: {"path": plot_predictions(
        *test.gather(range(min(4, len(test)))), {n: r["_preds"] for n, r in predictions.items()},
        out / f"{stem}_predictions.png", "test images (clean)")})
