"""The Pascal VOC segmentation layout (VOC2007 / VOC2012, as the devkit and
``torchvision.datasets.VOCSegmentation`` store it)::

    JPEGImages/<id>.jpg                   photos (many more than have masks)
    SegmentationClass/<id>.png            palette PNGs: the palette index is the class (0 =
                                          background .. 20 = tvmonitor), 255 = border / ignore
    ImageSets/Segmentation/{train,val,trainval}.txt   ids, one per line (test.txt where present)

The root may be the VOC2012 folder itself or a parent holding ``VOCdevkit/VOC2012`` or ``VOC2012``.
Samples go through the same ``sample.load_sample`` as the Oxford and generic readers.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DataError, MissingSplit
from .labels import LabelMap
from .source import Source, read_names

__all__ = ["CLASS_NAMES", "SPLITS", "find", "source", "voc_colormap"]

CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
SPLITS = ("train", "val", "trainval", "test")
VOC_LABELS = LabelMap.indices(CLASS_NAMES)
_EXAMPLE = "one image id per line, like '2007_000032'"
_MASK_EXPECTED = "a palette PNG (mode P) whose indices are VOC classes 0..20, 255 = border"


def _has_layout(p: Path) -> bool:
    return (p / "JPEGImages").is_dir() and (p / "SegmentationClass").is_dir()


def find(root: Path) -> Path | None:
    """The VOC folder at ``root``, ``root/VOCdevkit/VOC2012`` or ``root/VOC2012``, or None."""
    for candidate in (root, root / "VOCdevkit" / "VOC2012", root / "VOC2012"):
        if _has_layout(candidate):
            return candidate
    return None


def source(root: str | os.PathLike, split: str = "train", *, seed: int = 0) -> Source:
    """The files of one VOC split, for ``prepare`` (``seed`` is unused: VOC's splits are files).

    Raises:
        MissingSplit: an unknown split, or a split file this copy lacks (VOC2012 publishes no test masks).
        DataError: no layout, or a split that lists nothing.
    """
    if split not in SPLITS:
        raise MissingSplit(f"unknown split {split!r} for a VOC layout; expected one of {', '.join(SPLITS)}")
    found = find(Path(root).expanduser())
    if found is None:
        raise DataError(f"{root}: expected JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/")
    listed = found / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listed.is_file():
        present = sorted(p.stem for p in listed.parent.glob("*.txt")) if listed.parent.is_dir() else []
        why = "; VOC publishes no test masks" if split == "test" else ""
        raise MissingSplit(f"split file {listed} is missing; expected {_EXAMPLE} (this VOC copy lists "
                           f"{', '.join(present) or 'no split'}{why})")
    names = read_names(listed, _EXAMPLE, first_field=False)
    return Source(
        layout="voc",
        root=found,
        split=split,
        listed_in=str(listed),
        names=tuple(names),
        images=tuple(found / "JPEGImages" / f"{n}.jpg" for n in names),
        masks=tuple(found / "SegmentationClass" / f"{n}.png" for n in names),
        labels=VOC_LABELS,
        mask_expected=_MASK_EXPECTED,
        example=_EXAMPLE,
    )


def voc_colormap() -> list[tuple[int, int, int]]:
    """VOC's palette: index i's RGB interleaves i's bits (the devkit's ``labelcolormap``), 256 entries."""
    colours = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return colours
