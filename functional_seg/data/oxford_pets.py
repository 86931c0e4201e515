"""The Oxford-IIIT Pet layout: locating the root, split files, labels, and decoding one sample.

The official release (and ``torchvision.datasets.OxfordIIITPet``, which puts it under
``<root>/oxford-iiit-pet/``) looks like::

    images/<Name>_<id>.jpg              RGB photos (a few are really GIF/PNG; .mat files sit beside)
    annotations/trimaps/<Name>_<id>.png uint8 trimaps: 1 = pet, 2 = background, 3 = border
    annotations/trainval.txt, test.txt  lines "Abyssinian_100 1 1 1" (name, class, species, breed)

Labels are the trimap minus one: ``0 = pet, 1 = background, 2 = border`` (``CLASS_NAMES``), the
order the article series used. ``IGNORE_INDEX`` (255) marks padding added by the "pad" policy.

Splits: "trainval" and "test" are the official files; "train", "val" and "holdout" are a seeded
80/10/10 partition of every listed image (the union of both files, i.e. ``list.txt``), drawn with
``core.random.permutation`` so it is the same on every machine.

``load_sample`` decodes one (image, trimap) pair to uint8 numpy arrays ``[3, S, S]`` and
``[S, S]``; it uses only PIL and numpy so that process-pool workers never touch torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .decode import open_mask, open_rgb
from .errors import DataError, DataWarning

CLASS_NAMES: tuple[str, ...] = ("pet", "background", "border")
NUM_CLASSES: int = 3
IGNORE_INDEX: int = 255

OFFICIAL_SPLITS = ("trainval", "test")
SEEDED_SPLITS = ("train", "val", "holdout")
SPLITS = OFFICIAL_SPLITS + SEEDED_SPLITS
SEEDED_FRACTIONS = (0.8, 0.1, 0.1)
POLICIES = ("resize", "pad")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
LAYOUT_HELP = (
    "images/<name>.jpg, annotations/trimaps/<name>.png and annotations/{trainval,test}.txt "
    "(directly, or under oxford-iiit-pet/ as torchvision.datasets.OxfordIIITPet stores it)"
)

# trimap value -> label: 1 -> 0 (pet), 2 -> 1 (background), 3 -> 2 (border); others are invalid.
_TRIMAP_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_TRIMAP_LUT[1:4] = np.arange(3, dtype=np.uint8)

__all__ = [
    "CLASS_NAMES",
    "NUM_CLASSES",
    "IGNORE_INDEX",
    "SPLITS",
    "POLICIES",
    "DataError",
    "DataWarning",
    "find_root",
    "read_split",
    "split_file",
    "image_path",
    "trimap_path",
    "trimap_to_labels",
    "load_sample",
    "SampleResult",
]


def _has_layout(p: Path) -> bool:
    return (p / "images").is_dir() and (p / "annotations").is_dir()


def find_root(root: str | os.PathLike, *, download: bool = False) -> Path:
    """Locate the dataset layout at ``root`` or ``root/oxford-iiit-pet``.

    Args:
        root: the layout itself or the folder torchvision was given (holding ``oxford-iiit-pet/``).
        download: fetch the official release with torchvision first if no layout is found.

    Returns:
        The folder that holds ``images/`` and ``annotations/``.

    Raises:
        DataError: the root is missing or empty, or lacks the expected layout.
    """
    root = Path(root).expanduser()
    for candidate in (root / "oxford-iiit-pet", root):
        if _has_layout(candidate):
            return candidate
    if download:
        import torchvision

        torchvision.datasets.OxfordIIITPet(str(root), download=True, target_types="segmentation")
        if _has_layout(root / "oxford-iiit-pet"):
            return root / "oxford-iiit-pet"
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist; expected {LAYOUT_HELP}")
    if not root.is_dir():
        raise DataError(f"dataset root {root} is not a directory; expected {LAYOUT_HELP}")
    if not any(root.iterdir()):
        raise DataError(f"dataset root {root} is empty; expected {LAYOUT_HELP}")
    missing = [d for d in ("images", "annotations") if not (root / d).is_dir()]
    raise DataError(
        f"dataset root {root} has no {' or '.join(d + '/' for d in missing)}; expected {LAYOUT_HELP}"
    )


def split_file(root: Path, name: str) -> Path:
    return root / "annotations" / f"{name}.txt"


def _read_list(path: Path) -> list[str]:
    """Names from an official list file; blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"split file {path} is missing; expected lines like 'Abyssinian_100 1 1 1'") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"split file {path} cannot be read as text ({e})") from None
    names: list[str] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        name = fields[0]
        if "/" in name or "\\" in name or name in (".", ".."):
            raise DataError(
                f"{path}:{lineno}: {name!r} is not an image name (expected e.g. 'Abyssinian_100')"
            )
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _seeded_partition(names: list[str], seed: int) -> dict[str, list[str]]:
    from ..core import random as fr  # torch import kept out of worker processes

    names = sorted(names)
    n = len(names)
    n_train = round(SEEDED_FRACTIONS[0] * n)
    n_val = round(SEEDED_FRACTIONS[1] * n)
    order = fr.permutation(fr.key(seed), n).tolist() if n else []
    shuffled = [names[i] for i in order]
    parts = {
        "train": shuffled[:n_train],
        "val": shuffled[n_train : n_train + n_val],
        "holdout": shuffled[n_train + n_val :],
    }
    # Each part keeps sorted order so the data order does not depend on the permutation.
    return {k: sorted(v) for k, v in parts.items()}


