"""Where a prepared split's samples live, and the one way to copy some of them out: ``Store.gather``.

A ``Store`` is the split's rows 0..N-1 in order, held in segments (one per shard): a
``MemorySegment`` holds its uint8 images ``[k, 3, H, W]`` and masks ``[k, H, W]`` in this
process's memory; a ``ShardSegment`` reads the rows it is asked for from its shard file, through
the page cache, straight into the caller's buffers (pinned ones, for the loader on CUDA). So every
process on a machine shares one copy of a split in the page cache, none holds it in its own
memory, and a split larger than memory streams through. Copies are numpy's and ``os.preadv``'s,
which release the GIL and never start torch's thread pool from the loader's background thread.
Rows already in the page cache are copied without waiting; the others are asked for together
(``posix_fadvise(WILLNEED)``) and then read (``shards.ShardFile``).

Why ``pread`` and not ``mmap``: both read the same page cache, but on this project's CPU machine
(kernel 6.18, ext4, whose page cache holds large folios), gathering 64 random 128 px samples of
a 2 GB split, side by side in one process on a loaded machine, took 7-11 ms mapped (page
faults, then ``MADV_DONTNEED`` to keep RSS bounded) against 3.1-4.4 ms with ``preadv`` and
1.6-1.8 ms from memory; in a quiet moment 0.73 ms with ``preadv`` (rows in the page cache read
with ``RWF_NOWAIT``) against 0.44 ms from memory. And a mapping left in place mapped up to a
2 MiB folio per 64 KiB read: RSS grew to 1.7 GB after 200 MB of reads. (The mapped variant is
in this file's history; ``benchmarks/bench_data_scale.py`` measures the loader.)

Integrity: a shard's tensors are checked against the sha256 its index recorded the first time
this process opens it (the first gather that touches it, on the loader's prefetch thread; all
of them up front when the split is loaded into memory). sha256 runs at 0.6-1.4 GB/s on one core
of the shared 2-core machine this was measured on, so a 64 MiB shard costs 50-100 ms once per
process: a few seconds, spread over the first batches, for a 4 GB split. A damaged shard is
rebuilt from the source when the store knows how (``prepare`` gives each shard its rebuild) and
the rebuilt tensors hash to the recorded digest; otherwise it is refused with one line naming
the shard file. Each opened shard keeps one file descriptor open.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..runtime import host_memory_available
from .shards import ShardError, ShardFile, read_shard

__all__ = ["Store", "MemorySegment", "ShardSegment", "keep_in_memory", "RESIDENT_MAX_BYTES"]

RESIDENT_MAX_BYTES = 1 << 30  # splits up to 1 GiB (and 1/8 of the free memory) are held in memory


def keep_in_memory(nbytes: int, available: int | None = None) -> bool:
    """Whether a split of ``nbytes`` is read into memory rather than read from its shards per
    batch: when it is at most ``RESIDENT_MAX_BYTES`` and at most 1/8 of ``available`` (default:
    ``host_memory_available()``, which honours a cgroup limit). Eight data-parallel processes on a
    node each hold their own copy of an in-memory split; shards are one copy in the page cache."""
    available = host_memory_available() if available is None else available
    return nbytes <= RESIDENT_MAX_BYTES and (available is None or 8 * nbytes <= available)


class MemorySegment:
    """Rows held in this process's memory: uint8 images [k, 3, H, W], masks [k, H, W]."""

    on_disk = False

    def __init__(self, images: np.ndarray, masks: np.ndarray):
        self.images, self.masks = images, masks
        self.count = int(images.shape[0])

    def willneed(self, rows) -> None:
        pass

    def read_cached(self, rows, positions, images: np.ndarray | None, masks: np.ndarray | None) -> list[int]:
        self.read_rows(rows, positions, images, masks)
        return []

    def read_rows(self, rows, positions, images: np.ndarray | None, masks: np.ndarray | None) -> None:
        for i, j in zip(rows, positions):
            if images is not None:
                images[j] = self.images[i]
            if masks is not None:
                masks[j] = self.masks[i]

    def load(self) -> MemorySegment:
        return self


