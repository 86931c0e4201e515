"""Pictures of labels: the one palette, palette mask PNGs, overlays with a legend, heat maps.

    palette(C)                      uint8 [256, 3]: class i's colour at row i, 255 (ignore) cream
    mask_image(mask, C)             PIL "P" image whose pixel values are the class indices
    overlay_image(image, mask, ...) the image with the mask blended in, above a legend
    colour_labels(mask, C)          uint8 [H, W, 3] for figures (experiments, contact sheets)
    png_bytes(img)                  PNG bytes carrying our mark, the text chunk Software: functional_seg
    is_ours(path)                   whether a file is a PNG with that mark

The first three colours are the Oxford pets labels (pet orange, background dark, border white),
then well-separated colours, then VOC's bit-interleaved colour map. numpy and PIL only.

Every PNG the library writes goes through :func:`png_bytes`, so it carries the mark: ``fseg
predict`` skips marked files among its inputs (its own earlier outputs in the same folder) and
overwrites only marked files (never a user's own ``x_mask.png``). Large images are blended in
row strips, so an overlay costs about one extra uint8 copy of the image, not float64 ones.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np

from .data.voc import voc_colormap

__all__ = ["palette", "mask_image", "overlay_image", "colour_labels", "png_bytes", "is_ours", "MARK",
           "IGNORE_COLOUR"]

# pet, background, border first (the Oxford pets labels), then well-separated colours.
_BASE_COLOURS = ((255, 140, 0), (40, 40, 40), (255, 255, 255), (31, 119, 180), (44, 160, 44), (214, 39, 40),
                 (148, 103, 189), (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207),
                 (127, 127, 127))
IGNORE_COLOUR = (224, 224, 192)  # as VOC draws its 255 "void" label
#: The PNG text chunk (keyword, value) that marks a file as written by this library.
MARK = ("Software", "functional_seg")
_BLEND_PIXELS = 1 << 20  # pixels blended per strip: float64 temporaries of ~24 MB


def palette(num_classes: int | None = None) -> np.ndarray:
    """uint8 [256, 3]: class i's colour at row i (the base colours, then VOC's map), 255 ignored.

    ``num_classes`` is accepted for symmetry with the callers; the table is the same for every C,
    so a class keeps its colour across datasets of different sizes.
    """
    table = np.asarray(voc_colormap(), dtype=np.uint8)
    table[: len(_BASE_COLOURS)] = _BASE_COLOURS
    table[255] = IGNORE_COLOUR
    return table


def colour_labels(mask: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """uint8 [H, W] labels -> uint8 [H, W, 3] colours (out-of-range labels as ignored)."""
    mask = np.asarray(mask).astype(np.int64)
    return palette(num_classes)[np.where((mask >= 0) & (mask < 256), mask, 255)]


def mask_image(mask: np.ndarray, num_classes: int | None = None):
    """uint8 [H, W] class indices -> PIL "P" image whose pixel values are the indices."""
    from PIL import Image

    img = Image.fromarray(np.asarray(mask).astype(np.uint8), mode="P")
    img.putpalette(palette(num_classes).reshape(-1).tolist())
    return img


def overlay_image(image: np.ndarray, mask: np.ndarray, class_names: Sequence[str], fractions: Sequence[float],
                  *, alpha: float = 0.45):
    """The image with the mask's colours blended in, above a legend of colour, class name and share.

    Pixel = floor((1 - alpha) image + alpha colour) in float64, computed in row strips pasted
    straight into the PIL canvas (H + legend rows, max(W, legend width) columns), so a big image
    costs the canvas and one strip, not float64 copies of itself.
    """
    from PIL import Image, ImageDraw

    colours = palette(len(class_names))
    h, w = image.shape[:2]
    row, pad = 14, 4
    labels = [f"{name} {frac:.1%}" for name, frac in zip(class_names, fractions)]
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(draw_probe.textlength(t)) for t in labels)
    img = Image.new("RGB", (max(w, pad * 3 + row + text_w), h + pad * 2 + row * len(labels)), (255, 255, 255))
    step = max(1, _BLEND_PIXELS // max(w, 1))
    for top in range(0, h, step):
        part = slice(top, min(top + step, h))
        img.paste(Image.fromarray(((1 - alpha) * image[part] + alpha * colours[mask[part]]).astype(np.uint8)), (0, top))
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(labels):
        top = h + pad + i * row
        draw.rectangle([pad, top + 1, pad + row - 3, top + row - 2], fill=tuple(int(c) for c in colours[i]),
                       outline=(0, 0, 0))
        draw.text((pad * 2 + row, top), text, fill=(0, 0, 0))
    return img


def png_bytes(img) -> bytes:
    """A PIL image encoded as PNG bytes with our mark (for ``core.files.write_atomic``)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(*MARK)
    buffer = io.BytesIO()
    img.save(buffer, format="png", pnginfo=info)
    return buffer.getvalue()


def is_ours(path: str | os.PathLike) -> bool:
    """True for a PNG file that carries :data:`MARK` (reads the header only; False for anything else)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get(MARK[0]) == MARK[1]
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return False
