"""``prepare``: decode a split once, resize it, and cache it as shards written while it decodes.

``prepare(root, split, size)`` detects the layout at ``root`` (Oxford-IIIT Pet, generic images/ +
masks/, or Pascal VOC; see ``layouts``), sends every sample through the one
``sample.load_sample`` in a process pool over all cores (PIL and numpy only in the workers), and
returns ``PreparedData``: uint8 images ``[N, 3, H, W]`` (RGB), uint8 masks ``[N, H, W]`` (labels
0..C-1, ``IGNORE_INDEX`` where the mask said ignore or the "pad" policy padded), the sample names
and the C class names. ``size`` is S (square) or (H, W): "resize" stretches to it (antialiased
bilinear for images, nearest for masks); "pad" scales to fit inside keeping the aspect ratio and
centres the result on a black canvas whose mask is ``IGNORE_INDEX``.

The cache is a folder ``<cache_dir>/<layout>-<split>-<size>-<policy>-<digest>/`` (``cache_dir``
defaults to ``$XDG_CACHE_HOME/functional_seg`` or ``~/.cache/functional_seg``: nothing is ever
written inside the dataset) where the digest covers the layout, resolved root, split, size,
policy, seed, shard length, class names and every file's name, size and mtime, so a changed
source gives a new folder and the same arguments reuse the old one. It holds:

- ``shard-00000.safetensors``, ...: source samples ``[k L, (k + 1) L)`` for L = ``shard_samples``
  (default: as many as fit in 64 MiB), the bad ones left out and named in the shard's metadata
  (``shards``). Boundaries depend only on the source order, so they are the same on every run.
- ``index.json``, written last: names, class names, size, policy, the skipped messages, each
  shard's rows, source range, sha256 over its tensor bytes and label counts, and the source digest.

Memory: samples go into a one-shard buffer as the pool returns them (at most a few chunks per
worker in flight) and each full shard is written atomically, so the peak is a shard plus the
pool, whatever the split's size. A prepare killed at any point (SIGKILL included) leaves only
whole shards; the next one keeps every shard whose sha256 still matches and decodes the rest,
and its cache equals an uninterrupted prepare's byte for byte. Bad samples are recorded whatever
``strict`` says (strictness only decides whether they raise), so after a strict failure
``strict=False`` (``fseg --skip-bad``) decodes nothing again.

Why our own shards, not LitData or MosaicML Streaming (MDS): both store a dataset as shards with
random access, but their readers own the sample order (their shuffle algorithms, seeded by their
own state and resharded by node and worker counts) and the resume point (a sample counter in
their state dict). Here the order is ``core.random.permutation`` of the epoch key, gathered as a
global batch and sliced by rank, which is what makes world-size invariance and bit-exact resume
follow from the key alone. Used only as a file format either would add a dependency (LitData's
``optimize`` runs its own worker pool) to hold what two uint8 tensors in a safetensors file hold:
every safetensors reader opens them, and a row is one ``pread`` at a computed offset (``store``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.files import user_cache_dir as default_cache_dir  # the library's one cache directory
from ..core.files import write_atomic
from .errors import DataError, DataWarning
from .label_sets import infer_labels
from .labels import POLICIES, LabelMap
from .layouts import open_source
from .pool import cpu_count, parallel_map
from .prepared import PreparedData
from .progress import Progress
from .sample import SampleTask, load_sample
from .shards import ShardError, ShardFile, encode_meta, read_header, read_shard, tensor_digest, write_shard
from .sizes import size_hw, size_text
from .source import Source
from .store import MemorySegment, ShardSegment, Store, keep_in_memory

__all__ = ["prepare", "default_cache_dir", "cache_path", "SHARD_BYTES", "INDEX"]

_FORMAT = "functional_seg.prepared/4"
SHARD_BYTES = 64 << 20  # default shard: as many samples as fit in this
INDEX = "index.json"
_IN_FLIGHT_BYTES = 64 << 20  # decoded samples travelling back from the pool at once, at most


def _stat(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a file; (-1, -1) when it is missing or unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _file_stats(images: Sequence[str], masks: Sequence[str] = ()) -> np.ndarray:
    """int64 [N, 4] (image size, image mtime_ns, mask size, mask mtime_ns; -1 where missing), or
    [N, 2] without masks: 32 bytes a sample where a list of lists held ~500 (ADE20K has 20k)."""
    out = np.full((len(images), 4 if masks else 2), -1, dtype=np.int64)
    for i, path in enumerate(images):
        out[i, :2] = _stat(path)
    for i, path in enumerate(masks):
        out[i, 2:] = _stat(path)
    return out


def _files_digest(names: Sequence[str], paths: Sequence[str], stats: np.ndarray) -> str:
    """sha256 over the sample names (may be empty), each path's file name and the stats: any file
    renamed, resized or touched changes it."""
    h = hashlib.sha256()
    for column in (names, (os.path.basename(p) for p in paths)):
        for text in column:
            h.update(text.encode("utf-8", "surrogateescape") + b"\0")
    h.update(np.ascontiguousarray(stats, dtype="<i8").tobytes())
    return h.hexdigest()


def _hw(size) -> tuple[int, int]:
    try:
        return size_hw(size)
    except ValueError as e:
        raise ValueError(f"prepare: {e}") from None


def cache_path(cache_dir: Path, split: str, size: int | tuple[int, int], policy: str, key: dict) -> Path:
    """``<cache_dir>/<layout>-<split>-<S or HxW>-<policy>-<digest of key>``: the split's cache folder."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    layout = key.get("layout", "oxford_pets")
    return Path(cache_dir) / f"{layout}-{split}-{size_text(size)}-{policy}-{digest}"


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


