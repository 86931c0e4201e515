"""Decode a split once, resize it to a square, and cache it as one safetensors file.

``prepare(root, split, size)`` detects the layout at ``root`` (Oxford-IIIT Pet, generic
images/ + masks/, or Pascal VOC; see ``layouts``) and returns ``PreparedData``: uint8 images
``[N, 3, S, S]`` (RGB), uint8 masks ``[N, S, S]`` (labels 0..C-1, ``IGNORE_INDEX`` where the mask
said ignore or the "pad" policy padded), the sample names and the C class names. Every layout's
samples go through the one ``sample.load_sample`` in a process pool over all cores (PIL and
numpy only in the workers). The result is written atomically to
``<cache_dir>/<layout>-<split>-<S>-<policy>-<digest>.safetensors`` (``cache_dir`` defaults to
``$XDG_CACHE_HOME/functional_seg`` or ``~/.cache/functional_seg``: nothing is ever written inside
the dataset) where the digest covers the layout, resolved root, split, size, policy, seed,
strictness, class names and every file's name, size and mtime, so a changed source gives a new
file and the same arguments reuse the old one.

Resizing: "resize" stretches to S x S (antialiased bilinear for images, nearest for masks);
"pad" scales the long side to S keeping the aspect ratio, then centres the result on a black
canvas whose mask is ``IGNORE_INDEX``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from ..core.files import user_cache_dir as default_cache_dir  # the library's one cache directory
from ..core.files import write_atomic
from .errors import DataError, DataWarning
from .label_sets import infer_labels
from .labels import IGNORE_INDEX, POLICIES, LabelMap
from .layouts import open_source
from .pool import cpu_count, parallel_map
from .progress import Progress
from .sample import SampleTask, load_sample
from .source import Source, seeded_order

__all__ = ["PreparedData", "prepare", "overlap", "default_cache_dir", "cache_path"]

_FORMAT = "functional_seg.prepared/2"


@dataclass(frozen=True, eq=False)
class PreparedData:
    """A prepared split held in memory.

    Attributes:
        images: uint8 [N, 3, S, S], RGB.
        masks: uint8 [N, S, S], labels 0..C-1 or IGNORE_INDEX (ignored or padded pixels).
        names: N sample names, in data order.
        cache_path: the safetensors file it was read from or written to (None if uncached).
        skipped: messages for samples skipped with ``strict=False``.
        class_names: C names, label i is ``class_names[i]``, as the layout named them (required:
            no layout's names are assumed).
        layout: the dataset layout it came from ("oxford_pets", "generic", "voc"), if known.
        policy: how the images were fitted to the square ("resize" or "pad"); the training
            contract (``Preprocess.policy``) records it, so predict fits images the same way.
    """

    images: torch.Tensor
    masks: torch.Tensor
    names: tuple[str, ...]
    cache_path: Path | None = field(default=None, repr=False)
    skipped: tuple[str, ...] = field(default=(), repr=False)
    class_names: tuple[str, ...] = ()
    layout: str | None = None
    policy: str = "resize"

    def __post_init__(self):
        im, mk = self.images, self.masks
        if im.dtype != torch.uint8 or im.ndim != 4 or im.shape[1] != 3:
            raise ValueError(
                f"PreparedData.images: expected uint8 [N, 3, S, S], got {im.dtype} {tuple(im.shape)}"
            )
        if mk.dtype != torch.uint8 or mk.shape != (im.shape[0], *im.shape[2:]):
            raise ValueError(
                f"PreparedData.masks: expected uint8 {(im.shape[0], *im.shape[2:])}, "
                f"got {mk.dtype} {tuple(mk.shape)}"
            )
        if len(self.names) != im.shape[0]:
            raise ValueError(f"PreparedData.names: {len(self.names)} names for {im.shape[0]} images")
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if not 1 <= len(self.class_names) <= IGNORE_INDEX:
            raise ValueError(
                f"PreparedData.class_names: need 1 to {IGNORE_INDEX} names, got {len(self.class_names)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return len(self.class_names)

    @property
    def size(self) -> int:
        """Side S of the square images."""
        return self.images.shape[-1]

    def gather(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at ``indices``: (images uint8 [n, 3, S, S], masks uint8 [n, S, S]), copies."""
        idx = torch.as_tensor(list(indices) if isinstance(indices, range) else indices, dtype=torch.int64)
        return self.images.index_select(0, idx), self.masks.index_select(0, idx)

    def class_counts(self) -> torch.Tensor:
        """Pixels per class, int64 [C] (ignored and padded pixels not counted)."""
        counts = torch.bincount(self.masks.reshape(-1).to(torch.int64), minlength=256)
        return counts[: self.num_classes].clone()

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The dataset's own per-channel mean and std in [0, 1] units (padding excluded).

        For ``normalize(images, *data.mean_std())`` instead of ImageNet's statistics.
        """
        total = torch.zeros(3, dtype=torch.float64)
        total_sq = torch.zeros(3, dtype=torch.float64)
        count = 0
        for start in range(0, len(self), 256):  # chunks: a float64 copy of everything is too big
            x = self.images[start : start + 256].to(torch.float64) / 255.0
            valid = (self.masks[start : start + 256] != IGNORE_INDEX).unsqueeze(1).to(torch.float64)
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
        return self.subset(torch.arange(n_total) % len(self))

    def subset(self, indices: Sequence[int] | torch.Tensor) -> PreparedData:
        """The samples at ``indices`` (in that order, repeats allowed), same class names.

        Args:
            indices: ints in [0, N) (a list, range or int64 tensor).

        Returns:
            PreparedData of len(indices) samples, uncached (``cache_path`` None).
        """
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"subset: indices must lie in [0, {len(self)}), got {idx.min()}..{idx.max()}")
        return PreparedData(
            images=self.images.index_select(0, idx),
            masks=self.masks.index_select(0, idx),
            names=tuple(self.names[i] for i in idx.tolist()),
            skipped=self.skipped,
            class_names=self.class_names,
            layout=self.layout,
            policy=self.policy,
        )

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


def _stat(p: Path) -> list[int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def cache_path(cache_dir: Path, split: str, size: int, policy: str, key: dict) -> Path:
    """``<cache_dir>/<layout>-<split>-<size>-<policy>-<digest of key>.safetensors``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    layout = key.get("layout", "oxford_pets")
    return Path(cache_dir) / f"{layout}-{split}-{size}-{policy}-{digest}.safetensors"


def _load_cache(path: Path) -> PreparedData | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                return None
            images, masks = f.get_tensor("images"), f.get_tensor("masks")
        return PreparedData(
            images=images,
            masks=masks,
            names=tuple(json.loads(meta["names"])),
            cache_path=path,
            skipped=tuple(json.loads(meta.get("skipped", "[]"))),
            class_names=tuple(json.loads(meta["class_names"])),
            layout=json.loads(meta.get("params", "{}")).get("layout"),
            policy=json.loads(meta.get("params", "{}")).get("policy", "resize"),
        )
    except Exception as e:  # a damaged cache file is rebuilt, never fatal
        warnings.warn(
            f"prepare: ignoring unreadable cache {path} ({e}); rebuilding", RuntimeWarning, stacklevel=3
        )
        return None


def _save_cache(path: Path, data: PreparedData, key: dict) -> bool:
    """One atomic write (``core.files.write_atomic``): readers never see half a file."""
    meta = {
        "format": _FORMAT,
        "names": json.dumps(list(data.names)),
        "skipped": json.dumps(list(data.skipped)),
        "class_names": json.dumps(list(data.class_names)),
        "params": json.dumps({k: v for k, v in key.items() if k not in ("files", "classes")}),
    }
    try:
        write_atomic(path, save({"images": data.images.contiguous(), "masks": data.masks.contiguous()}, meta))
        return True
    except OSError as e:
        warnings.warn(
            f"prepare: could not write cache {path} ({e}); continuing uncached", RuntimeWarning, stacklevel=3
        )
        return False


_SHOWN = 5  # bad files named in a summary; the rest are counted


def _bad_summary(bad: list[str], total: int, split: str) -> str:
    """'3 of 120 samples of split 'train' are bad: <msg>; <msg>; <msg>' (the first few named)."""
    shown = "; ".join(bad[:_SHOWN]) + (f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else "")
    return f"{len(bad)} of {total} samples of split {split!r} {'is' if len(bad) == 1 else 'are'} bad: {shown}"


def _cache_key(src: Source, size: int, policy: str, seed: int, strict: bool) -> dict:
    if src.labels is not None:
        classes: object = src.labels.key()
    else:  # inferred from every mask: any of them changing changes the key
        classes = {"inferred_from": [[p.name, _stat(p)] for p in src.infer_from]}
    return {
        "format": _FORMAT,
        "layout": src.layout,
        "root": str(src.root.resolve()),
        "split": src.split,
        "size": size,
        "policy": policy,
        "seed": seed if src.seeded else None,
        "strict": strict,
        "classes": classes,
        "files": [[n, ip.name, _stat(ip), _stat(mp)] for n, ip, mp in zip(src.names, src.images, src.masks)],
    }


def _decode(
    src: Source, stats: list, labels: LabelMap, size: int, policy: str, workers: int, progress: bool | None
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Every sample of ``src`` through ``load_sample``: (images [K, 3, S, S], masks [K, S, S], the K
    loaded names, a message per bad sample). ``stats`` are the cache key's file rows."""
    bad: list[str] = []  # every bad sample's message, in order of discovery
    tasks = []
    for name, ip, mp, (_, _, ist, mst) in zip(src.names, src.images, src.masks, stats):
        if ist is None:
            bad.append(f"{src.listed_in} lists {name!r} but its image {ip} is missing; expected an image file there")
        elif mst is None:
            bad.append(f"{mp}: {src.mask_what} for image {name!r} is missing; expected {src.mask_expected}")
        else:
            tasks.append(SampleTask(len(tasks), name, str(ip), str(mp), size, policy, labels,
                                    src.mask_what, src.mask_expected))
    images = np.empty((len(tasks), 3, size, size), dtype=np.uint8)
    masks = np.empty((len(tasks), size, size), dtype=np.uint8)
    kept: list[str] = []
    results = parallel_map(load_sample, tasks, max(1, min(workers, len(tasks))))
    desc = f"prepare {src.split} ({src.layout}, {size}px)"
    with closing(results), Progress(len(tasks), desc, progress) as bar:
        for r in results:
            bar.update()
            if r.error is not None:
                bad.append(r.error)
                continue
            images[len(kept)] = r.image
            masks[len(kept)] = r.mask
            kept.append(r.name)
    return images[: len(kept)], masks[: len(kept)], kept, bad


def prepare(
    root: str | os.PathLike,
    split: str = "trainval",
    size: int = 128,
    *,
    policy: str = "resize",
    cache_dir: str | os.PathLike | None = None,
    strict: bool = True,
    workers: int | None = None,
    seed: int = 0,
    download: bool = False,
    progress: bool | None = None,
    binary_255: bool = False,
) -> PreparedData:
    """Decode, check and resize one split, or load it from the cache.

    Args:
        root: dataset root in any known layout (``layouts.LAYOUT_HELP``): Oxford-IIIT Pet (or its
            parent holding ``oxford-iiit-pet/``), generic ``images/`` + ``masks/``, or Pascal VOC.
        split: Oxford: "trainval" / "test" (official) or "train" / "val" / "holdout" (seeded
            80/10/10). Generic: "train", "val", "test", "trainval" (split files, or seeded
            80/10/10 without any). VOC: "train", "val", "trainval" (and "test" where listed).
        size: side S of the square output.
        policy: "resize" (stretch to S x S) or "pad" (keep aspect, pad with IGNORE_INDEX).
        cache_dir: where the safetensors cache goes (default: ``default_cache_dir()``, i.e.
            ``$XDG_CACHE_HOME/functional_seg`` or ``~/.cache/functional_seg``; never inside ``root``).
        strict: if any sample is bad, raise one ``DataError`` that counts them and names the
            first few; if False, skip every bad sample and summarise them in one ``DataWarning``
            (their messages are kept in ``PreparedData.skipped``).
        workers: decoding processes (default: all usable cores; 1 decodes in this process).
        seed: seed of the seeded splits (unused for split files).
        download: let torchvision fetch Oxford-IIIT Pet if ``root`` holds no layout.
        binary_255: a generic layout's masks are binary, saved 0/255: 255 is class 1, not ignore.
        progress: while decoding (never on a cache hit), report on stderr: a tqdm bar on a
            terminal, else a plain line every ~10%. None: only when stderr is a terminal.

    Returns:
        PreparedData with uint8 images [N, 3, S, S], masks [N, S, S] and C class names.

    Raises:
        DataError: missing/empty root, missing split file, or (with ``strict``) any bad sample;
            the message names the file and what was expected.
    """
    if policy not in POLICIES:
        raise ValueError(f"prepare: unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"prepare: size must be a positive int, got {size!r}")
    src = open_source(root, split, seed=seed, download=download, binary_255=binary_255)
    key = _cache_key(src, size, policy, seed, strict)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache_path(cache_dir, split, size, policy, key)
    if path.is_file():
        cached = _load_cache(path)
        if cached is not None and len(cached) > 0 and cached.size == size:
            if cached.skipped:
                total = len(cached) + len(cached.skipped)
                summary = _bad_summary(list(cached.skipped), total, split)
                warnings.warn(f"prepare: {summary}; skipped them (from cache {path.name})", DataWarning, stacklevel=2)
            return cached

    n_workers = max(1, workers if workers is not None else cpu_count())
    labels = src.labels if src.labels is not None else infer_labels(src, n_workers)
    images, masks, kept_names, bad = _decode(src, key["files"], labels, size, policy, n_workers, progress)
    if bad and strict:
        raise DataError(f"{_bad_summary(bad, len(src.names), split)}; strict=False (fseg --skip-bad) skips them")
    if bad:
        warnings.warn(f"prepare: {_bad_summary(bad, len(src.names), split)}; skipped them", DataWarning, stacklevel=2)
    if not kept_names:
        raise DataError(f"{src.root}: none of the {len(src.names)} samples of split {split!r} could be loaded")
    data = PreparedData(
        images=torch.from_numpy(images),
        masks=torch.from_numpy(masks),
        names=tuple(kept_names),
        skipped=tuple(bad),
        class_names=labels.class_names,
        layout=src.layout,
        policy=policy,
    )
    if _save_cache(path, data, key):
        data = dataclasses.replace(data, cache_path=path)
    return data
