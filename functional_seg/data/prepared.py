"""Decode a split once, resize it to a square, and cache it as one safetensors file.

``prepare(root, split, size)`` returns ``PreparedData``: uint8 images ``[N, 3, S, S]`` (RGB),
uint8 masks ``[N, S, S]`` (labels 0..2, ``IGNORE_INDEX`` where the "pad" policy padded) and the
sample names. Decoding and resizing run in a process pool over all cores (PIL and numpy only in
the workers); the result is written atomically to ``<cache_dir>/oxford_pets-<split>-<S>-<policy>-
<digest>.safetensors`` (``cache_dir`` defaults to ``$XDG_CACHE_HOME/functional_seg`` or
``~/.cache/functional_seg``: nothing is ever written inside the dataset) where the digest covers the resolved root, split, size, policy, seed,
strictness and every file's name, size and mtime, so a changed source gives a new file and the
same arguments reuse the old one.

Resizing: "resize" stretches to S x S (antialiased bilinear for images, nearest for masks);
"pad" scales the long side to S keeping the aspect ratio, then centres the result on a black
canvas whose mask is ``IGNORE_INDEX``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .oxford_pets import (
    IGNORE_INDEX,
    NUM_CLASSES,
    POLICIES,
    SEEDED_SPLITS,
    SPLITS,
    DataError,
    DataWarning,
    SampleResult,
    find_root,
    image_path,
    load_sample,
    read_split,
    split_file,
    trimap_path,
)

__all__ = ["PreparedData", "prepare", "default_cache_dir", "cache_path"]

_FORMAT = "functional_seg.oxford_pets/1"
_SERIAL_BELOW = 16  # fewer samples than this: a pool costs more than it saves


@dataclass(frozen=True, eq=False)
class PreparedData:
    """A prepared split held in memory.

    Attributes:
        images: uint8 [N, 3, S, S], RGB.
        masks: uint8 [N, S, S], labels 0..NUM_CLASSES-1 or IGNORE_INDEX (padding).
        names: N sample names, in data order.
        cache_path: the safetensors file it was read from or written to (None if uncached).
        skipped: messages for samples skipped with ``strict=False``.
    """

    images: torch.Tensor
    masks: torch.Tensor
    names: tuple[str, ...]
    cache_path: Path | None = field(default=None, repr=False)
    skipped: tuple[str, ...] = field(default=(), repr=False)

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

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def size(self) -> int:
        """Side S of the square images."""
        return self.images.shape[-1]

    def class_counts(self) -> torch.Tensor:
        """Pixels per class, int64 [NUM_CLASSES] (padding not counted)."""
        counts = torch.bincount(self.masks.reshape(-1).to(torch.int64), minlength=256)
        return counts[:NUM_CLASSES].clone()

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
        idx = torch.arange(n_total) % len(self)
        return PreparedData(
            images=self.images.index_select(0, idx),
            masks=self.masks.index_select(0, idx),
            names=tuple(self.names[i] for i in idx.tolist()),
            skipped=self.skipped,
        )


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/functional_seg``, else ``~/.cache/functional_seg``.

    Never a folder inside the dataset: data folders are often read-only, shared, or synced, and
    preparing a split must leave them exactly as they were. A relative ``XDG_CACHE_HOME`` is
    ignored, as the XDG base-directory spec asks.
    """
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "functional_seg"


