"""A split's files, whatever the layout: the ``Source`` a reader hands to ``prepare``, plus the
pieces readers share (name lists, seeded partitions, an index of image files by stem).

A reader (``oxford_pets``, ``generic``, ``voc``) turns ``(root, split, seed)`` into a ``Source``:
the sample names in data order, each one's image and mask path, and the ``LabelMap`` saying what
the mask values mean (or, for a generic layout without ``classes.txt``, the masks to infer the
class count from). ``prepare`` does the rest the same way for all of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError, MissingSplit
from .labels import LabelMap

__all__ = ["Source", "read_names", "seeded_order", "seeded_partition", "image_index", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Source:
    """The files of one split of one dataset.

    Attributes:
        layout: "oxford_pets", "generic" or "voc" (part of the cache key and file name).
        root: the layout's root folder.
        split: the split's name.
        listed_in: where the names came from (a split file, or a description), for messages.
        names: sample names (file stems) in data order.
        images, masks: one path per name (they may not exist: ``prepare`` reports that). Any
            ``os.PathLike`` is taken and kept as ``str``: a ``Path`` weighs ~5x its string, and a
            split of 32k samples held 20 MB of them for the whole run.
        labels: what the mask values mean; None to infer C from the masks in ``infer_from``.
        infer_from: every mask of the dataset that has an image, when ``labels`` is None.
        unpaired: masks without an image (a stray file): never counted, named when their values
            would have changed the inferred classes.
        seeded: the split is a seeded partition (the seed is part of the cache key).
        mask_what, mask_expected: how messages name a mask and say what it should be.
        example: what a split-file line should look like, for messages.
    """

    layout: str
    root: Path
    split: str
    listed_in: str
    names: tuple[str, ...]
    images: tuple[str, ...]
    masks: tuple[str, ...]
    labels: LabelMap | None
    infer_from: tuple[str, ...] = ()
    unpaired: tuple[str, ...] = ()
    seeded: bool = False
    mask_what: str = "mask"
    mask_expected: str = "an 8-bit single-channel PNG of class indices"
    example: str = "one image name per line"

    def __post_init__(self):
        for field in ("images", "masks", "infer_from", "unpaired"):
            object.__setattr__(self, field, tuple(map(os.fspath, getattr(self, field))))
        if not self.names:
            raise DataError(f"{self.listed_in}: split {self.split!r} lists no images; expected {self.example}")
        if not len(self.names) == len(self.images) == len(self.masks):
            raise ValueError("Source: names, images and masks need one entry each per sample")


def read_names(path: Path, example: str, *, first_field: bool = True) -> list[str]:
    """Names from a split file, in file order, duplicates dropped.

    Args:
        path: the file; blank lines and lines starting with ``#`` are skipped.
        example: what a line should look like, for messages (e.g. "lines like 'Abyssinian_100 1 1 1'").
        first_field: take the first whitespace-separated field (Oxford's lists carry class ids
            after the name); otherwise the whole stripped line is the name.

    Raises:
        MissingSplit: the file is missing.
        DataError: the file is unreadable, or a line holds a path instead of a name.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of a name
    except FileNotFoundError:
        raise MissingSplit(f"split file {path} is missing; expected {example}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"split file {path} cannot be read as text ({e})") from None
    names: dict[str, None] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = line.split()[0] if first_field else line
        if "/" in name or "\\" in name or name in (".", ".."):
            raise DataError(f"{path}:{lineno}: {name!r} is not an image name; expected {example}")
        names.setdefault(name)
    return list(names)


def seeded_order(names: Sequence[str], seed: int) -> list[str]:
    """The distinct ``names`` in a seeded order that depends only on the set of names and the seed:
    sorted, then permuted with ``core.random.permutation(key(seed))`` (the same on every machine)."""
    from ..core import random as fr  # keeps torch out of reader imports until a split is drawn

    ordered = sorted(set(names))
    order = fr.permutation(fr.key(seed), len(ordered)).tolist() if ordered else []
    return [ordered[i] for i in order]


def seeded_partition(
    names: Sequence[str], parts: Sequence[str], fractions: Sequence[float], seed: int
) -> dict[str, list[str]]:
    """A seeded partition of ``names`` into ``parts``: the same on every machine and whatever the
    order of ``names``.

    ``seeded_order`` permutes the sorted names; part i takes the next
    ``round(fractions[i] * N)`` of them and the last part takes the rest. Each part comes back
    sorted, so data order does not depend on the permutation.
    """
    shuffled = seeded_order(names, seed)
    n = len(shuffled)
    out: dict[str, list[str]] = {}
    start = 0
    for i, part in enumerate(parts):
        stop = n if i == len(parts) - 1 else start + round(fractions[i] * n)
        out[part] = sorted(shuffled[start:stop])
        start = stop
    return out


def image_index(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, str]:
    """Image files in ``folder`` by stem (extension case ignored; hidden files such as macOS ``._x.jpg``
    and other extensions skipped).

    Raises:
        DataError: two images share a stem (``a.jpg`` and ``a.png``), so a name is ambiguous.
    """
    index: dict[str, Path] = {}
    with os.scandir(folder) as it:
        for entry in sorted(it, key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            stem, suffix = os.path.splitext(entry.name)
            if suffix.lower() not in extensions:
                continue
            if stem in index:
                raise DataError(
                    f"{index[stem]} and {entry.name} share the stem {stem!r}; expected one image per name"
                )
            index[stem] = entry.path
    return index
