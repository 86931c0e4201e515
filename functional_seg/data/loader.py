"""Batches of a prepared split, shuffled by an explicit key, gathered ahead on a background thread.

``Loader(data, B).epoch(key)`` yields images uint8 ``[B, 3, H, W]`` and masks int64 ``[B, H, W]``
on the device. The order is ``core.random.permutation(key, N)`` cut into GLOBAL batches of B;
with ``shard=(rank, world)`` each process gathers only its slice of every global batch, so the
maths does not depend on the world size and a resumed run replays the same batches.

Each batch is copied out of the split with ``PreparedData.gather`` (from its shard files or from
memory: the same call) into fresh buffers, pinned when the device is CUDA so the copy to the
device is asynchronous; masks travel as uint8 and become int64 on the device. A background
thread gathers up to ``prefetch`` batches ahead of the step, so the step waits on neither the
disk nor the copy; the order and the bytes are the same as gathering in the loop
(``prefetch=0``). With ``resident=True`` the whole split is copied to the device once and batches
are gathered there (3,680 images at 128 px are 180 MB as uint8, which fits any GPU).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch

from ..core import random as fr
from .prepared import PreparedData

__all__ = ["Loader"]

_POLL_S = 0.1  # how often a blocked producer checks whether the consumer has gone


class Loader:
    """Shuffled (or ordered) batches of a ``PreparedData`` on a device.

    Args:
        data: a prepared split (images uint8 [N, 3, H, W], masks uint8 [N, H, W]), in memory or in shards.
        batch_size: samples per (global) batch B.
        device: where batches land.
        shuffle: permute the samples each epoch with the key given to ``epoch``.
        drop_last: drop the final short batch (keeps shapes static for ``torch.compile``).
        resident: keep the whole dataset on ``device`` and gather there.
        shard: ``(rank, world_size)`` for data parallelism: each batch is still chosen from the
            GLOBAL batch of ``batch_size`` (the same permutation on every rank), and this rank
            gathers only its contiguous slice of ``batch_size // world_size`` samples.
        prefetch: batches gathered ahead on a background thread (0: gather in the loop).
        extra: optional int64 [N], one value per sample (e.g. its fold for K-fold training),
            yielded as a third batch element int64 [B] gathered with the same indices.
    """

    def __init__(
        self,
        data: PreparedData,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        shuffle: bool = True,
        drop_last: bool = True,
        resident: bool = False,
        shard: tuple[int, int] = (0, 1),
        prefetch: int = 2,
        extra: torch.Tensor | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"Loader: batch_size must be >= 1, got {batch_size}")
        rank, world = shard
        if batch_size % world or not 0 <= rank < world:
            raise ValueError(f"Loader: shard {shard} needs 0 <= rank < world size dividing batch_size {batch_size}")
        if prefetch < 0:
            raise ValueError(f"Loader: prefetch must be >= 0, got {prefetch}")
        self.shard = (int(rank), int(world))
        if len(data) == 0:
            raise ValueError("Loader: the data is empty")
        self.data = data
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.prefetch = int(prefetch)
        self.pinned = self.device.type == "cuda" and not resident
        self._resident = (data.images.to(self.device), data.masks.to(self.device)) if resident else None
        if extra is not None and extra.shape != (len(data),):
            raise ValueError(f"Loader: extra must hold one value per sample [{len(data)}], got {tuple(extra.shape)}")
        self._extra = extra
        if drop_last and len(data) < batch_size:
            raise ValueError(
                f"Loader: {len(data)} samples give no full batch of {batch_size} with drop_last=True"
            )

    def __len__(self) -> int:
        n, b = len(self.data), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    @property
    def num_samples(self) -> int:
        """Samples yielded per epoch."""
        return len(self) * self.batch_size if self.drop_last else len(self.data)

    def _indices(self, order: torch.Tensor, i: int) -> torch.Tensor:
        """Batch i's indices for this rank: its slice of the global batch."""
        idx = order[i * self.batch_size : (i + 1) * self.batch_size]
        rank, world = self.shard
        if world > 1:
            local = self.batch_size // world
            idx = idx[rank * local : (rank + 1) * local]
        return idx

    def _host_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather on the host: uint8 images and masks (pinned for CUDA); masks int64 on a CPU target."""
        h, w = self.data.hw
        b = idx.numel()
        # Fresh buffers per batch: the caching host allocator reuses a pinned one only after the
        # asynchronous copy out of it has finished.
        out = (torch.empty((b, 3, h, w), dtype=torch.uint8, pin_memory=self.pinned),
               torch.empty((b, h, w), dtype=torch.uint8, pin_memory=self.pinned))
        images, masks = self.data.gather(idx, out=out)
        if self.device.type == "cpu":
            # numpy's cast: single-threaded, so this thread never starts a second torch thread pool
            masks = torch.from_numpy(masks.numpy().astype("int64"))
        return images, masks

    def _to_device(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cpu":
            return images, masks
        images = images.to(self.device, non_blocking=True)
        masks = masks.to(self.device, non_blocking=True).to(torch.int64)
        return images, masks

    def epoch(self, key: torch.Tensor | None = None, *, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the data.

        Args:
            key: random key for the permutation; required when ``shuffle`` (may be None otherwise).
            start: first batch to yield (a run resumed mid-epoch): the earlier ones are not gathered.

        Yields:
            (images uint8 [B, 3, H, W], masks int64 [B, H, W]) on ``device``, and the ``extra``
            values int64 [B] as a third element when the loader was given some.
        """
        n = len(self.data)
        on = self._resident[0].device if self._resident is not None else torch.device("cpu")
        if self.shuffle:
            if key is None:
                raise ValueError("Loader.epoch needs a random key (key=...) when shuffle=True, got None")
            order = fr.permutation(key.to(on), n)
        else:
            order = torch.arange(n, device=on)
        batches = range(max(0, int(start)), len(self))
        if self._extra is None:
            yield from self._batches(order, batches)
            return
        extra = self._extra.to(order.device)
        for i, (images, masks) in zip(batches, self._batches(order, batches)):
            yield images, masks, extra.index_select(0, self._indices(order, i)).to(self.device)

    def _batches(self, order: torch.Tensor, batches: range) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, masks) of each batch in ``batches``, from the device copy, in the loop or prefetched."""
        if self._resident is not None:
            for i in batches:
                idx = self._indices(order, i)
                yield self._resident[0].index_select(0, idx), self._resident[1].index_select(0, idx).to(torch.int64)
        elif self.prefetch == 0:
            for i in batches:
                yield self._to_device(*self._host_batch(self._indices(order, i)))
        else:
            for images, masks in _prefetched(lambda i: self._host_batch(self._indices(order, i)), batches,
                                             self.prefetch):
                yield self._to_device(images, masks)

    def __iter__(self):
        if self.shuffle:
            raise TypeError("Loader: iterate over loader.epoch(key); a shuffled loader needs a key per epoch")
        return self.epoch(None)


def _prefetched(make, items: range, depth: int) -> Iterator:
    """``make(i)`` for each i in ``items``, in order, computed up to ``depth`` ahead on a daemon
    thread. An exception there is raised here at its place in the order; closing this generator
    (a finished or abandoned epoch) stops and joins the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for i in items:
                if not put((True, make(i))):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put((False, e))

    thread = threading.Thread(target=produce, name="fseg-loader-prefetch", daemon=True)
    thread.start()
    try:
        for _ in items:
            ok, value = q.get()
            if not ok:
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
