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

``source(root, split)`` gives the split's files to ``prepare``, which decodes them through the
shared ``sample.load_sample`` (as the generic and VOC readers do); ``load_sample`` here is that
loader for one (image, trimap) pair, returning uint8 arrays ``[3, S, S]`` and ``[S, S]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import sample
from .errors import DataError, DataWarning, MissingSplit
from .labels import IGNORE_INDEX, POLICIES, LabelMap
from .sample import SampleResult, SampleTask
from .source import IMAGE_EXTENSIONS, Source, read_names, seeded_partition

CLASS_NAMES: tuple[str, ...] = ("pet", "background", "border")
NUM_CLASSES: int = 3

OFFICIAL_SPLITS = ("trainval", "test")
SEEDED_SPLITS = ("train", "val", "holdout")
SPLITS = OFFICIAL_SPLITS + SEEDED_SPLITS
SEEDED_FRACTIONS = (0.8, 0.1, 0.1)

LAYOUT_HELP = (
    "images/<name>.jpg, annotations/trimaps/<name>.png and annotations/{trainval,test}.txt "
    "(directly, or under oxford-iiit-pet/ as torchvision.datasets.OxfordIIITPet stores it)"
)
_LINE_EXAMPLE = "lines like 'Abyssinian_100 1 1 1'"
_TRIMAP_EXPECTED = "a single-channel PNG (mode L) with values 1, 2, 3"

# trimap value -> label: 1 -> 0 (pet), 2 -> 1 (background), 3 -> 2 (border); others are invalid.
_TRIMAP_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_TRIMAP_LUT[1:4] = np.arange(3, dtype=np.uint8)
_TRIMAP_VALID = np.zeros(256, dtype=bool)
_TRIMAP_VALID[1:4] = True
TRIMAP_LABELS = LabelMap(CLASS_NAMES, _TRIMAP_LUT, _TRIMAP_VALID, "1 (pet), 2 (background) or 3 (border)")

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
    "TRIMAP_LABELS",
    "find",
    "source",
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
    found = find(root)
    if found is not None:
        return found
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


def find(root: Path) -> Path | None:
    """The layout at ``root`` or ``root/oxford-iiit-pet``, or None."""
    for candidate in (root / "oxford-iiit-pet", root):
        if _has_layout(candidate):
            return candidate
    return None


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
        raise MissingSplit(f"unknown split {split!r} for the Oxford-IIIT Pet layout; expected one of "
                           f"{', '.join(SPLITS)}")
    root = find_root(root)
    if split in OFFICIAL_SPLITS:
        return read_names(split_file(root, split), _LINE_EXAMPLE)
    listed = read_names(split_file(root, "trainval"), _LINE_EXAMPLE) + read_names(
        split_file(root, "test"), _LINE_EXAMPLE
    )
    return seeded_partition(listed, SEEDED_SPLITS, SEEDED_FRACTIONS, seed)[split]


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
    return TRIMAP_LABELS.apply(trimap, path, "trimap")


def source(root: str | os.PathLike, split: str = "trainval", *, seed: int = 0, download: bool = False) -> Source:
    """The files of one split, for ``prepare``.

    Raises:
        ValueError: an unknown split.
        DataError: no layout at ``root``, a missing split file, or a split that lists nothing.
    """
    if split not in SPLITS:
        raise MissingSplit(f"unknown split {split!r} for the Oxford-IIIT Pet layout; expected one of "
                           f"{', '.join(SPLITS)}")
    layout = find_root(root, download=download)
    names = read_split(layout, split, seed=seed)
    seeded = split in SEEDED_SPLITS
    return Source(
        layout="oxford_pets",
        root=layout,
        split=split,
        listed_in=str(layout / "annotations/{trainval,test}.txt" if seeded else split_file(layout, split)),
        names=tuple(names),
        images=tuple(image_path(layout, n) for n in names),
        masks=tuple(trimap_path(layout, n) for n in names),
        labels=TRIMAP_LABELS,
        seeded=seeded,
        mask_what="trimap",
        mask_expected=_TRIMAP_EXPECTED,
        example=_LINE_EXAMPLE,
    )


def load_sample(task: tuple[int, str, str, str, int, str]) -> SampleResult:
    """Decode, check and resize one (image, trimap) pair; never raises (errors come back as messages).

    Args:
        task: (index, name, image path, trimap path, size, policy).

    Returns:
        SampleResult with uint8 image [3, S, S] and mask [S, S] (0..2, IGNORE_INDEX padding).
    """
    return sample.load_sample(SampleTask(*task, TRIMAP_LABELS, "trimap", _TRIMAP_EXPECTED))
