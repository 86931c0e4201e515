"""``PreparedData``: a prepared split, the same object whether its samples sit in memory or are
read from its shard files per batch.

A split holds N samples: uint8 images ``[N, 3, H, W]`` (RGB) and masks ``[N, H, W]`` (labels
0..C-1, ``IGNORE_INDEX`` where the mask said ignore or the "pad" policy padded), their names and
the C class names. ``prepare`` (``data.cache``) makes one from a dataset; tests and tools may
build one from tensors (``PreparedData(images=..., masks=..., names=..., class_names=...)``).

Samples are read through ``gather(indices)`` (what the loader calls per batch), which copies just
those rows out of the ``store.Store``; ``subset``, ``repeat`` and ``carve`` are cheap views (an
index over the same store, nothing copied). ``images`` and ``masks`` still give the whole split
as tensors: free for a split built from tensors, a full copy otherwise (tests, plots and small
splits; training code uses ``gather``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .labels import IGNORE_INDEX
from .source import seeded_order
from .store import MemorySegment, Store

__all__ = ["PreparedData", "overlap"]

_CHUNK = 256  # rows per scan in class_counts / mean_std: a float64 copy of everything is too big


def _as_rows(indices, n: int, what: str) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        idx = indices.detach().to("cpu", torch.int64).reshape(-1).numpy()
    else:
        idx = np.asarray(indices if not isinstance(indices, range) else np.arange(
            indices.start, indices.stop, indices.step), dtype=np.int64).reshape(-1)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise IndexError(f"{what}: indices must lie in [0, {n}), got {int(idx.min())}..{int(idx.max())}")
    return idx


class PreparedData:
    """A prepared split (immutable).

    Args:
        images: uint8 [N, 3, H, W], RGB (with ``masks``: a split held in memory).
        masks: uint8 [N, H, W], labels 0..C-1 or IGNORE_INDEX (ignored or padded pixels).
        names: N sample names, in data order.
        cache_path: the prepared cache (a folder of shards) it was read from (None if uncached).
        skipped: messages for samples skipped with ``strict=False``.
        class_names: C names, label i is ``class_names[i]``, as the layout named them (required:
            no layout's names are assumed).
        layout: the dataset layout it came from ("oxford_pets", "generic", "voc"), if known.
        policy: how the images were fitted to the training frame ("resize" or "pad"); the training
            contract (``Preprocess.policy``) records it, so predict fits images the same way.
        store, rows: instead of ``images``/``masks``: the ``store.Store`` its samples live in and
            which of the store's rows it is (None: all, in order). ``prepare`` and the views pass these.
    """

    def __init__(self, images: torch.Tensor | None = None, masks: torch.Tensor | None = None,
                 names: Sequence[str] = (), cache_path: Path | None = None, skipped: Sequence[str] = (),
                 class_names: Sequence[str] = (), *, layout: str | None = None, policy: str = "resize",
                 store: Store | None = None,
                 rows: np.ndarray | None = None):
        if store is None:
            store = self._memory_store(images, masks)
        elif images is not None or masks is not None:
            raise ValueError("PreparedData: pass images and masks, or a store, not both")
        n = len(store) if rows is None else len(rows)
        if len(names) != n:
            raise ValueError(f"PreparedData.names: {len(names)} names for {n} images")
        if not 1 <= len(class_names) <= IGNORE_INDEX:
            raise ValueError(f"PreparedData.class_names: need 1 to {IGNORE_INDEX} names, got {len(class_names)}")
        values = {"_store": store, "_rows": rows, "names": tuple(names), "cache_path": cache_path,
                  "skipped": tuple(skipped), "class_names": tuple(class_names), "layout": layout, "policy": policy}
        for k, v in values.items():
            object.__setattr__(self, k, v)

    @staticmethod
    def _memory_store(images, masks) -> Store:
        im, mk = images, masks
        if not isinstance(im, torch.Tensor) or im.dtype != torch.uint8 or im.ndim != 4 or im.shape[1] != 3:
            got = f"{im.dtype} {tuple(im.shape)}" if isinstance(im, torch.Tensor) else type(im).__name__
            raise ValueError(f"PreparedData.images: expected uint8 [N, 3, H, W], got {got}")
        if not isinstance(mk, torch.Tensor) or mk.dtype != torch.uint8 or mk.shape != (im.shape[0], *im.shape[2:]):
            got = f"{mk.dtype} {tuple(mk.shape)}" if isinstance(mk, torch.Tensor) else type(mk).__name__
            raise ValueError(f"PreparedData.masks: expected uint8 {(im.shape[0], *im.shape[2:])}, got {got}")
        return Store([MemorySegment(im.detach().cpu().numpy(), mk.detach().cpu().numpy())], tuple(im.shape[2:]))

    def __setattr__(self, name, value):
        raise AttributeError(f"PreparedData is immutable (cannot set {name!r}); subset() or repeat() make new views")

    def __len__(self) -> int:
        return len(self._store) if self._rows is None else len(self._rows)

    def __repr__(self) -> str:
        h, w = self.hw
        return (f"PreparedData({len(self)} samples, {h}x{w}, {self.num_classes} classes, {self.storage}"
                + (f", {self.cache_path}" if self.cache_path else "") + ")")

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return len(self.class_names)

    @property
    def hw(self) -> tuple[int, int]:
        """(H, W) of every image and mask."""
        return self._store.hw

    @property
    def size(self) -> int | tuple[int, int]:
        """S for square S x S samples (as ``prepare(size=S)`` and ``Preprocess.size`` say it), else (H, W)."""
        h, w = self.hw
        return h if h == w else (h, w)

    @property
    def storage(self) -> str:
        """"memory" (held by this process) or "shards" (read from the cache's shard files at each
        gather, through the page cache that every process on the machine shares)."""
        return "shards" if self._store.on_disk else "memory"

    @property
    def nbytes(self) -> int:
        """Bytes of its images and masks (N x 4 x H x W)."""
        return len(self) * self._store.sample_bytes

    def gather(self, indices: Sequence[int] | torch.Tensor,
               out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at ``indices`` as fresh tensors (or written into ``out``).

        Args:
            indices: B ints in [0, N) (a list, range, numpy array or int64 tensor; repeats allowed).
            out: optional CPU buffers (uint8 [B, 3, H, W], uint8 [B, H, W]) to fill, e.g. pinned ones.

        Returns:
            (images uint8 [B, 3, H, W], masks uint8 [B, H, W]) on the CPU, never views of the data.

        Raises:
            IndexError: an index outside [0, N).
            DataError: a shard of the cache is damaged and cannot be rebuilt (named in the message).
        """
        idx = _as_rows(indices, len(self), "gather")
        rows = idx if self._rows is None else self._rows[idx]
        h, w = self.hw
        b = len(rows)
        if out is None:
            out = (torch.empty((b, 3, h, w), dtype=torch.uint8), torch.empty((b, h, w), dtype=torch.uint8))
        images, masks = out
        want = ((b, 3, h, w), (b, h, w), torch.uint8, torch.uint8)
        if (images.shape, masks.shape, images.dtype, masks.dtype) != want:
            raise ValueError(f"gather: out must be uint8 {(b, 3, h, w)} and {(b, h, w)}, got "
                             f"{tuple(images.shape)} and {tuple(masks.shape)}")
        self._store.gather(rows, images.numpy(), masks.numpy())
        return images, masks

    def _part(self, which: str) -> torch.Tensor:
        store = self._store
        if self._rows is None and len(store.segments) == 1 and not store.on_disk:
            segment = store.segments[0]
            return torch.from_numpy(segment.images if which == "images" else segment.masks)
        h, w = self.hw
        rows = np.arange(len(store), dtype=np.int64) if self._rows is None else self._rows
        if which == "images":
            out = torch.empty((len(rows), 3, h, w), dtype=torch.uint8)
            store.gather(rows, out.numpy(), None)
        else:
            out = torch.empty((len(rows), h, w), dtype=torch.uint8)
            store.gather(rows, None, out.numpy())
        return out

    @property
    def images(self) -> torch.Tensor:
        """uint8 [N, 3, H, W]: the whole split (a copy unless it was built from tensors)."""
        return self._part("images")

    @property
    def masks(self) -> torch.Tensor:
        """uint8 [N, H, W]: the whole split's masks (a copy unless it was built from tensors)."""
        return self._part("masks")

    def _chunks(self, images: bool):
        """(images or None, masks) numpy chunks of up to ``_CHUNK`` rows, in order."""
        h, w = self.hw
        for start in range(0, len(self), _CHUNK):
            idx = np.arange(start, min(start + _CHUNK, len(self)), dtype=np.int64)
            rows = idx if self._rows is None else self._rows[idx]
            im = np.empty((len(rows), 3, h, w), dtype=np.uint8) if images else None
            mk = np.empty((len(rows), h, w), dtype=np.uint8)
            self._store.gather(rows, im, mk)
            yield im, mk

    def class_counts(self) -> torch.Tensor:
        """Pixels per class, int64 [C] (ignored and padded pixels not counted)."""
        if self._rows is None and self._store.label_counts is not None:  # recorded per shard by prepare
            counts = torch.as_tensor(self._store.label_counts, dtype=torch.int64)
        else:
            total = np.zeros(256, dtype=np.int64)
            for _, masks in self._chunks(images=False):
                total += np.bincount(masks.reshape(-1), minlength=256)
            counts = torch.from_numpy(total)
        return counts[: self.num_classes].clone()

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The dataset's own per-channel mean and std in [0, 1] units (padding excluded).

        For ``normalize(images, *data.mean_std())`` instead of ImageNet's statistics.
        """
        total = torch.zeros(3, dtype=torch.float64)
        total_sq = torch.zeros(3, dtype=torch.float64)
        count = 0
        for images, masks in self._chunks(images=True):
            x = torch.from_numpy(images).to(torch.float64) / 255.0
            valid = torch.from_numpy(masks != IGNORE_INDEX).unsqueeze(1).to(torch.float64)
            total += (x * valid).sum(dim=(0, 2, 3))
            total_sq += (x * x * valid).sum(dim=(0, 2, 3))
            count += int(valid.sum())
        mean = total / max(count, 1)
        std = (total_sq / max(count, 1) - mean * mean).clamp_min(0).sqrt()
        return tuple(mean.tolist()), tuple(std.tolist())

    def repeat(self, n_total: int) -> PreparedData:
        """Samples cycled (0, 1, ..., N-1, 0, 1, ...) to length ``n_total`` (a prefix if smaller).

        Used to emulate a bigger split (e.g. the full 3,680-image trainval) from a sample.
        """
        if n_total < 1 or len(self) == 0:
            raise ValueError(
                f"repeat: need n_total >= 1 and non-empty data, got {n_total} and {len(self)} samples"
            )
        return self.subset(np.arange(n_total, dtype=np.int64) % len(self))

    def subset(self, indices: Sequence[int] | torch.Tensor) -> PreparedData:
        """The samples at ``indices`` (in that order, repeats allowed), same class names: a view
        over the same storage, nothing copied.

        Args:
            indices: ints in [0, N) (a list, range, numpy array or int64 tensor).

        Returns:
            PreparedData of len(indices) samples, ``cache_path`` None (it is not the whole cache).
        """
        idx = _as_rows(indices, len(self), "subset")
        rows = idx if self._rows is None else self._rows[idx]
        return PreparedData(names=tuple(self.names[i] for i in idx.tolist()), skipped=self.skipped,
                            class_names=self.class_names, layout=self.layout, policy=self.policy, store=self._store,
                            rows=rows)

    def carve(self, fraction: float, seed: int) -> tuple[PreparedData, PreparedData]:
        """Split off a seeded fraction of the samples, e.g. a validation split out of trainval.

        The carve depends only on the set of sample names and ``seed`` (``source.seeded_order``),
        so the same names give the same carve whatever their order, on every machine.

        Args:
            fraction: share of the N samples to carve off, in (0, 1); the carved part has
                ``round(fraction * N)`` samples, clamped to [1, N - 1].
            seed: seed of the draw.

        Returns:
            (rest, carved): disjoint, together all samples, each in this data's order.

        Raises:
            ValueError: ``fraction`` outside (0, 1), fewer than 2 samples, or repeated names (a
                carve of ``repeat()``-ed data would put one image on both sides).
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ValueError(f"carve: fraction must lie strictly between 0 and 1, got {fraction!r}")
        n = len(self)
        if n < 2:
            raise ValueError(f"carve: need at least 2 samples to split, got {n}")
        if len(set(self.names)) != n:
            repeated = next(x for x in self.names if self.names.count(x) > 1)
            raise ValueError(f"carve: sample names must be unique (e.g. {repeated!r} repeats); carve before repeat()")
        k = min(max(round(fraction * n), 1), n - 1)
        carved = set(seeded_order(self.names, seed)[:k])
        rest_idx = [i for i, x in enumerate(self.names) if x not in carved]
        carved_idx = [i for i, x in enumerate(self.names) if x in carved]
        return self.subset(rest_idx), self.subset(carved_idx)



def overlap(a: PreparedData, b: PreparedData) -> list[str]:
    """Sample names present in both ``a`` and ``b``, once each, in ``a``'s order (empty when the
    two are disjoint), e.g. to warn when training and evaluation images overlap."""
    shared = set(b.names)
    return [x for x in dict.fromkeys(a.names) if x in shared]