def read_split(root: str | os.PathLike, split: str = "trainval", *, seed: int = 0) -> list[str]:
    """Image names of one split.

    Args:
        root: dataset root (anything ``find_root`` accepts).
        split: "trainval" or "test" (official files), or "train", "val", "holdout": a seeded
            80/10/10 partition of every name in trainval.txt and test.txt together.
        seed: seed of the 80/10/10 partition (ignored for the official splits).

    Returns:
        Names (file stems) in file order for official splits, sorted for seeded ones.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    root = find_root(root)
    if split in OFFICIAL_SPLITS:
        return _read_list(split_file(root, split))
    listed = _read_list(split_file(root, "trainval")) + _read_list(split_file(root, "test"))
    return _seeded_partition(list(dict.fromkeys(listed)), seed)[split]


def image_path(root: Path, name: str) -> Path:
    """``images/<name>.jpg``, or the same stem with another image extension if only that exists."""
    default = root / "images" / f"{name}.jpg"
    if default.is_file():
        return default
    for ext in IMAGE_EXTENSIONS[1:]:
        p = root / "images" / f"{name}{ext}"
        if p.is_file():
            return p
    return default


def trimap_path(root: Path, name: str) -> Path:
    return root / "annotations" / "trimaps" / f"{name}.png"


def trimap_to_labels(trimap: np.ndarray, path: str | os.PathLike = "<trimap>") -> np.ndarray:
    """Map trimap values 1, 2, 3 to labels 0, 1, 2.

    Args:
        trimap: integer array [H, W] (any integer dtype).
        path: the file it came from, for the error message.

    Returns:
        uint8 labels [H, W] in 0..2.

    Raises:
        DataError: a value outside {1, 2, 3}, naming ``path`` and the values found.
    """
    if trimap.dtype == np.uint8:
        counts = np.bincount(trimap.reshape(-1), minlength=256)
        values = np.flatnonzero(counts)
    else:
        values, counts_found = np.unique(trimap, return_counts=True)
        counts = dict(zip(values.tolist(), counts_found.tolist()))
    bad = [v for v in values.tolist() if v not in (1, 2, 3)]
    if bad:
        shown = ", ".join(f"{v} ({counts[v]} px)" for v in bad[:8])
        raise DataError(f"{path}: trimap values must be 1 (pet), 2 (background) or 3 (border); found {shown}")
    return _TRIMAP_LUT[trimap.astype(np.uint8, copy=False)]


def _resize_pair(img: Image.Image, lab: Image.Image, size: int, policy: str):
    """Square ``size``: stretch ("resize") or fit the long side and centre-pad ("pad")."""
    if policy == "resize":
        return (
            img.resize((size, size), Image.Resampling.BILINEAR),  # PIL filters antialias on downscale
            lab.resize((size, size), Image.Resampling.NEAREST),
        )
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    img_c = Image.new("RGB", (size, size), (0, 0, 0))
    lab_c = Image.new("L", (size, size), IGNORE_INDEX)
    x0, y0 = (size - nw) // 2, (size - nh) // 2
    img_c.paste(img.resize((nw, nh), Image.Resampling.BILINEAR), (x0, y0))
    lab_c.paste(lab.resize((nw, nh), Image.Resampling.NEAREST), (x0, y0))
    return img_c, lab_c


@dataclass(frozen=True)
class SampleResult:
    """What a worker sends back: arrays on success, or the error message naming the file."""

    index: int
    name: str
    image: np.ndarray | None = None  # uint8 [3, S, S]
    mask: np.ndarray | None = None  # uint8 [S, S]
    error: str | None = None


def load_sample(task: tuple[int, str, str, str, int, str]) -> SampleResult:
    """Decode, check and resize one sample; never raises (errors come back as messages).

    Args:
        task: (index, name, image path, trimap path, size, policy); a plain tuple so it pickles
            cheaply to pool workers.

    Returns:
        SampleResult with uint8 image [3, S, S] and mask [S, S] (0..2, IGNORE_INDEX padding).
    """
    index, name, img_file, tri_file, size, policy = task
    try:
        img = open_rgb(img_file, what=f"image {name!r}")
        tri = open_mask(
            tri_file, what="trimap", expected="a single-channel PNG (mode L) with values 1, 2, 3"
        )
        if tri.size != img.size:
            raise DataError(
                f"{tri_file}: trimap is {tri.size[0]}x{tri.size[1]} (WxH) but its image {img_file} is "
                f"{img.size[0]}x{img.size[1]}; expected the same size"
            )
        labels = trimap_to_labels(np.asarray(tri), tri_file)
        img, lab = _resize_pair(img, Image.fromarray(labels), size, policy)
        image = np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
        return SampleResult(index, name, image=image, mask=np.asarray(lab, dtype=np.uint8))
    except DataError as e:
        return SampleResult(index, name, error=str(e))
    except Exception as e:  # anything else still names the file instead of killing the pool
        return SampleResult(
            index, name, error=f"{img_file}: unexpected {type(e).__name__} while loading: {e}"
        )
