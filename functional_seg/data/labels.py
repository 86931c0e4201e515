"""What labels mean, below every reader and the train step: the ignored label, the resize
policies, and ``LabelMap`` (a mask's stored values -> labels 0..C-1). numpy only: no PIL, no reader.

Class names are never assumed here: each layout says its own (``oxford_pets.CLASS_NAMES``,
``voc.CLASS_NAMES``, a generic ``classes.txt``), and ``unnamed(C)`` words C classes that have none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .errors import DataError

__all__ = ["IGNORE_INDEX", "POLICIES", "LabelMap", "unnamed"]

IGNORE_INDEX: int = 255
POLICIES = ("resize", "pad")


def unnamed(num_classes: int) -> tuple[str, ...]:
    """``("class_0", ..., "class_{C-1}")``: the names of C classes nobody named."""
    return tuple(f"class_{i}" for i in range(num_classes))


@dataclass(frozen=True, eq=False)
class LabelMap:
    """What a mask's stored values mean.

    Attributes:
        class_names: C names; label i is ``class_names[i]``.
        lut: uint8 [256], stored value -> label (``IGNORE_INDEX`` for ignored values).
        valid: bool [256], which stored values a mask may hold.
        expected: the valid values in words, for error messages.
    """

    class_names: tuple[str, ...]
    lut: np.ndarray = field(repr=False)
    valid: np.ndarray = field(repr=False)
    expected: str

    @classmethod
    def indices(cls, class_names: tuple[str, ...]) -> LabelMap:
        """Stored value = label for 0..C-1, and 255 = ignore (generic and VOC masks)."""
        c = len(class_names)
        if not 1 <= c <= IGNORE_INDEX:
            raise DataError(f"need 1 to {IGNORE_INDEX} classes ({IGNORE_INDEX} means ignore), got {c}")
        valid = np.zeros(256, dtype=bool)
        valid[:c] = True
        valid[IGNORE_INDEX] = True
        lut = np.arange(256, dtype=np.uint8)
        return cls(tuple(class_names), lut, valid, f"class indices 0..{c - 1} or {IGNORE_INDEX} (ignore)")

    @classmethod
    def binary_255(cls, class_names: tuple[str, ...] | None = None) -> LabelMap:
        """Binary masks saved 0/255 (the usual export of a binary mask): 0 is class 0 and 255 is
        class 1, not "ignore"; nothing is ignored, and any other value is refused per file."""
        names = unnamed(2) if class_names is None else tuple(class_names)
        if len(names) != 2:
            raise DataError(f"binary masks (0 and 255) have 2 classes, but {len(names)} are named "
                            f"({', '.join(names)})")
        valid = np.zeros(256, dtype=bool)
        valid[[0, IGNORE_INDEX]] = True
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        lut[0], lut[IGNORE_INDEX] = 0, 1
        return cls(names, lut, valid, f"0 ({names[0]}) or {IGNORE_INDEX} ({names[1]}: binary masks)")

    def key(self) -> object:
        """What identifies this map in a cache key: the class names, plus the value table when it is
        not the identity (so 0/255 read as binary and as ignore are cached apart)."""
        if np.array_equal(self.lut, np.arange(256, dtype=np.uint8)):
            return list(self.class_names)
        return {"class_names": list(self.class_names), "lut": self.lut.tolist(), "valid": self.valid.tolist()}

    def apply(self, values: np.ndarray, path: str | os.PathLike, what: str = "mask") -> np.ndarray:
        """Stored values (any integer dtype, [H, W]) -> uint8 labels [H, W].

        Raises:
            DataError: a value that is not valid, naming ``path``, the values and their pixel counts.
        """
        if values.dtype == np.uint8:
            counts = np.bincount(values.reshape(-1), minlength=256)
            bad = np.flatnonzero(counts * ~self.valid).tolist()
            found = {v: int(counts[v]) for v in bad}
        else:
            uniq, n = np.unique(values, return_counts=True)
            found = {
                int(v): int(k) for v, k in zip(uniq.tolist(), n.tolist()) if not (0 <= v < 256 and self.valid[v])
            }
            bad = sorted(found)
        if bad:
            shown = ", ".join(f"{v} ({found[v]} px)" for v in bad[:8])
            raise DataError(f"{path}: {what} values must be {self.expected}; found {shown}")
        return self.lut[values.astype(np.uint8, copy=False)]
