"""Inference on image files: masks at each input's own resolution, tiled or whole, with flip TTA.

An image (uint8 [H, W, 3], EXIF orientation applied by ``data.decode.read_rgb``) becomes logits
float32 [C, H, W] at its ORIGINAL size in one of two ways:

    whole  (default)  fitted to the training square S as training did (``Preprocess.policy``:
                      "resize" stretches to S x S; "pad" keeps the aspect ratio and pads, and the
                      padding is cropped off the logits again), one forward pass, then the logits
                      are resized bilinearly to H x W
    tiled  (tile=T)   at the image's own scale, in T x T windows overlapping by ``tile_overlap``;
                      each window's logits are weighted by a smooth (sine) window and the weighted
                      average taken, so seams do not show; a side shorter than T gets one window
                      of that side (rounded up to the stride, edge pixels replicated)

The mask is the argmax of those logits (resizing logits, not labels, keeps boundaries smooth).
``tta="flip"`` averages the logits with those of the horizontally flipped input, flipped back.

:func:`predict_files` runs a list of files (or folders) in batches of same-size inputs, writes a
palette mask PNG (mode "P": pixel value = class index) and an overlay PNG with a legend for
each, and reports failures per file instead of stopping at the first.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .core.files import write_atomic
from .core.tree import tree_map
from .data.preprocess import Preprocess
from .data.sample import fit_image
from .render import mask_image, overlay_image, png_bytes
from .runtime import Runtime, resolve_runtime

__all__ = ["IMAGE_SUFFIXES", "Predictor", "PredictResult", "output_names", "expand_inputs", "predict_files"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TTA_MODES = ("none", "flip")


def _fit(image: np.ndarray, size: int, policy: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """uint8 [H, W, 3] -> (uint8 [S, S, 3], (x0, y0, w, h) of the image inside it), as training data
    was fitted (``data.sample.fit_image``)."""
    from PIL import Image

    fitted, box = fit_image(Image.fromarray(image), size, policy)
    return np.asarray(fitted), box


def _window_1d(n: int) -> torch.Tensor:
    """Positive weights that fall smoothly towards both ends: sin(pi (t + 0.5) / n), t = 0..n-1."""
    return torch.sin(math.pi * (torch.arange(n, dtype=torch.float32) + 0.5) / n)


def _starts(length: int, window: int, step: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window, step)) + [length - window]
    return sorted(set(starts))


# ----------------------------------------------------------------------------------------------
# The predictor


@dataclass
class Predictor:
    """One model ready for inference: ``logits(images) -> [C, H, W]`` per image.

    Args:
        tile: window side T for tiled inference (rounded down to the stride), or None (whole image).
        tile_overlap: fraction of T that neighbouring windows share, in [0, 1).
        tta: "none" or "flip".
        batch_size: images (whole mode) or windows (tiled mode) per forward pass.
        runtime: device, precision and layout (``runtime.resolve_runtime()``'s "auto" if None).
    """

    model: Any
    params: dict
    state: dict
    preprocess: Preprocess
    runtime: Runtime | None = None
    tile: int | None = None
    tile_overlap: float = 0.25
    tta: str = "none"
    batch_size: int = 8

    @classmethod
    def from_checkpoint(cls, loaded, runtime: Runtime | None = None, **kwargs) -> Predictor:
        """From ``models.load_checkpoint(...)``'s result (one member)."""
        return cls(loaded.model, loaded.params, loaded.state, loaded.preprocess, runtime, **kwargs)

    def __post_init__(self):
        self.runtime = self.runtime or resolve_runtime()
        self.device = self.runtime.device
        self.precision = self.runtime.precision
        self.channels_last = self.runtime.channels_last
        if self.tta not in TTA_MODES:
            raise ValueError(f"unknown tta {self.tta!r}; expected one of {', '.join(TTA_MODES)}")
        if not 0.0 <= self.tile_overlap < 1.0:
            raise ValueError(f"tile overlap must be in [0, 1), got {self.tile_overlap}")
        stride = self.model.stride
        if self.tile is not None:
            if self.tile < stride:
                raise ValueError(f"--tile {self.tile} is smaller than the model's stride {stride}")
            self.tile -= self.tile % stride
        elif not self.preprocess.size:
            raise ValueError("the checkpoint records no training size; pass --size S (or --tile T)")
        elif self.preprocess.size % stride:
            raise ValueError(f"size {self.preprocess.size} is not a multiple of the model's stride {stride}")
        self.params, self.state = tree_map(lambda t: t.to(self.device), (self.params, self.state))

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.preprocess.class_names

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float [N, 3, h, w] -> float32 logits [N, C, h, w] (flip TTA included)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), self.runtime.autocast():
            logits, _ = self.model.apply(self.params, self.state, x, train=False)
            if self.tta == "flip":
                flipped, _ = self.model.apply(self.params, self.state, x.flip(-1), train=False)
                logits = (logits + flipped.flip(-1)) / 2
        return logits.float()

    def _model_input(self, uint8_hwc: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        batch = np.stack([uint8_hwc] if isinstance(uint8_hwc, np.ndarray) else list(uint8_hwc))  # a copy
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)
        return dataclasses.replace(self.preprocess, channels_last=False).model_input(x)

    def logits(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """uint8 [H_i, W_i, 3] each -> float32 logits [C, H_i, W_i] each, on the CPU."""
        if self.tile is not None:
            return [self._tiled(image) for image in images]
        size, policy = self.preprocess.size, self.preprocess.policy
        out: list[torch.Tensor] = []
        for first in range(0, len(images), self.batch_size):
            chunk = images[first:first + self.batch_size]
            fitted = [_fit(image, size, policy) for image in chunk]
            logits = self._forward(self._model_input([f for f, _ in fitted]))
            for image, (_, (x0, y0, w, h)), one in zip(chunk, fitted, logits):
                one = one[:, y0:y0 + h, x0:x0 + w]
                out.append(_resize_logits(one, image.shape[:2]).cpu())
        return out

    def _tiled(self, image: np.ndarray) -> torch.Tensor:
        h, w = image.shape[:2]
        stride = self.model.stride
        win_h = min(self.tile, _round_up(h, stride))
        win_w = min(self.tile, _round_up(w, stride))
        x = self._model_input(image)
        pad_h, pad_w = max(win_h - h, 0), max(win_w - w, 0)
        if pad_h or pad_w:  # a side shorter than one window: replicate its edge pixels
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        full_h, full_w = h + pad_h, w + pad_w
        step_h = max(stride, int(win_h * (1 - self.tile_overlap)))
        step_w = max(stride, int(win_w * (1 - self.tile_overlap)))
        boxes = [(y, x0) for y in _starts(full_h, win_h, step_h) for x0 in _starts(full_w, win_w, step_w)]
        weight = (_window_1d(win_h)[:, None] * _window_1d(win_w)[None, :]).to(self.device)
        total = torch.zeros(self.model.num_classes, full_h, full_w, device=self.device)
        norm = torch.zeros(1, full_h, full_w, device=self.device)
        for first in range(0, len(boxes), self.batch_size):
            chunk = boxes[first:first + self.batch_size]
            windows = torch.cat([x[:, :, y:y + win_h, x0:x0 + win_w] for y, x0 in chunk])
            logits = self._forward(windows)
            for (y, x0), one in zip(chunk, logits):
                total[:, y:y + win_h, x0:x0 + win_w] += one * weight
                norm[:, y:y + win_h, x0:x0 + win_w] += weight
        return (total / norm)[:, :h, :w].cpu()


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[C, h, w] -> [C, H, W] bilinearly (align_corners=False); unchanged when already that size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


# ----------------------------------------------------------------------------------------------
# Files in, files out


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; a folder becomes its image files (by suffix), sorted, not recursive.

    Duplicates (the same file named twice) are dropped. Missing paths are kept, so the run
    reports them as failures along with unreadable files.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES) \
            if p.is_dir() else [p]
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def output_names(paths: Sequence[Path]) -> list[Path]:
    """Per input, its output stem relative to the output folder; never the same for two inputs.

    The path relative to the inputs' common folder is kept (``a/cat.jpg`` and ``b/cat.jpg`` give
    ``a/cat`` and ``b/cat``); inputs in one folder that share a stem keep their suffix too
    (``cat.jpg`` and ``cat.png`` give ``cat_jpg`` and ``cat_png``).
    """
    if not paths:
        return []
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([r.parent for r in resolved]))
    stems = [r.parent.relative_to(root) / r.stem for r in resolved]
    counts: dict[Path, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [s.with_name(f"{s.name}_{r.suffix.lstrip('.').lower()}") if counts[s] > 1 else s
            for s, r in zip(stems, resolved)]


@dataclass(frozen=True)
class PredictResult:
    path: Path
    mask_path: Path | None = None
    overlay_path: Path | None = None
    size: tuple[int, int] | None = None  # (H, W)
    fractions: tuple[float, ...] | None = None
    error: str | None = None


def _read(path: Path) -> np.ndarray:
    from .data.decode import read_rgb

    return read_rgb(path)


def predict_files(predictor: Predictor, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                  overlay: bool = True, on_result: Callable[[PredictResult], None] | None = None
                  ) -> list[PredictResult]:
    """Predict every image in ``inputs`` (files or folders) and write ``OUT/<name>_mask.png`` and
    ``OUT/<name>_overlay.png`` for each (names from :func:`output_names`), atomically.

    An image that cannot be read gives a result with ``error`` set and the rest go on. Images
    are decoded and predicted ``predictor.batch_size`` at a time.
    """
    from .data import DataError

    paths = expand_inputs(inputs)
    names = output_names(paths)
    out_dir = Path(out_dir)
    results: list[PredictResult] = []

    def report(result: PredictResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    for first in range(0, len(paths), predictor.batch_size):
        batch: list[tuple[Path, Path, np.ndarray]] = []
        for path, name in zip(paths[first:first + predictor.batch_size], names[first:first + predictor.batch_size]):
            try:
                batch.append((path, name, _read(path)))
            except (DataError, OSError) as err:
                report(PredictResult(path=path, error=" ".join(str(err).split()) or type(err).__name__))
        if not batch:
            continue
        for (path, name, image), logits in zip(batch, predictor.logits([b[2] for b in batch])):
            mask = logits.max(0).indices.to(torch.uint8).numpy()  # argmax (first maximum), faster on CPU
            counts = np.bincount(mask.reshape(-1), minlength=predictor.model.num_classes)
            fractions = tuple(float(c) / mask.size for c in counts)
            mask_path = out_dir / f"{name}_mask.png"
            write_atomic(mask_path, png_bytes(mask_image(mask, predictor.model.num_classes)))
            overlay_path = None
            if overlay:
                overlay_path = out_dir / f"{name}_overlay.png"
                img = overlay_image(image, mask, predictor.class_names, fractions)
                write_atomic(overlay_path, png_bytes(img))
            report(PredictResult(path=path, mask_path=mask_path, overlay_path=overlay_path, size=mask.shape,
                                 fractions=fractions))
    return results


def format_result(result: PredictResult, class_names: Sequence[str]) -> str:
    """One line: ``input -> mask (pet 31.2%, background 60.1%, border 8.7%)``, or the error."""
    if result.error:
        return f"fseg: error: {result.error}" if str(result.path) in result.error else \
            f"fseg: error: {result.path}: {result.error}"
    shares = ", ".join(f"{n} {f:.1%}" for n, f in zip(class_names, result.fractions or ()))
    return f"{result.path} -> {result.mask_path} ({shares})"
