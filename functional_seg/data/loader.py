"""Batches from prepared in-memory tensors, shuffled by an explicit key, moved without per-sample loops.

A ``Loader`` holds the uint8 tensors of a ``PreparedData`` (pinned when the target is CUDA, so
copies are asynchronous). Each batch is one ``index_select`` per tensor into a fresh (pinned)
buffer and one ``.to(device, non_blocking=True)``; masks travel as uint8 and become int64 on the
device. ``epoch(key)`` yields images uint8 [B, 3, S, S] and masks int64 [B, S, S].

With ``resident=True`` the whole dataset is copied to the device once and batches are gathered
there (3,680 images at 128 px are 180 MB as uint8, which fits any GPU).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..core import random as fr
from .prepared import PreparedData

__all__ = ["Loader"]


class Loader:
    """Shuffled (or ordered) batches of a ``PreparedData`` on a device.

    Args:
        data: prepared images uint8 [N, 3, S, S] and masks uint8 [N, S, S].
        batch_size: samples per batch B.
        device: where batches land.
        shuffle: permute the samples each epoch with the key given to ``epoch``.
        drop_last: drop the final short batch (keeps shapes static for ``torch.compile``).
        resident: keep the whole dataset on ``device`` and gather there.
        shard: ``(rank, world_size)`` for data parallelism: each batch is still chosen from the
            GLOBAL batch of ``batch_size`` (the same permutation on every rank), and this rank
            gathers only its contiguous slice of ``batch_size // world_size`` samples.
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
        extra: torch.Tensor | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"Loader: batch_size must be >= 1, got {batch_size}")
        rank, world = shard
        if batch_size % world or not 0 <= rank < world:
            raise ValueError(f"Loader: shard {shard} needs 0 <= rank < world size dividing batch_size {batch_size}")
        self.shard = (int(rank), int(world))
        if len(data) == 0:
            raise ValueError("Loader: the data is empty")
        self.data = data
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.drop_last = drop_last
        images, masks = data.images, data.masks
        self._pin = self.device.type == "cuda" and not resident
        if resident:
            images, masks = images.to(self.device), masks.to(self.device)
        elif self._pin:
            images, masks = images.pin_memory(), masks.pin_memory()
        self._images, self._masks = images, masks
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

    def _gather(self, src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if not self._pin:
            return src.index_select(0, idx)
        # A fresh pinned buffer per batch: the caching host allocator only reuses it after the
        # asynchronous copy out of it has finished.
        out = torch.empty((idx.numel(), *src.shape[1:]), dtype=src.dtype, pin_memory=True)
        return torch.index_select(src, 0, idx, out=out)

    def epoch(self, key: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the data.

        Args:
            key: random key for the permutation; required when ``shuffle`` (may be None otherwise).

        Yields:
            (images uint8 [B, 3, S, S], masks int64 [B, S, S]) on ``device``.
        """
        n = len(self.data)
        if self.shuffle:
            if key is None:
                raise ValueError("Loader.epoch needs a random key (key=...) when shuffle=True, got None")
            order = fr.permutation(key.to(self._images.device), n)
        else:
            order = torch.arange(n, device=self._images.device)
        rank, world = self.shard
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            if world > 1:
                local = self.batch_size // world
                idx = idx[rank * local : (rank + 1) * local]
            images = self._gather(self._images, idx)
            masks = self._gather(self._masks, idx)
            images = images.to(self.device, non_blocking=True)
            masks = masks.to(self.device, non_blocking=True).to(torch.int64)
            if self._extra is None:
                yield images, masks
            else:
                yield images, masks, self._extra[idx.cpu()].to(self.device)

    def __iter__(self):
        if self.shuffle:
            raise TypeError("Loader: iterate over loader.epoch(key); a shuffled loader needs a key per epoch")
        return self.epoch(None)
