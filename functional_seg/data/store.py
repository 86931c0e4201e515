"""Where a prepared split's samples live, and the one way to copy some of them out: ``Store.gather``.

A ``Store`` is the split's rows 0..N-1 in order, held in segments (one per shard): each segment's
uint8 images ``[k, 3, H, W]`` and masks ``[k, H, W]`` are either in this process's memory or
memory-mapped read-only from the shard file, so every process on a node reads one copy in the
page cache and a split larger than memory streams through it. ``gather(rows, images, masks)``
copies the given rows into caller-owned buffers (pinned ones, for the loader on CUDA), one
sample at a time with numpy, which releases the GIL and never starts torch's thread pool from
the loader's background thread.

Integrity: a shard's tensors are checked against the sha256 its index recorded the first time
this process opens it (the first gather that touches it, on the loader's prefetch thread; all
of them up front when the split is loaded into memory), reading the file in 4 MiB pieces so the
check maps nothing. sha256 runs at 0.6-1 GB/s on one core of the shared 2-core machine this was
measured on (``benchmarks/bench_data_scale.py``), so a 64 MiB shard costs 70-100 ms once per
process: a few seconds spread over the first batches of a 4 GB split, before any of it is used.
A damaged shard is rebuilt from the source when the store knows how (``prepare`` gives each
shard's rebuild) and the rebuilt tensors hash to the recorded digest; otherwise it is refused
with one line naming the shard file.

Reads: a mapped shard is advised ``MADV_RANDOM`` (no read-around: on a disk whose read-ahead is
8 MiB, each 64 KiB sample would otherwise pull 128 times its size into the page cache, and a
memory-limited process thrashes), and each gather first asks for exactly its rows' bytes
(``MADV_WILLNEED``), so a cold batch is one burst of reads the disk serves together.

Resident pages: reading a mapped shard counts the pages it maps in this process's RSS (shared
and reclaimable, but ``top`` shows them, and on kernels whose page cache holds large folios one
64 KiB read can map up to 2 MiB). So after each gather the store drops its mappings of the shards
that gather touched (``madvise(MADV_DONTNEED)``; the page cache keeps the data, so the next read
costs a page-table fill, not a disk read): RSS holds about one batch of the split, whatever its size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..runtime import host_memory_available
from .shards import OpenShard, ShardError, open_shard

__all__ = ["Store", "MemorySegment", "ShardSegment", "keep_in_memory", "RESIDENT_MAX_BYTES", "RELEASE_AFTER_GATHER"]

RESIDENT_MAX_BYTES = 1 << 30  # splits up to 1 GiB (and 1/8 of the free memory) are held in memory
RELEASE_AFTER_GATHER = True  # drop mapped pages from RSS after each gather (False: keep them, to measure sharing)


def keep_in_memory(nbytes: int, available: int | None = None) -> bool:
    """Whether a split of ``nbytes`` is read into memory rather than mapped: when it is at most
    ``RESIDENT_MAX_BYTES`` and at most 1/8 of ``available`` (default: ``host_memory_available()``,
    which honours a cgroup limit). Eight data-parallel processes on a node each hold their own copy
    of an in-memory split; mapped shards are one copy in the page cache for all of them."""
    available = host_memory_available() if available is None else available
    return nbytes <= RESIDENT_MAX_BYTES and (available is None or 8 * nbytes <= available)


class MemorySegment:
    """Rows held in this process's memory: uint8 images [k, 3, H, W], masks [k, H, W]."""

    mapped = False

    def __init__(self, images: np.ndarray, masks: np.ndarray):
        self.images, self.masks = images, masks
        self.count = int(images.shape[0])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.images, self.masks

    def willneed(self, rows) -> None:
        pass

    def release(self) -> None:
        pass


class ShardSegment:
    """The rows of one shard file, opened (mapped or read) and checked on first use.

    Args:
        path: the shard file.
        count: k, the rows the index says it holds.
        sha256: the digest the index recorded for its tensors.
        mapped: memory-map it (else read it into memory when first used).
        rebuild: rewrites the shard from the source and says whether it could (None: it cannot).
    """

    def __init__(self, path: Path, count: int, sha256: str, *, mapped: bool,
                 rebuild: Callable[[], bool] | None = None):
        self.path, self.count, self.sha256, self.mapped = Path(path), int(count), sha256, mapped
        self._rebuild = rebuild
        self._shard: OpenShard | None = None
        self._lock = threading.Lock()

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        shard = self._shard
        if shard is None:
            with self._lock:
                if self._shard is None:
                    self._shard = self._open()
                shard = self._shard
        return shard.images, shard.masks

    def _open(self) -> OpenShard:
        try:
            shard = open_shard(self.path, mapped=self.mapped, expect=self.sha256)
        except ShardError as e:
            if self._rebuild is None or not self._rebuild():
                raise ShardError(f"{e}; it cannot be rebuilt from the source (changed or missing): delete "
                                 f"{self.path.parent} and prepare the split again") from None
            shard = open_shard(self.path, mapped=self.mapped, expect=self.sha256)
        if shard.header.count != self.count:
            raise ShardError(f"{self.path}: prepared shard holds {shard.header.count} samples; the index says "
                             f"{self.count}")
        return shard

    def willneed(self, rows) -> None:
        self.arrays()  # opened (and checked) first
        self._shard.willneed(rows)

    def release(self) -> None:
        if self._shard is not None:
            self._shard.release()


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
    def mapped(self) -> bool:
        """True when any segment is read through a memory map."""
        return any(s.mapped for s in self.segments)

    @property
    def sample_bytes(self) -> int:
        return 4 * self.hw[0] * self.hw[1]

    def gather(self, rows: np.ndarray, images: np.ndarray | None, masks: np.ndarray | None) -> None:
        """Copy ``rows`` (int64 [B], each in [0, N)) into ``images`` (uint8 [B, 3, H, W]) and
        ``masks`` (uint8 [B, H, W]); either buffer may be None to skip it."""
        if len(self.segments) == 1:  # one call per buffer
            touched = [0]
            src_images, src_masks = self.segments[0].arrays()
            self.segments[0].willneed(rows.tolist())
            if images is not None:
                np.take(src_images, rows, axis=0, out=images)
            if masks is not None:
                np.take(src_masks, rows, axis=0, out=masks)
        else:
            seg = np.searchsorted(self.starts, rows, side="right") - 1
            local = rows - self.starts[seg]
            touched = np.unique(seg).tolist()
            if self.mapped:  # every read of the batch requested before the first copy waits on one
                for s in touched:
                    self.segments[s].willneed(local[seg == s].tolist())
            for j, (s, i) in enumerate(zip(seg.tolist(), local.tolist())):
                src_images, src_masks = self.segments[s].arrays()
                if images is not None:
                    images[j] = src_images[i]
                if masks is not None:
                    masks[j] = src_masks[i]
        if RELEASE_AFTER_GATHER:
            for s in touched:
                self.segments[s].release()

    def release(self) -> None:
        """Drop the mapped pages this process holds (see the module docstring)."""
        for s in self.segments:
            s.release()

    def verify_all(self) -> None:
        """Open (and so check) every segment now."""
        for s in self.segments:
            s.arrays()