@contextlib.contextmanager
def _building(directory: Path):
    """Hold the cache folder's ``.lock`` (``flock``) while building or repairing it, so the ranks of
    a data-parallel job that all call ``prepare`` build it once: the others wait, then read it. The
    kernel drops the lock of a killed process. Without ``fcntl`` or a writable folder: no lock."""
    try:
        import fcntl

        directory.mkdir(parents=True, exist_ok=True)
        f = open(directory / ".lock", "a+b")  # noqa: SIM115 (closed below)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        f.close()  # releases the lock


_SHOWN = 5  # bad files named in a summary; the rest are counted


def _bad_summary(bad: list[str], total: int, split: str) -> str:
    """'3 of 120 samples of split 'train' are bad: <msg>; <msg>; <msg>' (the first few named)."""
    shown = "; ".join(bad[:_SHOWN]) + (f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else "")
    return f"{len(bad)} of {total} samples of split {split!r} {'is' if len(bad) == 1 else 'are'} bad: {shown}"


def _cache_key(src: Source, hw: tuple[int, int], policy: str, seed: int, shard_samples: int,
               stats: np.ndarray) -> dict:
    """What the cache depends on (``stats``: ``_file_stats`` of the split's images and masks)."""
    if src.labels is not None:
        classes: object = src.labels.key()
    else:  # inferred from every mask: any of them changing changes the key
        classes = {"inferred_from": _files_digest((), src.infer_from, _file_stats(src.infer_from))}
    return {
        "format": _FORMAT,
        "layout": src.layout,
        "root": str(src.root.resolve()),
        "split": src.split,
        "size": list(hw),
        "policy": policy,
        "seed": seed if src.seeded else None,
        "shard_samples": shard_samples,
        "classes": classes,
        "files": _files_digest(src.names, src.images, stats),
    }


