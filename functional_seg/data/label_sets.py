"""What the values in a dataset's masks say about its classes, when no ``classes.txt`` says it.

``infer_labels(src, workers)`` reads value statistics of every mask of a generic layout that has
an image, in the process pool (``mask_stats``: int64 [3, 256], per stored value its pixels and its
horizontally and vertically adjacent equal pairs), and infers C = the largest value below 255,
+ 1, named class_0 .. class_{C-1}, unless the set of values is implausible. Refused
(``DataError`` naming files and the fix):

- no class value at all (only 255 = ignore), or only class 0: nothing to segment;
- only 0 and 255 in every mask: a binary mask saved 0/255, where 255 means ignore, so the object
  would vanish and a 1-class model reach loss 0 and mean IoU 1.0: ``--binary-255`` reads 255 as
  class 1;
- ``SMEARED`` or more speckled values: values whose pixels are mostly isolated (under ``COHERENT``
  of them have an equal neighbour to the right, or below, in every direction taken alone). An
  annotated class is a region, or a line; lossy compression (JPEG) leaves rings of values that
  change from pixel to pixel around every edge (measured: real Oxford trimaps 0.97-0.99, the
  same saved as JPEG at quality 95 gain values at 0.10-0.25). Without this, a 0/1/2 mask saved
  as JPEG gives C = 255 classes, every epoch ~50x slower and a mean IoU near 0.

Warned (``DataWarning`` naming files): one speckled value (a stray brush stroke), classes below C
that no mask holds (C then rests on a few files: one stray value 9 among 0..2 gives 10 classes),
and masks without an image whose values would have changed C (they are not counted).

``check_present(data)`` refuses a training split in which fewer than 2 classes occur (one class
named in ``classes.txt``, or 0/255 masks read with 255 = ignore).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .decode import open_mask
from .errors import DataError, DataWarning
from .labels import IGNORE_INDEX, LabelMap, unnamed
from .pool import parallel_map
from .source import Source

__all__ = ["infer_labels", "classes_from_stats", "value_stats", "mask_stats", "speckled", "check_present", "COHERENT",
           "SMEARED"]

COHERENT = 0.5  # a value with fewer of its pixels beside an equal one (in its best direction) is speckled
SMEARED = 2  # this many speckled values read as a smeared mask, not as classes
_SHOWN = 3  # files named in a message; the rest are counted
_BINARY_FIX = ("if 255 marks the object (a binary mask saved 0/255), pass --binary-255 (255 -> class 1); "
               "otherwise save the object with its class index")


def value_stats(m: np.ndarray) -> np.ndarray:
    """int64 [3, 256] of a uint8 mask [H, W]: per value, its pixels, the horizontally adjacent
    pairs that both hold it, and the vertically adjacent ones."""
    right, below = m[:, 1:] == m[:, :-1], m[1:] == m[:-1]
    return np.stack([np.bincount(m.reshape(-1), minlength=256), np.bincount(m[:, 1:][right], minlength=256),
                     np.bincount(m[1:][below], minlength=256)])


def mask_stats(path: str) -> np.ndarray | None:
    """:func:`value_stats` of one mask file, or None when it cannot be read (its own sample reports
    that when it loads). Runs in pool workers: PIL and numpy only."""
    try:
        return value_stats(np.asarray(open_mask(path), dtype=np.uint8))
    except DataError:
        return None


def _read_stats(paths: Sequence[Path], workers: int) -> dict[Path, np.ndarray]:
    found = parallel_map(mask_stats, [str(p) for p in paths], max(1, min(workers, len(paths))))
    return {p: h for p, h in zip(paths, found) if h is not None}


def _values(v: Sequence[int]) -> str:
    v = [int(x) for x in v]
    shown = ", ".join(str(x) for x in v[:6])
    return shown + (f" and {len(v) - 6} more" if len(v) > 6 else "")


def _holders(hists: dict[Path, np.ndarray], values: Sequence[int]) -> str:
    """The files holding most of ``values``, with those values and their pixel counts."""
    values = [int(v) for v in values]
    ranked = sorted(((int((h[values] > 0).sum()), p) for p, h in hists.items()), key=lambda t: -t[0])
    ranked = [(k, p) for k, p in ranked if k]
    parts = []
    for _, p in ranked[:_SHOWN]:
        held = [v for v in values if hists[p][v]]
        parts.append(f"{p} ({', '.join(f'{v}: {int(hists[p][v])} px' for v in held[:4])}"
                     f"{', ...' if len(held) > 4 else ''})")
    more = len(ranked) - _SHOWN
    return "; ".join(parts) + (f"; and {more} more file{'s' if more > 1 else ''}" if more > 0 else "")


def _refuse_degenerate(total: np.ndarray, present: np.ndarray, n: int, folder: Path) -> None:
    if present.size == 0:
        raise DataError(f"{folder}: none of the {n} masks holds a class value (only {IGNORE_INDEX} = ignore); "
                        f"expected class indices 0..C-1")
    if present.tolist() == [0] and total[IGNORE_INDEX]:
        raise DataError(f"{folder}: every one of the {n} masks holds only 0 and {IGNORE_INDEX}, and {IGNORE_INDEX} "
                        f"means ignore: the objects would vanish and one class be left to learn; {_BINARY_FIX}")
    if present.tolist() == [0]:
        raise DataError(f"{folder}: every one of the {n} masks holds only 0: one class, nothing to segment; "
                        "expected class indices 0..C-1 with at least 2 classes")


def speckled(total: np.ndarray) -> np.ndarray:
    """The values below 255 whose pixels are mostly isolated: int64 [k], from summed stats [3, 256]."""
    counts, coherent = total[0, :IGNORE_INDEX], np.maximum(total[1], total[2])[:IGNORE_INDEX]
    present = np.flatnonzero(counts)
    return present[coherent[present] < COHERENT * counts[present]]


def classes_from_stats(stats: dict[Path, np.ndarray], unpaired: dict[Path, np.ndarray] | None = None, *,
                       folder: Path | str = "masks/") -> tuple[int, list[str]]:
    """C inferred from the masks' value statistics, and the warnings it deserves (see the module).

    Args:
        stats: path -> int64 [3, 256] (:func:`value_stats`), for the masks that have an image.
        unpaired: the same for masks without an image (not counted; named if they would matter).
        folder: the masks' folder, for messages.

    Returns:
        (C, warnings): C >= 2; each warning is one sentence naming files.

    Raises:
        DataError: an implausible label set (no class, one class, 0/255 only, smeared values).
    """
    total = np.sum(list(stats.values()), axis=0) if stats else np.zeros((3, 256), dtype=np.int64)
    counts = {p: s[0] for p, s in stats.items()}
    labelled = total[0, :IGNORE_INDEX]
    present = np.flatnonzero(labelled)
    _refuse_degenerate(total[0], present, len(stats), Path(folder))
    c = int(present[-1]) + 1
    specks = speckled(total)
    if specks.size >= SMEARED:
        raise DataError(f"{folder}: {specks.size} of the {present.size} values in the masks occur as isolated pixels, "
                        f"not regions ({_values(specks)}; e.g. {_holders(counts, specks)}): the masks look smeared by "
                        f"lossy compression (JPEG), and C = {c} classes would be inferred from them; save them as PNGs "
                        "of class indices, or list the classes in classes.txt (then each mask holding another value "
                        "is named)")
    notes = []
    if specks.size:
        notes.append(f"value {int(specks[0])} occurs as isolated pixels, not a region, in {_holders(counts, specks)}: "
                     "check those masks")
    missing = sorted(set(range(c)) - set(present.tolist()))
    if missing:
        beyond = present[present > missing[0]]
        notes.append(f"C = {c} classes inferred from the largest mask value {c - 1}, but no mask holds "
                     f"{_values(missing)}; the values above the gap come from {_holders(counts, beyond)}: check "
                     "those files, or list the classes in classes.txt")
    stray = {p: s[0] for p, s in (unpaired or {}).items() if (s[0, :IGNORE_INDEX] * (labelled == 0)).any()}
    if stray:
        odd = np.flatnonzero(np.sum(list(stray.values()), axis=0)[:IGNORE_INDEX] * (labelled == 0))
        n = len(stray)
        notes.append(f"{n} mask{'s' if n > 1 else ''} without an image hold{'' if n > 1 else 's'} values no paired "
                     f"mask has ({_values(odd)}): {_holders(stray, odd)}; they are not counted (C = {c} from the "
                     f"{len(stats)} masks with an image)")
    return c, notes


def infer_labels(src: Source, workers: int) -> LabelMap:
    """The ``LabelMap`` of a layout without class names: C from its masks (see the module).

    Raises:
        DataError: an implausible label set, naming the files and the fix.
    """
    folder = Path(src.infer_from[0]).parent if src.infer_from else src.root / "masks"
    c, notes = classes_from_stats(_read_stats(src.infer_from, workers), _read_stats(src.unpaired, workers),
                                  folder=folder)
    for note in notes:
        warnings.warn(f"{folder}: {note}", DataWarning, stacklevel=3)
    return LabelMap.indices(unnamed(c))


def check_present(data, *, what: str = "the training split") -> None:
    """Refuse data in which fewer than 2 classes occur: a model would learn nothing (a 1-class
    model reaches loss 0 and mean IoU 1.0 at once).

    Args:
        data: anything with ``class_names`` and ``class_counts()`` (int64 [C]), e.g. ``PreparedData``.

    Raises:
        DataError: one class named, or one present; says what to do.
    """
    names = tuple(data.class_names)
    counts = data.class_counts().tolist()
    occurring = [n for n, k in zip(names, counts) if k]
    if len(names) < 2:
        raise DataError(f"{what} has {len(names)} class ({', '.join(names)}): nothing to segment; expected at "
                        "least 2 classes (e.g. background and object)")
    if len(occurring) < 2:
        found = occurring[0] if occurring else "none"
        raise DataError(f"{what} has {len(names)} classes ({', '.join(names)}) but its {len(data)} masks hold only "
                        f"{found!s} (every other pixel is {IGNORE_INDEX} = ignore or absent): a model would learn "
                        f"nothing; {_BINARY_FIX}")
