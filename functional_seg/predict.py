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
import io
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .core.files import write_atomic
from .core.tree import tree_map
from .data.preprocess import Preprocess
from .runtime import autocast, resolve_channels_last, resolve_device, resolve_precision

__all__ = ["IMAGE_SUFFIXES", "preprocess_of", "load_for_inference", "Predictor", "PredictResult",
           "palette", "mask_image", "overlay_image", "output_names", "expand_inputs", "predict_files"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TTA_MODES = ("none", "flip")


# ----------------------------------------------------------------------------------------------
# Checkpoint -> model, weights and preprocessing


def preprocess_of(meta: Mapping[str, Any]) -> Preprocess:
    """The checkpoint's :class:`Preprocess` (``meta["preprocess"]``), or, for files that predate
    it, one at the training size ``meta["args"]["size"]`` with the default normalisation."""
    if meta.get("preprocess"):
        return Preprocess.from_dict(meta["preprocess"])
    size = (meta.get("args") or {}).get("size")
    return Preprocess(size=int(size) if size else None)


def _load_model(path, *, device, weights: str):
    try:
        from .models.saved import load_model
    except ImportError:  # before the loader moved next to the models
        from .checkpoint import load_model
    kwargs = {"weights": weights} if weights == "ema" else {}  # older loaders know only params
    return load_model(path, device=device, **kwargs)


def load_for_inference(checkpoint: str | os.PathLike, *, device: torch.device | str = "cpu",
                       weights: str = "params", member: int | None = None):
    """Load one model from a checkpoint: ``(model, params, state, preprocess, meta)``.

    Args:
        weights: "params" or "ema".
        member: which member of an ensemble checkpoint (default 0); must be None or 0 otherwise.
    Raises:
        ValueError: ``member`` out of range (the message says how many members there are).
    """
    model, params, state, meta = _load_model(checkpoint, device=device, weights=weights)
    k = int(meta.get("ensemble") or 0)
    if k:
        i = member or 0
        if not 0 <= i < k:
            raise ValueError(f"--member {member} out of range: {checkpoint} holds {k} members (0..{k - 1})")
        params, state = tree_map(lambda t: t[i], params), tree_map(lambda t: t[i], state)
    elif member not in (None, 0):
        raise ValueError(f"--member {member}: {checkpoint} holds a single model, not an ensemble")
    preprocess = preprocess_of(meta)
    if preprocess.num_classes != model.num_classes:  # class names the run did not record: number them
        names = tuple(f"class {i}" for i in range(model.num_classes))
        preprocess = dataclasses.replace(preprocess, class_names=names)
    return model, params, state, preprocess, meta


# ----------------------------------------------------------------------------------------------
# Fitting an image to the training square, as data preparation did


def _fit(image: np.ndarray, size: int, policy: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """uint8 [H, W, 3] -> (uint8 [S, S, 3], (x0, y0, w, h) of the image inside it).

    The same arithmetic as ``data.oxford_pets._resize_pair`` (PIL bilinear, which antialiases on
    downscale; "pad" fits the long side and centres the image on black).
    """
    from PIL import Image

    img = Image.fromarray(image)
    if policy == "resize":
        return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR)), (0, 0, size, size)
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    x0, y0 = (size - nw) // 2, (size - nh) // 2
    canvas.paste(img.resize((nw, nh), Image.Resampling.BILINEAR), (x0, y0))
    return np.asarray(canvas), (x0, y0, nw, nh)


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
        precision: "auto", "fp32" or "bf16" (resolved against the device).
    """

    model: Any
    params: dict
    state: dict
    preprocess: Preprocess
    device: torch.device | str = "cpu"
    tile: int | None = None
    tile_overlap: float = 0.25
    tta: str = "none"
    batch_size: int = 8
    precision: str = "auto"

    def __post_init__(self):
        self.device = resolve_device(self.device)
        self.precision = resolve_precision(self.precision, self.device)
        self.channels_last = resolve_channels_last(None, self.device)
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
        with torch.no_grad(), autocast(self.precision, self.device.type):
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
# Pictures: palette mask and overlay with a legend

# pet, background, border first (the Oxford pets labels), then well-separated colours.
_BASE_COLOURS = ((255, 140, 0), (40, 40, 40), (255, 255, 255), (31, 119, 180), (44, 160, 44), (214, 39, 40),
                 (148, 103, 189), (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207),
                 (127, 127, 127))
IGNORE_COLOUR = (224, 224, 192)  # as VOC draws its 255 "void" label


def palette(num_classes: int) -> np.ndarray:
    """uint8 [256, 3]: class i's colour at row i (VOC's bit pattern beyond the base colours), 255 ignored."""
    table = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        if i < len(_BASE_COLOURS):
            table[i] = _BASE_COLOURS[i]
            continue
        r = g = b = 0
        c = i
        for j in range(8):  # the PASCAL VOC colour map
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        table[i] = (r, g, b)
    table[255] = IGNORE_COLOUR
    return table


def mask_image(mask: np.ndarray, num_classes: int):
    """uint8 [H, W] class indices -> PIL "P" image whose pixel values are the indices."""
    from PIL import Image

    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(palette(num_classes).reshape(-1).tolist())
    return img


def overlay_image(image: np.ndarray, mask: np.ndarray, class_names: Sequence[str], fractions: Sequence[float],
                  *, alpha: float = 0.45):
    """The image with the mask's colours blended in, above a legend of colour, class name and share."""
    from PIL import Image, ImageDraw

    colours = palette(len(class_names))
    blended = ((1 - alpha) * image + alpha * colours[mask]).astype(np.uint8)
    h, w = blended.shape[:2]
    row, pad = 14, 4
    labels = [f"{name} {frac:.1%}" for name, frac in zip(class_names, fractions)]
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(draw_probe.textlength(t)) for t in labels)
    width = max(w, pad * 3 + row + text_w)
    canvas = Image.new("RGB", (width, h + pad * 2 + row * len(labels)), (255, 255, 255))
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(labels):
        top = h + pad + i * row
        draw.rectangle([pad, top + 1, pad + row - 3, top + row - 2], fill=tuple(int(c) for c in colours[i]),
                       outline=(0, 0, 0))
        draw.text((pad * 2 + row, top), text, fill=(0, 0, 0))
    return canvas


def _png_bytes(img) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


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
            write_atomic(mask_path, _png_bytes(mask_image(mask, predictor.model.num_classes)))
            overlay_path = None
            if overlay:
                overlay_path = out_dir / f"{name}_overlay.png"
                img = overlay_image(image, mask, predictor.class_names, fractions)
                write_atomic(overlay_path, _png_bytes(img))
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