@dataclass(frozen=True)
class _Job:
    """What decoding any part of one split needs."""

    src: Source
    key: dict
    stats: np.ndarray  # _file_stats of src's images and masks, int64 [N, 4]
    labels: LabelMap
    hw: tuple[int, int]
    policy: str

    @property
    def shard_samples(self) -> int:
        return self.key["shard_samples"]

    def ranges(self) -> list[tuple[int, int]]:
        n, step = len(self.src.names), self.shard_samples
        return [(a, min(a + step, n)) for a in range(0, n, step)]

    def missing(self, i: int) -> str | None:
        """The message of sample i when its files are missing (known without decoding), else None."""
        name, stats = self.src.names[i], self.stats[i]
        if stats[0] < 0:
            return f"{self.src.listed_in} lists {name!r} but its image {self.src.images[i]} is missing; " \
                   "expected an image file there"
        if stats[2] < 0:
            return f"{self.src.masks[i]}: {self.src.mask_what} for image {name!r} is missing; " \
                   f"expected {self.src.mask_expected}"
        return None

    def task(self, i: int) -> SampleTask:
        s = self.src
        return SampleTask(i, s.names[i], str(s.images[i]), str(s.masks[i]), self.hw, self.policy, self.labels,
                          s.mask_what, s.mask_expected)

    def decode(self, a: int, b: int, results: Iterator, bar: Progress | None, buffers) -> dict:
        """Source samples [a, b) into the shard ``buffers`` (images [L, 3, H, W], masks [L, H, W]);
        ``results`` yields their ``load_sample`` results in order (none for missing files).

        Returns: {"images", "masks" (views of the buffers), "names", "skipped", "sources"}.
        """
        images, masks = buffers
        kept: list[str] = []
        bad: list[str] = []
        for i in range(a, b):
            message = self.missing(i)
            if message is None:
                r = next(results)
                if bar is not None:
                    bar.update()
                message = r.error
                if message is None:
                    images[len(kept)] = r.image
                    masks[len(kept)] = r.mask
                    kept.append(r.name)
            if message is not None:
                bad.append(message)
        k = len(kept)
        return {"images": images[:k], "masks": masks[:k], "names": kept, "skipped": bad, "sources": (a, b)}

    def buffers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.hw
        return np.empty((n, 3, h, w), dtype=np.uint8), np.empty((n, h, w), dtype=np.uint8)

    def rebuild(self, path: Path, a: int, b: int, sha256: str) -> bool:
        """Decode source samples [a, b) again and rewrite ``path`` if the source is unchanged and the
        result hashes to ``sha256`` (decoding is deterministic); whether that worked."""
        with _building(path.parent):
            try:
                read_shard(path, expect=sha256)
                return True  # another process repaired it while this one waited
            except ShardError:
                return self._rebuild(path, a, b, sha256)

    def _rebuild(self, path: Path, a: int, b: int, sha256: str) -> bool:
        if not np.array_equal(_file_stats(self.src.images[a:b], self.src.masks[a:b]), self.stats[a:b]):
            return False
        tasks = [self.task(i) for i in range(a, b) if self.missing(i) is None]
        part = self.decode(a, b, map(load_sample, tasks), None, self.buffers(b - a))
        if tensor_digest(part["images"], part["masks"]) != sha256:
            return False
        try:
            write_shard(path, part["images"], part["masks"], _meta(part))
        except OSError:
            return False
        return True


def _meta(part: dict) -> dict:
    return encode_meta(part["names"], part["skipped"], part["sources"], part["masks"])


def _shard_record(k: int, rows_start: int, meta: dict, count: int) -> dict:
    return {"file": _shard_name(k), "rows": [rows_start, rows_start + count], "sources": json.loads(meta["sources"]),
            "sha256": meta["sha256"], "label_counts": json.loads(meta["label_counts"])}


def _kept_shard(path: Path, job: _Job, a: int, b: int) -> dict | None:
    """A shard a previous (maybe killed) prepare left, if it is whole, for [a, b) and unchanged."""
    if not path.is_file():
        return None
    try:
        header = read_header(path)
        meta = header.meta
        if header.hw != job.hw or json.loads(meta["sources"]) != [a, b]:
            return None
        ShardFile(path, expect=meta["sha256"]).close()  # its tensors are the ones it recorded
    except (ShardError, KeyError, ValueError):
        return None
    return meta