class ShardSegment:
    """The rows of one shard file, opened and checked on first use.

    Args:
        path: the shard file.
        count: k, the rows the index says it holds.
        sha256: the digest the index recorded for its tensors.
        rebuild: rewrites the shard from the source and says whether it could (None: it cannot).
    """

    on_disk = True

    def __init__(self, path: Path, count: int, sha256: str, rebuild: Callable[[], bool] | None = None):
        self.path, self.count, self.sha256 = Path(path), int(count), sha256
        self._rebuild = rebuild
        self._file: ShardFile | None = None
        self._lock = threading.Lock()

    def _checked(self, open_: Callable):
        """``open_()`` (which checks the digest), rebuilding a damaged shard once if it can."""
        try:
            return open_()
        except ShardError as e:
            if self._rebuild is None or not self._rebuild():
                raise ShardError(f"{e}; it cannot be rebuilt from the source (changed or missing): delete "
                                 f"{self.path.parent} and prepare the split again") from None
            return open_()

    def file(self) -> ShardFile:
        """The open, checked shard (opened by the first caller; later ones wait for it)."""
        shard = self._file
        if shard is None:
            with self._lock:
                if self._file is None:
                    self._file = self._checked(lambda: ShardFile(self.path, expect=self.sha256))
                    if self._file.header.count != self.count:
                        raise ShardError(f"{self.path}: prepared shard holds {self._file.header.count} samples; "
                                         f"the index says {self.count}")
                shard = self._file
        return shard

    def willneed(self, rows) -> None:
        self.file().willneed(rows)

    def read_cached(self, rows, positions, images: np.ndarray | None, masks: np.ndarray | None) -> list[int]:
        return self.file().read_cached(rows, positions, images, masks)

    def read_rows(self, rows, positions, images: np.ndarray | None, masks: np.ndarray | None) -> None:
        self.file().read_rows(rows, positions, images, masks)

    def load(self) -> MemorySegment:
        """Read the whole shard into memory, checked (and rebuilt if damaged and possible)."""
        header, images, masks = self._checked(lambda: read_shard(self.path, expect=self.sha256))
        if header.count != self.count:
            raise ShardError(f"{self.path}: prepared shard holds {header.count} samples; the index says {self.count}")
        return MemorySegment(images, masks)


class Store:
    """A split's rows 0..N-1, in segments.

    Args:
        segments: ``MemorySegment`` / ``ShardSegment`` in row order.
        hw: (H, W) of every image and mask.
        label_counts: pixels per stored value 0..255 over all rows, int64 [256], if known.
    """

    def __init__(self, segments: Sequence[MemorySegment | ShardSegment], hw: tuple[int, int],
                 label_counts: np.ndarray | None = None):
        self.segments = list(segments)
        self.hw = (int(hw[0]), int(hw[1]))
        self.starts = np.cumsum([0, *(s.count for s in self.segments)]).astype(np.int64)
        self.label_counts = label_counts

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def on_disk(self) -> bool:
        """True when any segment is read from its shard file per gather."""
        return any(s.on_disk for s in self.segments)

    @property
    def sample_bytes(self) -> int:
        return 4 * self.hw[0] * self.hw[1]

    def gather(self, rows: np.ndarray, images: np.ndarray | None, masks: np.ndarray | None) -> None:
        """Copy ``rows`` (int64 [B], each in [0, N)) into ``images`` (C-contiguous uint8
        [B, 3, H, W]) and ``masks`` (uint8 [B, H, W]); either buffer may be None to skip it."""
        if len(self.segments) == 1 and not self.segments[0].on_disk:  # one call per buffer
            seg = self.segments[0]
            if images is not None:
                np.take(seg.images, rows, axis=0, out=images)
            if masks is not None:
                np.take(seg.masks, rows, axis=0, out=masks)
            return
        seg = np.searchsorted(self.starts, rows, side="right") - 1
        local = rows - self.starts[seg]
        todo = []
        for s in np.unique(seg).tolist():  # what the page cache holds, copied without waiting
            positions = np.flatnonzero(seg == s)
            rows_s = local[positions]
            misses = self.segments[s].read_cached(rows_s.tolist(), positions.tolist(), images, masks)
            if misses:
                todo.append((self.segments[s], rows_s[misses].tolist(), positions[misses].tolist()))
        for segment, rows_s, _ in todo:  # the rest asked for at once, before the first read waits
            segment.willneed(rows_s)
        for segment, rows_s, positions in todo:
            segment.read_rows(rows_s, positions, images, masks)

    def in_memory(self) -> Store:
        """This store with every shard read into memory (checked) instead of read per gather."""
        return Store([s.load() for s in self.segments], self.hw, self.label_counts)
