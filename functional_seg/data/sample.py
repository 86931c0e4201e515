"""One sample, whatever the layout: decode the image and its mask, check them, map the mask's
values to labels, and resize both to the prepared size. Every reader (Oxford-IIIT Pet, generic, VOC) sends
its samples through ``load_sample``, so all of them fail the same way on the same bad file.

A task is a plain picklable ``SampleTask``; the result is uint8 numpy arrays, image ``[3, H, W]``
(RGB) and mask ``[H, W]`` (labels 0..C-1, ``IGNORE_INDEX`` for ignored and padded pixels), or the
one-line error naming the file; a size S means H = W = S. Only PIL and numpy run here, so pool
workers never touch torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

from .decode import open_mask, open_rgb
from .errors import DataError
from .labels import IGNORE_INDEX, POLICIES, LabelMap
from .sizes import size_hw

__all__ = ["IGNORE_INDEX", "POLICIES", "LabelMap", "SampleTask", "SampleResult", "load_sample", "mask_max_label",
           "fit_box", "fit_image", "resize_pair", "load_original"]


class SampleTask(NamedTuple):
    """One sample to load: cheap to pickle to a pool worker."""

    index: int
    name: str
    image: str
    mask: str
    size: int | tuple[int, int]  # S, or (H, W)
    policy: str
    labels: LabelMap
    mask_what: str = "mask"
    mask_expected: str = "an 8-bit single-channel PNG of class indices"


@dataclass(frozen=True)
class SampleResult:
    """What a worker sends back: arrays on success, or the error message naming the file."""

    index: int
    name: str
    image: np.ndarray | None = None  # uint8 [3, H, W]
    mask: np.ndarray | None = None  # uint8 [H, W]
    error: str | None = None


def fit_box(width: int, height: int, size: int | tuple[int, int], policy: str) -> tuple[int, int, int, int]:
    """Where a ``width`` x ``height`` image lands in the training frame of ``size`` (S for S x S,
    or (H, W)): ``(x0, y0, w, h)``.

    "resize" stretches it over the whole frame; "pad" scales it by the smaller of H / height and
    W / width (aspect kept) and centres it. The one geometry of training data
    (:func:`resize_pair`) and of prediction.
    """
    out_h, out_w = size_hw(size)
    if policy == "resize":
        return 0, 0, out_w, out_h
    scale = min(out_w / width, out_h / height)
    nw, nh = max(1, min(out_w, round(width * scale))), max(1, min(out_h, round(height * scale)))
    return (out_w - nw) // 2, (out_h - nh) // 2, nw, nh


def fit_image(img: Image.Image, size: int | tuple[int, int], policy: str
              ) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """An RGB image fitted to the training frame as training data was (bilinear, antialiased when
    shrinking; "pad" on black): ``(image, fit_box)``."""
    box = fit_box(*img.size, size, policy)
    resized = img.resize(box[2:], Image.Resampling.BILINEAR)
    if policy == "resize":
        return resized, box
    out_h, out_w = size_hw(size)
    canvas = Image.new("RGB", (out_w, out_h), (0, 0, 0))
    canvas.paste(resized, box[:2])
    return canvas, box


def resize_pair(
    img: Image.Image, lab: Image.Image, size: int | tuple[int, int], policy: str
) -> tuple[Image.Image, Image.Image]:
    """To ``size`` (S for S x S, or (H, W)): stretch ("resize") or fit inside and centre-pad ("pad").

    The image is resized bilinearly (PIL antialiases when shrinking), the labels nearest; "pad"
    scales by the smaller of H / h and W / w, keeping the aspect ratio, and puts both on a canvas
    that is black in the image and ``IGNORE_INDEX`` in the labels.
    """
    image, (x0, y0, nw, nh) = fit_image(img, size, policy)
    labels = lab.resize((nw, nh), Image.Resampling.NEAREST)
    if policy == "resize":
        return image, labels
    out_h, out_w = size_hw(size)
    lab_c = Image.new("L", (out_w, out_h), IGNORE_INDEX)
    lab_c.paste(labels, (x0, y0))
    return image, lab_c


def _decode(task: SampleTask) -> tuple[Image.Image, np.ndarray]:
    """The RGB image and its labels uint8 [H, W] (``task.labels`` applied), at the stored size."""
    img = open_rgb(task.image, what=f"image {task.name!r}")
    mask = open_mask(task.mask, what=task.mask_what, expected=task.mask_expected)
    if mask.size != img.size:
        raise DataError(
            f"{task.mask}: {task.mask_what} is {mask.size[0]}x{mask.size[1]} (WxH) but its image "
            f"{task.image} is {img.size[0]}x{img.size[1]}; expected the same size"
        )
    return img, task.labels.apply(np.asarray(mask, dtype=np.uint8), task.mask, task.mask_what)


def _guarded(task: SampleTask, load) -> SampleResult:
    """``load(task)``'s result, or a ``SampleResult`` whose error names the bad file."""
    try:
        return load(task)
    except DataError as e:
        return SampleResult(task.index, task.name, error=str(e))
    except Exception as e:  # anything else still names the file instead of killing the pool
        return SampleResult(
            task.index, task.name, error=f"{task.image}: unexpected {type(e).__name__} while loading: {e}"
        )


def _resized(task: SampleTask) -> SampleResult:
    img, labels = _decode(task)
    img, lab = resize_pair(img, Image.fromarray(labels), task.size, task.policy)
    image = np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
    return SampleResult(task.index, task.name, image=image, mask=np.asarray(lab, dtype=np.uint8))


def _original(task: SampleTask) -> SampleResult:
    img, labels = _decode(task)
    return SampleResult(task.index, task.name, image=np.asarray(img, dtype=np.uint8), mask=labels)


def load_sample(task: SampleTask) -> SampleResult:
    """Decode, check and resize one sample; never raises (errors come back as messages).

    Returns:
        SampleResult with uint8 image [3, H, W] and mask [H, W] (labels, ``IGNORE_INDEX`` where
        ignored or padded) at ``task.size``, or ``error``: a one-line message naming the bad file.
    """
    return _guarded(SampleTask(*task), _resized)


def load_original(task: SampleTask) -> SampleResult:
    """Decode and check one sample at the size it is stored at (``task.size`` unused), for scoring
    at full resolution; never raises.

    Returns:
        SampleResult with uint8 image [H, W, 3] (as predictors take it) and labels [H, W], or ``error``.
    """
    return _guarded(SampleTask(*task), _original)


def mask_max_label(path: str) -> int:
    """The largest stored value below ``IGNORE_INDEX`` in one mask, or -1 (none, or unreadable:
    a bad mask is reported when its own sample loads)."""
    try:
        values = np.bincount(np.asarray(open_mask(path), dtype=np.uint8).reshape(-1), minlength=256)
    except DataError:
        return -1
    present = np.flatnonzero(values[:IGNORE_INDEX])
    return int(present[-1]) if present.size else -1
