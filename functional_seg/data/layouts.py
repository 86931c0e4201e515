"""Which layout a dataset folder holds: Oxford-IIIT Pet, generic (images/ + masks/) or Pascal VOC.

``open_source(root, split, seed=...)`` detects the layout at ``root`` (in that order of
preference) and returns its reader's ``Source`` for the split; ``detect(root)`` says which layout
and where its root is.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from . import generic, oxford_pets, voc
from .errors import DataError
from .source import Source

__all__ = ["LAYOUTS", "LAYOUT_HELP", "detect", "open_source"]

LAYOUTS: dict[str, ModuleType] = {"oxford_pets": oxford_pets, "generic": generic, "voc": voc}
LAYOUT_HELP = (
    "images/<name>.jpg with annotations/trimaps/<name>.png and annotations/{trainval,test}.txt "
    "(Oxford-IIIT Pet), images/<stem>.* with masks/<stem>.png and optional classes.txt and "
    "{train,val,test}.txt (generic), or JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/ "
    "(Pascal VOC)"
)


def detect(root: str | os.PathLike, *, download: bool = False) -> tuple[str, Path]:
    """(layout name, layout root) of the dataset at ``root``.

    Args:
        root: a dataset folder, or a parent that torchvision or the VOC devkit filled.
        download: fetch Oxford-IIIT Pet with torchvision if no layout is found.

    Raises:
        DataError: ``root`` is missing, empty, not a folder, or holds no known layout.
    """
    root = Path(root).expanduser()
    for name, reader in LAYOUTS.items():
        found = reader.find(root)
        if found is not None:
            return name, found
    if download:
        return "oxford_pets", oxford_pets.find_root(root, download=True)
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist; expected {LAYOUT_HELP}")
    if not root.is_dir():
        raise DataError(f"dataset root {root} is not a directory; expected {LAYOUT_HELP}")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    if not entries:
        raise DataError(f"dataset root {root} is empty; expected {LAYOUT_HELP}")
    shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
    raise DataError(f"dataset root {root} holds no known layout (it has {shown}); expected {LAYOUT_HELP}")


def open_source(root: str | os.PathLike, split: str, *, seed: int = 0, download: bool = False,
                binary_255: bool = False) -> Source:
    """The ``Source`` of one split of the dataset at ``root``, whatever its layout.

    ``binary_255``: a generic layout's masks are binary, saved 0/255 (255 = class 1, not ignore);
    refused for the Oxford and VOC layouts, whose values are defined by the dataset.
    """
    name, found = detect(root, download=download)
    if not binary_255:
        return LAYOUTS[name].source(found, split, seed=seed)
    if name != "generic":
        raise DataError(f"--binary-255 reads 0/255 masks of an images/ + masks/ folder, but {found} is a {name} "
                        "dataset whose mask values the dataset defines; drop --binary-255")
    return generic.source(found, split, seed=seed, binary_255=True)
