"""Decode one image file to RGB pixels, or one index mask to labels: the single place that does it.

Training readers (``prepare``) and inference (``fseg predict``) both call these, so a file looks
the same to a model whichever path reads it::

    read_rgb(path)  -> uint8 [H, W, 3]   EXIF orientation applied; any PIL mode made RGB
    read_mask(path) -> uint8 [H, W]      the stored index per pixel (palette PNGs keep indices)

Conversions: palette (with transparency), LA, RGBA and CMYK become RGB (alpha dropped, as
torchvision does); greyscale is repeated over three channels; 16-bit greyscale (PIL modes
``I;16*`` and ``I``) is scaled by 255 / 65535, so 8-bit values stored as v * 257 come back as v
instead of clipping to white; float images in [0, 1] are scaled by 255. Truncated files fail
whatever ``ImageFile.LOAD_TRUNCATED_IMAGES`` says, and PIL's decompression-bomb guard (an image
above ``Image.MAX_IMAGE_PIXELS``, warning or error alike) becomes a ``DataError`` naming the file,
its pixel count and the limit. Only PIL and numpy are used, so pool workers never import torch.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .errors import DataError

__all__ = ["read_rgb", "read_mask", "open_rgb", "open_mask", "IMAGE_EXPECTED", "MASK_EXPECTED"]

IMAGE_EXPECTED = "a readable JPEG/PNG/GIF/BMP/TIFF/WebP image"
MASK_EXPECTED = "an 8-bit single-channel PNG (mode L or P) of class indices"

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_MASK_MODES = ("L", "P", "1")
_PIXELS = re.compile(r"\((\d+) pixels\)")


def _bomb_message(path: Path, what: str, err: Exception) -> str:
    found = _PIXELS.search(str(err))
    pixels = f"{int(found.group(1)):,} pixels" if found else f"too many pixels ({err})"
    limit = Image.MAX_IMAGE_PIXELS
    return (
        f"{path}: {what} has {pixels}, above PIL's decompression-bomb limit "
        f"Image.MAX_IMAGE_PIXELS = {limit:,}; expected a smaller image "
        "(raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted)"
    )


def _open(path: str | os.PathLike, what: str, expected: str) -> Image.Image:
    """Open and fully decode ``path`` with EXIF orientation applied, or raise a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} is missing; expected {expected}")
    # Truncated images must fail loudly, whatever a caller set globally (restored below).
    load_truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()  # force the full decode: truncated files fail here, not later
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(_bomb_message(path, what, e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot decode {what} ({type(e).__name__}: {e}); expected {expected}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = load_truncated
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # malformed EXIF: the pixels decoded, keep them as stored
        pass
    return img


def _scaled_to_uint8(img: Image.Image) -> Image.Image:
    """16-bit or float greyscale -> 8-bit "L" by a fixed scale (never by the image's own max)."""
    a = np.asarray(img)
    if img.mode == "F":
        scale = 255.0 if a.size and float(np.nanmax(a)) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    return Image.fromarray(np.clip(np.rint(a.astype(np.float64) * scale), 0, 255).astype(np.uint8))


def open_rgb(
    path: str | os.PathLike, *, what: str = "image", expected: str = IMAGE_EXPECTED
) -> Image.Image:
    """``read_rgb`` as a PIL image in mode RGB (for callers that resize with PIL next)."""
    img = _open(path, what, expected)
    if img.mode == "RGB":
        return img
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # palette transparency resolved before the alpha is dropped
    if img.mode in _SIXTEEN_BIT or img.mode == "F":
        img = _scaled_to_uint8(img)
    return img.convert("RGB")


def read_rgb(
    path: str | os.PathLike, *, what: str = "image", expected: str = IMAGE_EXPECTED
) -> np.ndarray:
    """Decode an image file to RGB pixels.

    Args:
        path: any image PIL reads (JPEG, PNG incl. 16-bit, GIF, BMP, TIFF, WebP, ...).
        what, expected: how error messages name the file's role and what it should be.

    Returns:
        uint8 [H, W, 3], upright (EXIF orientation applied), H and W as displayed.

    Raises:
        DataError: missing, unreadable or truncated file, or one above ``Image.MAX_IMAGE_PIXELS``;
            the one-line message names the file.
    """
    return np.asarray(open_rgb(path, what=what, expected=expected), dtype=np.uint8)


def open_mask(
    path: str | os.PathLike, *, what: str = "mask", expected: str = MASK_EXPECTED
) -> Image.Image:
    """``read_mask`` as a PIL image in mode L or P (indices untouched)."""
    img = _open(path, what, expected)
    if img.mode == "1":
        return Image.fromarray(np.asarray(img, dtype=np.uint8))
    if img.mode in _SIXTEEN_BIT:
        raise DataError(f"{path}: {what} is a 16-bit image (mode {img.mode}); expected {expected}")
    if img.mode not in _MASK_MODES:
        raise DataError(f"{path}: {what} has mode {img.mode}; expected {expected}")
    return img


def read_mask(
    path: str | os.PathLike, *, what: str = "mask", expected: str = MASK_EXPECTED
) -> np.ndarray:
    """Decode an index mask: the stored value of each pixel, never a colour.

    Args:
        path: an 8-bit single-channel PNG (mode L), a palette PNG (mode P: its indices are the
            labels, as in Pascal VOC) or a 1-bit image (0/1).
        what, expected: how error messages name the file's role and what it should be.

    Returns:
        uint8 [H, W] (EXIF orientation applied, like ``read_rgb``, so sizes compare as displayed).

    Raises:
        DataError: missing or unreadable file, a 16-bit mask, or one with colour channels.
    """
    return np.asarray(open_mask(path, what=what, expected=expected), dtype=np.uint8)
