"""A small synthetic dataset in the Oxford-IIIT Pet on-disk layout, for tests and offline runs.

Each image is one saturated, coloured shape (an ellipse or a polygon: the "pet") on a dull,
textured background (stripes plus noise). Its trimap marks the shape 1, the background 2 and a
band a few pixels wide straddling the outline 3, like the real trimaps. Image sides vary within
``size`` so sizes and aspect ratios differ. Colour separates pet from background, so a small CNN
learns it within a few epochs.

Files written under ``root``::

    images/<Breed>_<k>.jpg, annotations/trimaps/<Breed>_<k>.png,
    annotations/trainval.txt, annotations/test.txt, annotations/list.txt ("Ellipse_3 1 1 1")

``warts=True`` adds the oddities of the real release: .mat files in images/, a palette GIF and an
RGBA PNG behind .jpg names, a greyscale JPEG, and an image on disk that no split file lists.
Everything is a pure function of ``seed`` (a numpy Generator seeded per image).

``make_generic_dataset`` and ``make_voc_dataset`` draw multi-class scenes (class 0 background,
each other class a shape of its own hue, a 255 = ignore band along every outline) in the generic
``images/`` + ``masks/`` layout and the Pascal VOC layout.
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["make_synthetic_dataset", "make_generic_dataset", "make_voc_dataset", "BREEDS"]

# (breed, class id, species id, breed id) in the official list.txt columns.
BREEDS = (("Ellipse", 1, 1, 1), ("Polygon", 2, 2, 1), ("Star", 3, 1, 2))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-saturation base colour, oriented stripes and noise: float [H, W, 3] in 0..255."""
    grey = rng.uniform(70, 170)
    base = grey + rng.uniform(-15, 15, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(0.08, 0.35)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq)
    texture = rng.uniform(10, 25) * stripes[..., None] + rng.normal(0, 8, size=(h, w, 3))
    return base + texture