class _Sink:
    """Where finished shards go: the cache folder, or memory once the folder cannot be written."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.failed: OSError | None = None
        self.memory: dict[int, MemorySegment] = {}
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._fail(e)

    def _fail(self, e: OSError) -> None:
        self.failed = e
        warnings.warn(f"prepare: could not write cache {self.directory} ({e}); continuing uncached",
                      RuntimeWarning, stacklevel=4)

    def put(self, k: int, part: dict) -> dict:
        meta = _meta(part)
        if self.failed is None:
            try:
                meta["sha256"] = write_shard(self.directory / _shard_name(k), part["images"], part["masks"], meta)
                return meta
            except OSError as e:
                self._fail(e)
        meta["sha256"] = tensor_digest(part["images"], part["masks"])
        self.memory[k] = MemorySegment(part["images"].copy(), part["masks"].copy())
        return meta


def _build(job: _Job, directory: Path, workers: int, progress: bool | None) -> tuple[dict, _Sink]:
    """Decode every shard that is not already in ``directory``, write each one, then the index."""
    ranges = job.ranges()
    kept = [_kept_shard(directory / _shard_name(k), job, a, b) for k, (a, b) in enumerate(ranges)]
    todo = [k for k, meta in enumerate(kept) if meta is None]
    tasks = [job.task(i) for k in todo for i in range(*ranges[k]) if job.missing(i) is None]
    sample_bytes = 4 * job.hw[0] * job.hw[1]
    n_workers = max(1, min(workers, len(tasks)))
    chunk = max(1, min(32, len(tasks) // (4 * n_workers), _IN_FLIGHT_BYTES // (2 * n_workers * sample_bytes)))
    results = parallel_map(load_sample, tasks, n_workers, chunksize=chunk, in_flight=2 * n_workers)
    sink = _Sink(directory)
    buffers = job.buffers(job.shard_samples)
    desc = f"prepare {job.src.split} ({job.src.layout}, {size_text(job.hw)}px)"
    with closing(results), Progress(len(tasks), desc, progress) as bar:
        for k in todo:
            kept[k] = sink.put(k, job.decode(*ranges[k], results, bar, buffers))
    index = _index(job, kept)
    if sink.failed is None:
        try:
            write_atomic(directory / INDEX, json.dumps(index, sort_keys=True, indent=1) + "\n")
        except OSError as e:
            sink._fail(e)
    return index, sink


def _index(job: _Job, metas: list[dict]) -> dict:
    names: list[str] = []
    skipped: list[str] = []
    shards = []
    for k, meta in enumerate(metas):
        shard_names = json.loads(meta["names"])
        shards.append(_shard_record(k, len(names), meta, len(shard_names)))
        names += shard_names
        skipped += json.loads(meta["skipped"])
    digest = hashlib.sha256(json.dumps(job.key, sort_keys=True).encode()).hexdigest()
    return {"format": _FORMAT, "source_digest": digest, "size": list(job.hw), "policy": job.policy,
            "class_names": list(job.labels.class_names), "shard_samples": job.shard_samples, "names": names,
            "skipped": skipped, "shards": shards,
            "params": {k: v for k, v in job.key.items() if k not in ("files", "classes")}}


def _read_index(directory: Path, job_key: dict, hw: tuple[int, int], quiet: bool = False) -> dict | None:
    """The cache's index if it is whole, for these arguments, and every shard it names is there
    (a damaged one warns, unless ``quiet``: the caller already said so)."""
    path = directory / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        digest = hashlib.sha256(json.dumps(job_key, sort_keys=True).encode()).hexdigest()
        if index["format"] != _FORMAT or index["source_digest"] != digest or index["size"] != list(hw):
            raise ValueError("it belongs to other arguments")
        rows = 0
        for s in index["shards"]:
            if s["rows"][0] != rows:
                raise ValueError(f"{s['file']} starts at row {s['rows'][0]}, expected {rows}")
            if not (directory / s["file"]).is_file():
                raise ValueError(f"{s['file']} is missing")
            rows = s["rows"][1]
        if rows != len(index["names"]):
            raise ValueError(f"{len(index['names'])} names for {rows} rows")
        return index
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        if not quiet:
            warnings.warn(f"prepare: ignoring unreadable cache {path} ({e}); rebuilding", RuntimeWarning,
                          stacklevel=3)
        return None


def _open(job: _Job, directory: Path, index: dict, sink: _Sink | None, in_memory: bool | None) -> Store:
    """The store of the split the index describes: its shards read per gather, or into memory."""
    n = len(index["names"])
    memory = keep_in_memory(n * 4 * job.hw[0] * job.hw[1]) if in_memory is None else bool(in_memory)
    segments = []
    for k, s in enumerate(index["shards"]):
        if sink is not None and k in sink.memory:
            segments.append(sink.memory[k])
            continue
        (a, b), path = s["sources"], directory / s["file"]
        segments.append(ShardSegment(path, s["rows"][1] - s["rows"][0], s["sha256"],
                                     rebuild=lambda path=path, a=a, b=b, sha=s["sha256"]: job.rebuild(path, a, b, sha)))
    counts = np.sum([np.asarray(s["label_counts"], dtype=np.int64) for s in index["shards"]], axis=0,
                    dtype=np.int64) if index["shards"] else np.zeros(256, dtype=np.int64)
    store = Store(segments, job.hw, label_counts=counts)
    return store.in_memory() if memory else store  # in memory: every shard read and checked now


def _report(index: dict, total: int, split: str, strict: bool, where: str) -> None:
    bad = list(index["skipped"])
    if bad and strict:
        raise DataError(f"{_bad_summary(bad, total, split)}; strict=False (fseg --skip-bad) skips them")
    if bad:
        warnings.warn(f"prepare: {_bad_summary(bad, total, split)}; skipped them{where}", DataWarning, stacklevel=3)


def prepare(
    root: str | os.PathLike,
    split: str = "trainval",
    size: int | tuple[int, int] = 128,
    *,
    policy: str = "resize",
    cache_dir: str | os.PathLike | None = None,
    strict: bool = True,
    workers: int | None = None,
    seed: int = 0,
    download: bool = False,
    progress: bool | None = None,
    in_memory: bool | None = None,
    shard_samples: int | None = None,
    binary_255: bool = False,
) -> PreparedData:
    """Decode, check and resize one split into the cache, or open it from there.

    Args:
        root: dataset root in any known layout (``layouts.LAYOUT_HELP``): Oxford-IIIT Pet (or its
            parent holding ``oxford-iiit-pet/``), generic ``images/`` + ``masks/``, or Pascal VOC.
        split: Oxford: "trainval" / "test" (official) or "train" / "val" / "holdout" (seeded
            80/10/10). Generic: "train", "val", "test", "trainval" (split files, or seeded
            80/10/10 without any). VOC: "train", "val", "trainval" (and "test" where listed).
        size: S for S x S, or (H, W) (e.g. (512, 1024) for Cityscapes-like data).
        policy: "resize" (stretch to the size) or "pad" (keep aspect, pad with IGNORE_INDEX).
        cache_dir: where the cache folder goes (default: ``default_cache_dir()``, i.e.
            ``$XDG_CACHE_HOME/functional_seg`` or ``~/.cache/functional_seg``; never inside ``root``).
        strict: if any sample is bad, raise one ``DataError`` that counts them and names the
            first few; if False, skip every bad sample and summarise them in one ``DataWarning``
            (their messages are kept in ``PreparedData.skipped``).
        workers: decoding processes (default: all usable cores; 1 decodes in this process).
        seed: seed of the seeded splits (unused for split files).
        download: let torchvision fetch Oxford-IIIT Pet if ``root`` holds no layout.
        progress: while decoding (never on a cache hit), report on stderr: a tqdm bar on a
            terminal, else a plain line every ~10%. None: only when stderr is a terminal.
        in_memory: read the split into this process's memory (True) or read each batch from its
            shards (False); None decides from its size and the memory available
            (``store.keep_in_memory``).
        shard_samples: source samples per shard (default: as many as fit in 64 MiB).
        binary_255: a generic layout's masks are binary, saved 0/255: 255 is class 1, not ignore.

    Returns:
        PreparedData with uint8 images [N, 3, H, W], masks [N, H, W] and C class names.

    Raises:
        DataError: missing/empty root, missing split file, or (with ``strict``) any bad sample;
            the message names the file and what was expected.
    """
    if policy not in POLICIES:
        raise ValueError(f"prepare: unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    hw = _hw(size)
    if shard_samples is not None and (not isinstance(shard_samples, int) or shard_samples < 1):
        raise ValueError(f"prepare: shard_samples must be a positive int, got {shard_samples!r}")
    src = open_source(root, split, seed=seed, download=download, binary_255=binary_255)
    stats = _file_stats(src.images, src.masks)
    key = _cache_key(src, hw, policy, seed, shard_samples or max(1, SHARD_BYTES // (4 * hw[0] * hw[1])), stats)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    directory = cache_path(cache_dir, split, hw, policy, key)
    n_workers = max(1, workers if workers is not None else cpu_count())
    index = _read_index(directory, key, hw)
    sink = None
    if index is None:
        with _building(directory):
            index = _read_index(directory, key, hw, quiet=True)  # another process may have built it meanwhile
            if index is None:
                job = _Job(src, key, stats, src.labels or infer_labels(src, n_workers), hw, policy)
                index, sink = _build(job, directory, n_workers, progress)
    if sink is None:
        job = _Job(src, key, stats, src.labels or LabelMap.indices(tuple(index["class_names"])), hw, policy)
    where = "" if sink is not None else f" (from cache {directory.name})"
    _report(index, len(src.names), split, strict, where)
    if not index["names"]:
        raise DataError(f"{src.root}: none of the {len(src.names)} samples of split {split!r} could be loaded")
    store = _open(job, directory, index, sink, in_memory)
    cached = sink is None or sink.failed is None
    return PreparedData(names=index["names"], cache_path=directory if cached else None, skipped=index["skipped"],
                        class_names=index["class_names"], layout=src.layout, policy=policy, store=store)
