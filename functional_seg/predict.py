"""Inference on image files: masks (and uncertainty maps) at each input's own resolution, in bounded memory.

An image (uint8 [H, W, 3], EXIF orientation applied by ``data.decode.read_rgb``) becomes logits
float32 [P, C, H, W] at its ORIGINAL size, P predictions per pixel (ensemble members and/or flip
views, below), in one of two ways:

    whole  (default)  fitted to the training square S as training did (``Preprocess.policy``:
                      "resize" stretches to S x S; "pad" keeps the aspect ratio and pads, and the
                      padding is cropped off the logits again), one forward pass, then the logits
                      are resized bilinearly to H x W
    tiled  (tile=T)   at the image's own scale, in T x T windows overlapping by ``tile_overlap``;
                      each window's logits are weighted by a smooth (sine) window and the weighted
                      average taken, so seams do not show; a side shorter than T gets one window
                      of that side (rounded up to the stride, edge pixels replicated)

Those full-size logits are never held at once: :meth:`Predictor.strips` yields them in horizontal
strips of at most ``strip_bytes`` (``strips.resized_strips`` / ``strips.blended_strips``), and
each strip becomes rows of the uint8 mask (and of the uncertainty maps) at once. A 48 MP photo
costs its decoded pixels, its uint8 mask and one strip, not 4 bytes x C per pixel.

The mask is the argmax of the logits (resizing logits, not labels, keeps boundaries smooth);
with several predictions (P > 1) the argmax of their mean softmax. ``tta="flip"`` adds the
horizontally mirrored input, its logits flipped back: averaged with the plain ones (P stays 1 per
model), or, with ``uncertainty=True``, kept as a second view. An ensemble checkpoint loaded with
``member="all"`` gives its K members (``members=K``).

:func:`predict_files` runs files and folders (hidden files such as macOS ``._x.jpg`` are not
images; PNGs this library wrote are skipped and counted), decoding at most ``batch_size`` images
or ``max_batch_pixels`` pixels at a time, and writes per image, atomically, under OUT:

    <name>_mask.png         palette PNG (mode "P"), pixel value = class index
    <name>_overlay.png      the image with the mask blended in, above a legend of class shares
    <name>_entropy.png      (uncertainty) 16-bit greyscale: predictive entropy in units of 1e-4 nats
                            (``uncertainty.UINT16_PER_NAT`` = 10 000 per nat; 0 .. log C)
    <name>_mutual_info.png  (uncertainty, ensembles) 16-bit, same scale: mutual information between
                            the members (and views), their disagreement
    <name>_uncertainty.png  (uncertainty, with overlays) the entropy as an inferno-like heat map from
                            0 (black) to log C (pale yellow), blended half over the image

Every PNG carries the mark ``render.MARK`` (text chunk Software: functional_seg). An existing
output file without it is someone else's: that image fails with one line naming the file, and
nothing of it is written; the other images go on.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core.files import write_atomic
from .core.tree import tree_map
from .data.preprocess import Preprocess
from .data.sample import fit_image
from .data.sizes import size_text
from .render import is_ours, mask_image, overlay_image, png_bytes
from .runtime import Runtime, resolve_runtime
from .strips import blended_strips, resized_strips, strip_rows, tiling
from .uncertainty import (
    check_tta,
    flip_views,
    heatmap,
    mean_probs,
    overlay,
    to_uint16,
    uncertainty_maps,
    write_uint16_png,
)

__all__ = ["IMAGE_SUFFIXES", "Predictor", "PredictResult", "PredictReport", "output_names", "output_paths",
           "expand_inputs", "find_inputs", "predict_files", "format_result", "mask_of", "MAX_BATCH_PIXELS"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: Decoded pixels a batch may hold before it is predicted (~100 MB of uint8 RGB); one image always fits.
MAX_BATCH_PIXELS = 1 << 25
_UNCERTAINTY_NEEDS = ("--uncertainty needs several predictions per pixel: an ensemble checkpoint (all its "
                      "members) or --tta flip")


def _fit(image: np.ndarray, size: int | tuple[int, int], policy: str
         ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """uint8 [H, W, 3] -> (uint8 [S, S, 3] (or the training (H, W)), (x0, y0, w, h) of the image
    inside it), as training data was fitted (``data.sample.fit_image``)."""
    from PIL import Image

    fitted, box = fit_image(Image.fromarray(image), size, policy)
    return np.asarray(fitted), box


def _chunks(items: Sequence, n: int) -> Iterator[Sequence]:
    for first in range(0, len(items), n):
        yield items[first:first + n]


# ----------------------------------------------------------------------------------------------
# The predictor


@dataclass
class Predictor:
    """One model (or ensemble) ready for inference: full-size logits per image, strip by strip.

    Args:
        tile: window side T for tiled inference (rounded down to the stride), or None (whole image).
        tile_overlap: fraction of T that neighbouring windows share, in [0, 1).
        tta: "none" or "flip".
        batch_size: images (whole mode) or windows (tiled mode) per forward pass.
        runtime: device, precision and layout (``runtime.resolve_runtime()``'s "auto" if None).
        members: K when params and state are stacked over K ensemble members (each leaf [K, ...]),
            all of them run (``vmap``); None for one model.
        uncertainty: keep flip views as separate predictions (for uncertainty maps) instead of
            averaging their logits; needs members or tta="flip".
        strip_bytes: the most bytes of float32 logits [P, C, rows, W] held per strip.
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
    members: int | None = None
    uncertainty: bool = False
    strip_bytes: int = 32 << 20

    @classmethod
    def from_checkpoint(cls, loaded, runtime: Runtime | None = None, **kwargs) -> Predictor:
        """From ``models.load_checkpoint(...)``'s result: one member, or all (``member="all"``)."""
        kwargs.setdefault("members", loaded.members)
        return cls(loaded.model, loaded.params, loaded.state, loaded.preprocess, runtime, **kwargs)

    def __post_init__(self):
        self.runtime = self.runtime or resolve_runtime()
        self.device = self.runtime.device
        self.precision = self.runtime.precision
        self.channels_last = self.runtime.channels_last
        check_tta(self.tta)
        if not 0.0 <= self.tile_overlap < 1.0:
            raise ValueError(f"tile overlap must be in [0, 1), got {self.tile_overlap}")
        if self.uncertainty and self.members is None and self.tta != "flip":
            raise ValueError(_UNCERTAINTY_NEEDS)
        stride = self.model.stride
        if self.tile is not None:
            if self.tile < stride:
                raise ValueError(f"--tile {self.tile} is smaller than the model's stride {stride}")
            self.tile -= self.tile % stride
        elif not self.preprocess.size:
            raise ValueError("the checkpoint records no training size; pass --size S (or --tile T)")
        elif any(side % stride for side in self.preprocess.hw):
            raise ValueError(f"size {size_text(self.preprocess.size)} is not a multiple of the model's stride {stride}")
        self.params, self.state = tree_map(lambda t: t.to(self.device), (self.params, self.state))

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.preprocess.class_names

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def predictions_per_pixel(self) -> int:
        """P: members (1 for one model) x views (2 with flip TTA kept apart for uncertainty, else 1)."""
        return (self.members or 1) * (2 if self.uncertainty and self.tta == "flip" else 1)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        """float [N, 3, h, w] -> logits [K, N, C, h, w] (K = 1 for one model)."""
        if self.members is None:
            return self.model.apply(self.params, self.state, x, train=False)[0][None]
        return torch.func.vmap(lambda p, s: self.model.apply(p, s, x, train=False)[0])(self.params, self.state)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float [N, 3, h, w] -> float32 logits [P, N, C, h, w] (flip TTA included)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), self.runtime.autocast():
            if self.tta != "flip":
                return self._apply(x).float()
            views = flip_views(self._apply, x)  # [2K, ...]: the members on x, then on its mirror
            if not self.uncertainty:
                k = views.shape[0] // 2
                views = (views[:k] + views[k:]) / 2
        return views.float()

    def _model_input(self, uint8_hwc: Sequence[np.ndarray]) -> torch.Tensor:
        batch = np.stack(list(uint8_hwc))  # a copy
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)
        return dataclasses.replace(self.preprocess, channels_last=False).model_input(x)

    def _rows(self, width: int) -> int:
        return strip_rows(self.strip_bytes, self.predictions_per_pixel * self.num_classes * width * 4)

    def strips(self, images: Sequence[np.ndarray]) -> Iterator[Iterator[tuple[int, torch.Tensor]]]:
        """Per image (uint8 [H_i, W_i, 3]), an iterator of (first row, logits float32 [P, C, r, W_i])
        strips on the device, top to bottom. Consume each image's strips before asking for the next
        image's: whole-image forward passes are batched, tiles run lazily."""
        if self.tile is not None:
            for image in images:
                yield self._tiled(image)
            return
        size, policy = self.preprocess.size, self.preprocess.policy
        for chunk in _chunks(images, self.batch_size):
            fitted = [_fit(image, size, policy) for image in chunk]
            logits = self._forward(self._model_input([f for f, _ in fitted]))
            for i, (image, (_, (x0, y0, w, h))) in enumerate(zip(chunk, fitted)):
                small = logits[:, i, :, y0:y0 + h, x0:x0 + w]
                yield resized_strips(small, image.shape[:2], self._rows(image.shape[1]))

    def _tiled(self, image: np.ndarray) -> Iterator[tuple[int, torch.Tensor]]:
        plan = tiling(image.shape[:2], self.tile, self.tile_overlap, self.model.stride)
        (h, w), (full_h, full_w), (win_h, win_w) = plan.size, plan.canvas, plan.window

        def windows(boxes: Sequence[tuple[int, int]]) -> torch.Tensor:
            crops = [image[y:y + win_h, x:x + win_w] for y, x in boxes]
            if full_h > h or full_w > w:  # a side shorter than one window: replicate its edge pixels
                crops = [np.pad(c, ((0, win_h - c.shape[0]), (0, win_w - c.shape[1]), (0, 0)), mode="edge")
                         for c in crops]
            return self._forward(self._model_input(crops))

        return blended_strips(windows, plan, batch_size=self.batch_size, rows=self._rows(full_w))

    def predictions(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """uint8 [H_i, W_i, 3] each -> float32 logits [P, C, H_i, W_i] each, on the CPU. Holds every
        full-size logit: for small images and tests; :func:`predict_files` streams instead."""
        return [torch.cat([s.cpu() for _, s in strips], dim=-2) for strips in self.strips(images)]

    def logits(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """uint8 [H_i, W_i, 3] each -> float32 logits [C, H_i, W_i] each, on the CPU (one prediction
        per pixel; see :meth:`predictions` for several). For small images and tests."""
        if self.predictions_per_pixel != 1:
            raise ValueError(f"this predictor makes {self.predictions_per_pixel} predictions per pixel; "
                             "use predictions()")
        return [p[0] for p in self.predictions(images)]


def mask_of(logits: torch.Tensor) -> torch.Tensor:
    """Logits float [P, C, r, W] -> uint8 labels [r, W]: argmax of the logits (P = 1) or of the mean
    softmax (P > 1); the first maximum wins ties."""
    scores = logits[0] if logits.shape[0] == 1 else mean_probs(logits[:, None])[0]
    return scores.max(0).indices.to(torch.uint8)  # max(0).indices: faster than argmax on the CPU


# ----------------------------------------------------------------------------------------------
# Full-size maps of one image, filled strip by strip


def _new_rgb(width: int, height: int):
    from PIL import Image

    return Image.new("RGB", (width, height))


def _rgb(pixels: np.ndarray):
    from PIL import Image

    return Image.fromarray(pixels)


class _Maps:
    """The full-size outputs of one image, filled strip by strip: the uint8 mask, class counts and,
    with ``uncertainty``, entropy and mutual-information units (uint16) and the heat-map overlay."""

    def __init__(self, image: np.ndarray, num_classes: int, *, uncertainty: bool, mutual_info: bool, heat: bool):
        h, w = image.shape[:2]
        self.image, self.num_classes = image, num_classes
        self.mask = np.empty((h, w), np.uint8)
        self.counts = torch.zeros(num_classes, dtype=torch.int64)
        self.entropy = np.empty((h, w), np.uint16) if uncertainty else None
        self.mutual_info = np.empty((h, w), np.uint16) if uncertainty and mutual_info else None
        self.heat = _new_rgb(w, h) if uncertainty and heat else None  # a PIL image, pasted into strip by strip

    def add(self, row: int, logits: torch.Tensor) -> None:
        """Rows ``row ..`` from logits float [P, C, r, W] (on any device)."""
        rows = slice(row, row + logits.shape[-2])
        mask = mask_of(logits)
        self.counts += torch.bincount(mask.reshape(-1), minlength=self.num_classes).cpu()
        self.mask[rows] = mask.cpu().numpy()
        if self.entropy is None:
            return
        entropy, mutual_info = (m[0] for m in uncertainty_maps(logits[:, None]))
        self.entropy[rows] = to_uint16(entropy).cpu().numpy()
        if self.mutual_info is not None:
            self.mutual_info[rows] = to_uint16(mutual_info).cpu().numpy()
        if self.heat is not None:
            pixels = torch.from_numpy(np.array(self.image[rows])).to(logits.device)  # a writable copy
            colours = heatmap(entropy, vmax=math.log(self.num_classes))
            self.heat.paste(_rgb(overlay(pixels, colours, alpha=0.5).cpu().numpy()), (0, row))

    @property
    def fractions(self) -> tuple[float, ...]:
        return tuple(float(c) / self.mask.size for c in self.counts.tolist())


# ----------------------------------------------------------------------------------------------
# Files in, files out


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; a folder becomes its image files (by suffix), sorted, not recursive.

    Hidden files in a folder (names starting with "."; macOS writes ``._x.jpg`` AppleDouble
    files beside copies on foreign disks) are not images and are left out, as the dataset readers
    do. Duplicates (the same file named twice) are dropped. Missing paths are kept, so the run
    reports them as failures along with unreadable files.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                       and f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def find_inputs(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """(images to predict, files skipped): :func:`expand_inputs` without the PNGs this library wrote
    (``render.is_ours``: earlier outputs written into the input folder are not photos)."""
    images, ours = [], []
    for path in expand_inputs(paths):
        (ours if path.suffix.lower() == ".png" and is_ours(path) else images).append(path)
    return images, ours


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


def output_paths(out_dir: str | os.PathLike, name: str | os.PathLike, *, overlay: bool = True,
                 uncertainty: bool = False, mutual_info: bool = False) -> dict[str, Path]:
    """The files written for one input, by kind: mask, overlay, entropy, mutual_info, uncertainty
    (see the module docstring). The suffixes end in distinct words, so no input's file can be
    another input's (``x`` + ``_uncertainty`` is never ``y`` + ``_mask``)."""
    kinds = ["mask"] + ["overlay"] * overlay
    if uncertainty:
        kinds += ["entropy"] + ["mutual_info"] * mutual_info + ["uncertainty"] * overlay
    return {kind: Path(out_dir) / f"{name}_{kind}.png" for kind in kinds}


@dataclass(frozen=True)
class PredictResult:
    path: Path
    mask_path: Path | None = None
    overlay_path: Path | None = None
    size: tuple[int, int] | None = None  # (H, W)
    fractions: tuple[float, ...] | None = None
    error: str | None = None
    outputs: dict[str, Path] = field(default_factory=dict)  # every file written, by kind


@dataclass(frozen=True)
class PredictReport:
    """What :func:`predict_files` did: one result per image tried, and the inputs it skipped
    because this library wrote them (marked PNGs)."""

    results: list[PredictResult]
    skipped: tuple[Path, ...] = ()

    @property
    def failed(self) -> int:
        return sum(r.error is not None for r in self.results)


def _read(path: Path) -> np.ndarray:
    from .data.decode import read_rgb

    return read_rgb(path)


def _refusal(path: Path, targets: dict[str, Path], claimed: set[Path]) -> str | None:
    """Why ``path``'s outputs must not be written, or None: a file there that we did not write, or
    one another input of this run writes."""
    for target in targets.values():
        if target in claimed:
            return f"{path}: not written: {target} is also the output of another input in this run"
        if os.path.lexists(target) and not is_ours(target):
            return (f"{path}: not overwriting {target}: it exists and fseg did not write it (its PNGs carry "
                    "the text chunk Software: functional_seg); move it or choose another --out")
    return None


def _decoded(items: Iterable[tuple[Path, dict[str, Path]]], batch_size: int, max_pixels: int,
             report: Callable[[PredictResult], None]) -> Iterator[list[tuple[Path, dict[str, Path], np.ndarray]]]:
    """Batches of decoded images: up to ``batch_size`` images or ``max_pixels`` pixels (a big image
    forms a batch alone), so a folder of 48 MP photos never holds more than about one of them.
    Outputs that must not be written and unreadable files are reported and skipped, in order."""
    from .data import DataError

    batch, pixels, claimed = [], 0, set()
    for path, targets in items:
        problem = _refusal(path, targets, claimed)
        if problem is None:
            try:
                image = _read(path)
            except (DataError, OSError) as err:
                problem = " ".join(str(err).split()) or type(err).__name__
        if problem is not None:
            report(PredictResult(path=path, error=problem))
            continue
        claimed.update(targets.values())
        batch.append((path, targets, image))
        pixels += image.shape[0] * image.shape[1]
        del image  # held by the batch alone, freed with it
        if len(batch) >= batch_size or pixels >= max_pixels:
            yield batch
            batch, pixels = [], 0
    if batch:
        yield batch


def _write(path: Path, image: np.ndarray, maps: _Maps, targets: dict[str, Path], class_names: Sequence[str]
           ) -> PredictResult:
    fractions = maps.fractions
    write_atomic(targets["mask"], png_bytes(mask_image(maps.mask, len(class_names))))
    if "overlay" in targets:
        write_atomic(targets["overlay"], png_bytes(overlay_image(image, maps.mask, class_names, fractions)))
    if "entropy" in targets:
        write_uint16_png(targets["entropy"], torch.from_numpy(maps.entropy))
    if "mutual_info" in targets:
        write_uint16_png(targets["mutual_info"], torch.from_numpy(maps.mutual_info))
    if "uncertainty" in targets:
        write_atomic(targets["uncertainty"], png_bytes(maps.heat))
    return PredictResult(path=path, mask_path=targets["mask"], overlay_path=targets.get("overlay"),
                         size=maps.mask.shape, fractions=fractions, outputs=dict(targets))


def _predict_batch(predictor: Predictor, batch, report: Callable[[PredictResult], None]) -> None:
    uncertainty, mutual_info = predictor.uncertainty, predictor.members is not None
    for (path, targets, image), strips in zip(batch, predictor.strips([b[2] for b in batch])):
        maps = _Maps(image, predictor.num_classes, uncertainty=uncertainty, mutual_info=mutual_info,
                     heat="uncertainty" in targets)
        for row, logits in strips:
            maps.add(row, logits)
        report(_write(path, image, maps, targets, predictor.class_names))
        del maps  # before the next image's maps are made


def predict_files(predictor: Predictor, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                  overlay: bool = True, on_result: Callable[[PredictResult], None] | None = None,
                  max_batch_pixels: int = MAX_BATCH_PIXELS) -> PredictReport:
    """Predict every image in ``inputs`` (files or folders) and write its files under ``out_dir``
    (names from :func:`output_names`, files from :func:`output_paths`; uncertainty maps when
    ``predictor.uncertainty``), atomically, each image's in bounded memory.

    An image that cannot be read, or whose output path holds a file this library did not write,
    gives a result with ``error`` set, and the rest go on. PNGs this library wrote are not inputs
    (``PredictReport.skipped``).
    """
    paths, skipped = find_inputs(inputs)
    uncertainty, mutual_info = predictor.uncertainty, predictor.members is not None
    items = [(path, output_paths(out_dir, name, overlay=overlay, uncertainty=uncertainty, mutual_info=mutual_info))
             for path, name in zip(paths, output_names(paths))]
    results: list[PredictResult] = []

    def report(result: PredictResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    for batch in _decoded(items, predictor.batch_size, max_batch_pixels, report):
        _predict_batch(predictor, batch, report)
        del batch  # before the next batch is decoded
    return PredictReport(results, tuple(skipped))


def format_result(result: PredictResult, class_names: Sequence[str]) -> str:
    """One line: ``input -> mask (pet 31.2%, background 60.1%, border 8.7%)``, or the error."""
    if result.error:
        return f"fseg: error: {result.error}" if str(result.path) in result.error else \
            f"fseg: error: {result.path}: {result.error}"
    shares = ", ".join(f"{n} {f:.1%}" for n, f in zip(class_names, result.fractions or ()))
    return f"{result.path} -> {result.mask_path} ({shares})"