def _shape_mask(rng: np.random.Generator, kind: str, h: int, w: int) -> Image.Image:
    """Binary mask (mode L, 0/255) of one ellipse, polygon or star covering roughly 15-50% of the image."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    rx = rng.uniform(0.24, 0.42) * w
    ry = rx * rng.uniform(0.5, 1.6) * h / w
    ry = min(ry, 0.45 * h)
    if kind == "Ellipse":
        # A rotated ellipse as a dense polygon.
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        rot = rng.uniform(0, np.pi)
        x, y = rx * np.cos(t), ry * np.sin(t)
        pts = np.stack([cx + x * np.cos(rot) - y * np.sin(rot), cy + x * np.sin(rot) + y * np.cos(rot)], 1)
    else:
        k = int(rng.integers(5, 9))
        n_vertices = k if kind == "Polygon" else 2 * k
        step = 2 * np.pi / n_vertices
        # Evenly spread corners, jittered: irregular but never a sliver.
        t = rng.uniform(0, 2 * np.pi) + step * (np.arange(n_vertices) + rng.uniform(-0.3, 0.3, n_vertices))
        radius = rng.uniform(0.7, 1.0, size=t.size)
        if kind == "Star":
            radius[1::2] *= 0.5
        pts = np.stack([cx + rx * radius * np.cos(t), cy + ry * radius * np.sin(t)], 1)
    draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    if not np.asarray(mask).any():  # degenerate polygon: fall back to a box
        draw.rectangle([cx - rx / 2, cy - ry / 2, cx + rx / 2, cy + ry / 2], fill=255)
    return mask


def _sample(seed: int, index: int, kind: str, size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng([seed, index])
    h, w = (int(v) for v in rng.integers(size[0], size[1] + 1, size=2))
    shape = _shape_mask(rng, kind, h, w)
    inside = np.asarray(shape) > 0
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0)
    colour = 255 * np.array(colorsys.hsv_to_rgb(hue, sat, val))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    shading = 1.0 + 0.15 * np.sin(xx * rng.uniform(0.05, 0.2)) * np.cos(yy * rng.uniform(0.05, 0.2))
    fg = colour * shading[..., None] + rng.normal(0, 6, size=(h, w, 3))
    img = np.where(inside[..., None], fg, _background(rng, h, w))
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    band = int(rng.integers(1, 4))  # band half-width: the border is 3..7 px wide
    grown = np.asarray(shape.filter(ImageFilter.MaxFilter(2 * band + 1))) > 0
    shrunk = np.asarray(shape.filter(ImageFilter.MinFilter(2 * band + 1))) > 0
    trimap = np.full((h, w), 2, dtype=np.uint8)
    trimap[grown] = 3
    trimap[shrunk] = 1
    return image, Image.fromarray(trimap)


def _add_warts(root: Path, names: list[str], seed: int, size: tuple[int, int]) -> None:
    images = root / "images"
    for name in names[:3]:  # MATLAB files beside the JPEGs, as in the real release
        (images / f"{name}.mat").write_bytes(b"MATLAB 5.0 MAT-file, synthetic stand-in\x00" * 4)
    if len(names) > 0:
        img = Image.open(images / f"{names[0]}.jpg").convert("RGB")
        img.quantize(64).save(images / f"{names[0]}.jpg", format="GIF")  # palette image named .jpg
    if len(names) > 1:
        img = Image.open(images / f"{names[1]}.jpg").convert("RGBA")
        img.putalpha(200)
        img.save(images / f"{names[1]}.jpg", format="PNG")  # RGBA PNG named .jpg
    if len(names) > 2:
        Image.open(images / f"{names[2]}.jpg").convert("L").save(images / f"{names[2]}.jpg", quality=90)
    # An image with its trimap on disk that no split file lists.
    image, trimap = _sample(seed, 10**6, "Ellipse", size)
    image.save(images / "Ellipse_9999.jpg", quality=90)
    trimap.save(root / "annotations" / "trimaps" / "Ellipse_9999.png")


def make_synthetic_dataset(
    root: str | os.PathLike,
    *,
    n_trainval: int = 64,
    n_test: int = 32,
    size: tuple[int, int] | int = (96, 128),
    seed: int = 0,
    warts: bool = False,
) -> Path:
    """Write a synthetic dataset in the official layout.

    Args:
        root: folder to write into (created if needed); it becomes the layout root.
        n_trainval, n_test: images listed in trainval.txt and test.txt.
        size: (min, max) side length in pixels, drawn per image and per axis; an int fixes both.
        seed: all content is a function of it.
        warts: add the real release's oddities (see the module docstring).

    Returns:
        ``root`` as a Path, ready for ``prepare(root, ...)``.
    """
    if n_trainval < 0 or n_test < 0 or n_trainval + n_test == 0:
        raise ValueError(
            f"make_synthetic_dataset: need some images, got n_trainval={n_trainval}, n_test={n_test}"
        )
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if not 8 <= size[0] <= size[1]:
        raise ValueError(f"make_synthetic_dataset: size needs 8 <= min <= max, got {size}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    names: list[str] = []
    for i in range(n_trainval + n_test):
        breed, class_id, species, breed_id = BREEDS[i % len(BREEDS)]
        name = f"{breed}_{i // len(BREEDS) + 1}"
        image, trimap = _sample(seed, i, breed, size)
        image.save(root / "images" / f"{name}.jpg", quality=90)
        trimap.save(root / "annotations" / "trimaps" / f"{name}.png")
        names.append(name)
        lines.append(f"{name} {class_id} {species} {breed_id}\n")
    ann = root / "annotations"
    (ann / "trainval.txt").write_text("".join(lines[:n_trainval]))
    (ann / "test.txt").write_text("".join(lines[n_trainval:]))
    (ann / "list.txt").write_text(
        "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n"
        "#BREED ID: 1-25:Cat 1:12:Dog\n" + "".join(lines)
    )
    if warts:
        _add_warts(root, names, seed, size)
    return root


def _check_counts(fn: str, n: int, size: tuple[int, int] | int) -> tuple[int, int]:
    if n < 1:
        raise ValueError(f"{fn}: need n >= 1 images, got {n}")
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if not 8 <= size[0] <= size[1]:
        raise ValueError(f"{fn}: size needs 8 <= min <= max, got {size}")
    return size


def _scene(seed: int, index: int, classes: list[int], num_classes: int, size: tuple[int, int]):
    """One image with a shape per entry of ``classes`` on a textured background (class 0).

    Class c's shape has hue c / num_classes, so colour alone names the class. Returns the RGB
    image and uint8 labels [H, W] with 255 on a 1-2 px band along each outline.
    """
    rng = np.random.default_rng([seed, index])
    h, w = (int(v) for v in rng.integers(size[0], size[1] + 1, size=2))
    img = _background(rng, h, w)
    labels = np.zeros((h, w), dtype=np.uint8)
    band = np.zeros((h, w), dtype=bool)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for k, c in enumerate(classes):
        shape = _shape_mask(rng, BREEDS[(index + k) % len(BREEDS)][0], h, w)
        inside = np.asarray(shape) > 0
        colour = 255 * np.array(colorsys.hsv_to_rgb(c / num_classes, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)))
        shading = 1.0 + 0.1 * np.sin(xx * rng.uniform(0.05, 0.2))
        img = np.where(inside[..., None], colour * shading[..., None] + rng.normal(0, 5, size=(h, w, 3)), img)
        labels[inside] = c
        grown = np.asarray(shape.filter(ImageFilter.MaxFilter(3))) > 0
        shrunk = np.asarray(shape.filter(ImageFilter.MinFilter(3))) > 0
        band = (band & ~inside) | (grown & ~shrunk)
    labels[band] = 255
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), labels


def _scene_classes(rng_seed: int, i: int, num_classes: int) -> list[int]:
    """Class 1 + i mod (C - 1) (so n >= C - 1 images show every class), sometimes one more."""
    if num_classes < 2:
        return []
    first = 1 + i % (num_classes - 1)
    extra = np.random.default_rng([rng_seed, i, 1]).integers(1, num_classes)
    return [first] if extra == first or num_classes == 2 else [first, int(extra)]


def make_generic_dataset(
    root: str | os.PathLike,
    *,
    n: int = 20,
    num_classes: int = 5,
    size: tuple[int, int] | int = (24, 40),
    seed: int = 0,
    classes_file: bool = True,
    split_files: bool = False,
    warts: bool = False,
) -> Path:
    """Write a synthetic dataset in the generic layout (``data.generic``).

    Args:
        root: folder to write into; it becomes the layout root.
        n: images ``images/img_<k>.jpg`` with masks ``masks/img_<k>.png`` (values 0..C-1, 255).
        num_classes: C, background included (2 to 255); every class appears once n >= C - 1.
        size: (min, max) side in pixels, drawn per image and axis; an int fixes both.
        seed: all content is a function of it.
        classes_file: write ``classes.txt`` ("background", "shape_1", ...); without it C is inferred.
        split_files: write ``train.txt`` / ``val.txt`` / ``test.txt`` (60/20/20, in name order).
        warts: harmless oddities a reader must survive: a PNG and an upper-case ``.JPG`` among
            the JPEGs, macOS ``._img_0.jpg`` and ``.DS_Store`` junk, a ``notes.txt`` in images/.

    Returns:
        ``root`` as a Path, ready for ``prepare(root, "train", ...)``.
    """
    size = _check_counts("make_generic_dataset", n, size)
    if not 2 <= num_classes <= 255:
        raise ValueError(f"make_generic_dataset: num_classes must lie in 2..255, got {num_classes}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    names = [f"img_{k}" for k in range(n)]
    for i, name in enumerate(names):
        image, labels = _scene(seed, i, _scene_classes(seed, i, num_classes), num_classes, size)
        ext = ".jpg"
        if warts and i == 1:
            ext = ".png"
        elif warts and i == 2:
            ext = ".JPG"
        image.save(root / "images" / f"{name}{ext}", format="PNG" if ext == ".png" else "JPEG", quality=90)
        Image.fromarray(labels).save(root / "masks" / f"{name}.png")
    if classes_file:
        (root / "classes.txt").write_text(
            "\n".join(["background"] + [f"shape_{c}" for c in range(1, num_classes)]) + "\n"
        )
    if split_files:
        a, b = round(0.6 * n), round(0.8 * n)
        for split, part in (("train", names[:a]), ("val", names[a:b]), ("test", names[b:])):
            (root / f"{split}.txt").write_text("".join(f"{x}\n" for x in part))
    if warts:
        (root / "images" / "._img_0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
        (root / "images" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (root / "images" / "notes.txt").write_text("not an image\n")
    return root


def _voc_palette() -> list[int]:
    """The VOC colour map as PIL's flat palette list (``voc.voc_colormap``)."""
    from .voc import voc_colormap

    return [v for rgb in voc_colormap() for v in rgb]


