"""Your own data: a generic images + index-masks layout.

::

    images/<stem>.jpg|png|...    the photos (hidden files such as ._x.jpg and other extensions ignored)
    masks/<stem>.png             one 8-bit PNG per image (mode L or P; .PNG too): pixel value = class
                                 index, 255 = ignore (``binary_255``: 0/255 binary masks, 255 = class 1)
    classes.txt                  optional: one class name per line (line i names class i; UTF-8, a
                                 byte-order mark is dropped); without it C = the largest label in
                                 the masks that have an image, + 1, named class_0, class_1, ...
                                 (``label_sets.infer_labels`` refuses or warns on implausible sets)
    train.txt, val.txt, test.txt optional: stems, one per line; "trainval" is trainval.txt, or
                                 train.txt and val.txt together. Without any split file the
                                 images are split 80/10/10 into train/val/test by ``seed``.

Samples go through the same ``sample.load_sample`` as the Oxford and VOC readers.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DataError, MissingSplit
from .labels import IGNORE_INDEX, LabelMap
from .source import Source, image_index, read_names, seeded_partition

__all__ = ["SPLITS", "find", "read_class_names", "source"]

SPLITS = ("train", "val", "test", "trainval")
SEEDED_FRACTIONS = (0.8, 0.1, 0.1)
_EXAMPLE = "one image stem per line (a file name in images/ without its extension)"


def find(root: Path) -> Path | None:
    """``root`` if it holds ``images/`` and ``masks/``, else None."""
    return root if (root / "images").is_dir() and (root / "masks").is_dir() else None


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names from ``classes.txt``: line i names class i (trailing blank lines ignored).

    Raises:
        DataError: an empty or repeated name, or more than 255 classes (255 means ignore).
    """
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path} cannot be read as text ({e}); expected one class name per line") from None
    while lines and not lines[-1]:
        lines.pop()
    for lineno, name in enumerate(lines, 1):
        if not name:
            raise DataError(f"{path}:{lineno}: empty class name; expected one class name per line")
        if name in lines[: lineno - 1]:
            raise DataError(f"{path}:{lineno}: class {name!r} is named twice; expected distinct names")
    if not 1 <= len(lines) <= IGNORE_INDEX:
        raise DataError(
            f"{path}: lists {len(lines)} classes; expected 1 to {IGNORE_INDEX} ({IGNORE_INDEX} means ignore)"
        )
    return tuple(lines)


def _split_names(root: Path, split: str, stems: list[str], seed: int) -> tuple[list[str], str, bool]:
    """(names, where they came from, seeded?) for one split."""
    files = {s: root / f"{s}.txt" for s in SPLITS}
    present = [s for s, p in files.items() if p.is_file()]
    if not present:
        parts = seeded_partition(stems, ("train", "val", "test"), SEEDED_FRACTIONS, seed)
        parts["trainval"] = sorted(parts["train"] + parts["val"])
        return parts[split], f"{root / 'images'} (seeded 80/10/10 split, seed {seed})", True
    if split in present:
        return read_names(files[split], _EXAMPLE, first_field=False), str(files[split]), False
    if split == "trainval" and {"train", "val"} <= set(present):
        names = read_names(files["train"], _EXAMPLE, first_field=False)
        names += read_names(files["val"], _EXAMPLE, first_field=False)
        return list(dict.fromkeys(names)), f"{files['train']} + {files['val']}", False
    raise MissingSplit(
        f"split file {files[split]} is missing; expected {_EXAMPLE} (this dataset has "
        f"{', '.join(p + '.txt' for p in present)}; without any split file it is split 80/10/10)"
    )


def _labels(root: Path, binary_255: bool) -> LabelMap | None:
    """What the masks' values mean: from classes.txt, 0/255 binary, or None (inferred from the masks)."""
    classes = root / "classes.txt"
    names = read_class_names(classes) if classes.is_file() else None
    if binary_255:
        try:
            return LabelMap.binary_255(names)
        except DataError as err:
            raise DataError(f"{classes}: {err}") from None
    return None if names is None else LabelMap.indices(names)


def source(root: str | os.PathLike, split: str = "train", *, seed: int = 0, binary_255: bool = False) -> Source:
    """The files of one split of a generic layout, for ``prepare``.

    Args:
        root: the folder holding ``images/`` and ``masks/``.
        split: "train", "val", "test" or "trainval".
        seed: seed of the 80/10/10 split when there are no split files.
        binary_255: the masks are binary and saved 0/255: 255 is class 1, not ignore
            (``LabelMap.binary_255``); classes.txt, if present, names the 2 classes.

    Raises:
        MissingSplit: an unknown split, or a split file this dataset lacks.
        DataError: no layout, a bad ``classes.txt`` or split file, or a split that lists nothing.
    """
    if split not in SPLITS:
        raise MissingSplit(f"unknown split {split!r} for a generic layout; expected one of {', '.join(SPLITS)}")
    root = Path(root).expanduser()
    if find(root) is None:
        raise DataError(f"{root}: expected images/<stem>.jpg and masks/<stem>.png")
    index = image_index(root / "images")
    mask_index = image_index(root / "masks", (".png",))  # x.png or x.PNG, as images/ takes x.JPG
    names, listed_in, seeded = _split_names(root, split, sorted(index), seed)
    labels = _labels(root, binary_255)
    paired = tuple(p for stem, p in mask_index.items() if stem in index)
    unpaired = tuple(p for stem, p in mask_index.items() if stem not in index)
    c = "0..C-1" if labels is None else f"0..{len(labels.class_names) - 1}"
    values = "0 or 255 (binary)" if binary_255 else f"class indices {c}, 255 = ignore"
    return Source(
        layout="generic",
        root=root,
        split=split,
        listed_in=listed_in,
        names=tuple(names),
        images=tuple(index.get(n, root / "images" / f"{n}.jpg") for n in names),
        masks=tuple(mask_index.get(n, root / "masks" / f"{n}.png") for n in names),
        labels=labels,
        infer_from=paired if labels is None else (),
        unpaired=unpaired if labels is None else (),
        seeded=seeded,
        mask_expected=f"an 8-bit single-channel PNG (mode L or P) of {values}",
        example=_EXAMPLE,
    )