def _stat(p: Path) -> list[int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def cache_path(cache_dir: Path, split: str, size: int, policy: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"oxford_pets-{split}-{size}-{policy}-{digest}.safetensors"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _pool_context():
    # fork is cheap (no torch re-import) and safe here: workers only run PIL and numpy.
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None


def _decode_all(tasks: Sequence[tuple], workers: int) -> Iterator[SampleResult]:
    """``load_sample`` over ``tasks`` in order: a process pool, or serially if that is not possible."""
    if workers <= 1 or len(tasks) < _SERIAL_BELOW:
        yield from map(load_sample, tasks)
        return
    done = 0
    try:
        ex = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context())
    except (OSError, NotImplementedError, ValueError) as e:
        warnings.warn(f"prepare: no process pool ({e}); decoding serially", RuntimeWarning, stacklevel=3)
        yield from map(load_sample, tasks)
        return
    try:
        with warnings.catch_warnings():
            # Python >= 3.12 warns about fork in a threaded process; the workers never use torch.
            warnings.filterwarnings("ignore", message=r".*fork\(\).*", category=DeprecationWarning)
            results = ex.map(load_sample, tasks, chunksize=max(1, min(32, len(tasks) // (workers * 4))))
        for r in results:
            yield r
            done += 1
    except (BrokenProcessPool, OSError) as e:
        warnings.warn(
            f"prepare: process pool failed ({e}); decoding the rest serially", RuntimeWarning, stacklevel=3
        )
        yield from map(load_sample, tasks[done:])
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _load_cache(path: Path) -> PreparedData | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                return None
            images, masks = f.get_tensor("images"), f.get_tensor("masks")
        names = tuple(json.loads(meta["names"]))
        skipped = tuple(json.loads(meta.get("skipped", "[]")))
        return PreparedData(images=images, masks=masks, names=names, cache_path=path, skipped=skipped)
    except Exception as e:  # a damaged cache file is rebuilt, never fatal
        warnings.warn(
            f"prepare: ignoring unreadable cache {path} ({e}); rebuilding", RuntimeWarning, stacklevel=3
        )
        return None


def _save_cache(path: Path, data: PreparedData, key: dict) -> bool:
    """Write to a temporary file in the same folder, then ``os.replace``: readers never see half a file."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        meta = {
            "format": _FORMAT,
            "names": json.dumps(list(data.names)),
            "skipped": json.dumps(list(data.skipped)),
            "params": json.dumps({k: v for k, v in key.items() if k != "files"}),
        }
        save_file({"images": data.images.contiguous(), "masks": data.masks.contiguous()}, tmp, metadata=meta)
        os.replace(tmp, path)
        return True
    except OSError as e:
        warnings.warn(
            f"prepare: could not write cache {path} ({e}); continuing uncached", RuntimeWarning, stacklevel=3
        )
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        return False


def _skip_or_raise(msg: str, strict: bool) -> None:
    if strict:
        raise DataError(msg)
    warnings.warn(f"{msg} (skipped)", DataWarning, stacklevel=4)


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
) -> PreparedData:
    """Decode, check and resize one split, or load it from the cache.

    Args:
        root: dataset root: the official layout or its parent holding ``oxford-iiit-pet/``.
        split: "trainval" / "test" (official) or "train" / "val" / "holdout" (seeded 80/10/10).
        size: side S of the square output.
        policy: "resize" (stretch to S x S) or "pad" (keep aspect, pad with IGNORE_INDEX).
        cache_dir: where the safetensors cache goes (default: ``default_cache_dir()``, i.e.
            ``$XDG_CACHE_HOME/functional_seg`` or ``~/.cache/functional_seg``; never inside ``root``).
        strict: raise ``DataError`` on the first bad sample; if False, warn (``DataWarning``) and
            skip it.
        workers: decoding processes (default: all usable cores; 1 decodes in this process).
        seed: seed of the 80/10/10 split (unused for the official splits).
        download: let torchvision fetch the dataset if ``root`` holds none.

    Returns:
        PreparedData with uint8 images [N, 3, S, S] and masks [N, S, S].

    Raises:
        DataError: missing/empty root, missing split file, or (with ``strict``) any bad sample;
            the message names the file and what was expected.
    """
    if split not in SPLITS:
        raise ValueError(f"prepare: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if policy not in POLICIES:
        raise ValueError(f"prepare: unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"prepare: size must be a positive int, got {size!r}")
    layout = find_root(root, download=download)
    names = read_split(layout, split, seed=seed)
    if not names:
        listed = split_file(layout, split) if split not in SEEDED_SPLITS else layout / "annotations"
        raise DataError(
            f"{listed}: split {split!r} lists no images; expected lines like 'Abyssinian_100 1 1 1'"
        )

    entries = []  # (name, image path, trimap path, [size, mtime] or None, same for the trimap)
    for name in names:
        ip, tp = image_path(layout, name), trimap_path(layout, name)
        entries.append((name, ip, tp, _stat(ip), _stat(tp)))
    key = {
        "format": _FORMAT,
        "root": str(layout.resolve()),
        "split": split,
        "size": size,
        "policy": policy,
        "seed": seed if split in SEEDED_SPLITS else None,
        "strict": strict,
        "files": [[n, ip.name, ist, tst] for n, ip, _, ist, tst in entries],
    }
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache_path(cache_dir, split, size, policy, key)
    if path.is_file():
        cached = _load_cache(path)
        if cached is not None and len(cached) > 0 and cached.size == size:
            for msg in cached.skipped:
                warnings.warn(f"{msg} (skipped; from cache {path.name})", DataWarning, stacklevel=2)
            return cached

    skipped: list[str] = []
    tasks = []
    where = (
        split_file(layout, split)
        if split not in SEEDED_SPLITS
        else layout / "annotations/{trainval,test}.txt"
    )
    for name, ip, tp, ist, tst in entries:
        if ist is None:
            msg = f"{where} lists {name!r} but its image {ip} is missing; expected an image file there"
        elif tst is None:
            msg = f"{tp}: trimap for image {name!r} is missing; expected a PNG trimap with values 1, 2, 3"
        else:
            tasks.append((len(tasks), name, str(ip), str(tp), size, policy))
            continue
        _skip_or_raise(msg, strict)
        skipped.append(msg)

    n_workers = max(1, min(workers if workers is not None else _cpu_count(), len(tasks)))
    images = np.empty((len(tasks), 3, size, size), dtype=np.uint8)
    masks = np.empty((len(tasks), size, size), dtype=np.uint8)
    kept: list[int] = []
    kept_names: list[str] = []
    with closing(_decode_all(tasks, n_workers)) as results:
        for r in results:
            if r.error is not None:
                _skip_or_raise(r.error, strict)
                skipped.append(r.error)
                continue
            images[len(kept)] = r.image
            masks[len(kept)] = r.mask
            kept.append(r.index)
            kept_names.append(r.name)
    if not kept:
        raise DataError(f"{layout}: none of the {len(names)} samples of split {split!r} could be loaded")
    data = PreparedData(
        images=torch.from_numpy(images[: len(kept)]),
        masks=torch.from_numpy(masks[: len(kept)]),
        names=tuple(kept_names),
        skipped=tuple(skipped),
    )
    if _save_cache(path, data, key):
        data = PreparedData(data.images, data.masks, data.names, cache_path=path, skipped=data.skipped)
    return data