def make_voc_dataset(
    root: str | os.PathLike,
    *,
    n: int = 20,
    size: tuple[int, int] | int = (24, 40),
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset in the Pascal VOC layout (``data.voc``).

    ``JPEGImages/2007_<k>.jpg`` with palette masks ``SegmentationClass/2007_<k>.png`` (VOC
    colours; index = class 0..20, 255 = border), ``ImageSets/Segmentation/{train,val,trainval}.txt``
    (train the first 70% in name order), and, as in the real release, three more JPEGs that have
    no mask and no split lists.

    Returns:
        ``root`` as a Path, ready for ``prepare(root, "train", ...)``.
    """
    size = _check_counts("make_voc_dataset", n, size)
    root = Path(root)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    names = [f"2007_{k:06d}" for k in range(n + 3)]
    palette = _voc_palette()
    for i, name in enumerate(names):
        image, labels = _scene(seed, i, _scene_classes(seed, i, 21), 21, size)
        image.save(root / "JPEGImages" / f"{name}.jpg", quality=90)
        if i < n:
            mask = Image.fromarray(labels, mode="P")
            mask.putpalette(palette)
            mask.save(root / "SegmentationClass" / f"{name}.png")
    a = round(0.7 * n)
    sets = root / "ImageSets" / "Segmentation"
    for split, part in (("train", names[:a]), ("val", names[a:n]), ("trainval", names[:n])):
        (sets / f"{split}.txt").write_text("".join(f"{x}\n" for x in part))
    return root
