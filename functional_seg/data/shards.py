"""One shard of a prepared split: a bounded number of samples in one safetensors file, written the
same bytes every time and checked by a sha256 over its tensor bytes.

A shard holds uint8 ``images [k, 3, H, W]`` (RGB) and ``masks [k, H, W]`` (labels, 255 = ignore)
and string metadata: ``format``, ``sha256`` (hex digest of the images' bytes then the masks'),
``names`` and ``skipped`` (JSON lists: the k samples, and the messages of the bad samples of its
source range), ``sources`` (JSON ``[a, b)``: the source samples it covers) and ``label_counts``
(JSON: pixels per stored value 0..255). Any safetensors reader opens it.

Why our own writer: ``safetensors.torch.save`` writes its metadata map in a different order in
every process (a Rust ``HashMap``), so the same shard written twice differs in its header. Here
the header is JSON with sorted keys, padded with spaces to a multiple of 8 bytes as safetensors
pads it, and the tensors are written from the arrays without joining them into one copy first.
Same samples, same bytes: an interrupted prepare resumes to the file an uninterrupted one writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.files import write_atomic
from .errors import DataError

__all__ = ["SHARD_FORMAT", "ShardHeader", "ShardError", "ShardFile", "encode_meta", "write_shard", "read_header",
           "read_shard", "tensor_digest"]

SHARD_FORMAT = "functional_seg.shard/1"
_MAX_HEADER = 64 * 2**20  # a header names at most a few thousand samples; more is a damaged length field


class ShardError(DataError):
    """A shard file that is not what its header or the index says (damaged, truncated, replaced)."""


@dataclass(frozen=True)
class ShardHeader:
    """What a shard's header says.

    Attributes:
        count: k, the samples it holds.
        hw: (H, W) of its images and masks.
        data_start: byte offset of the images' first byte (8 + header length).
        meta: the string metadata (see the module docstring).
    """

    count: int
    hw: tuple[int, int]
    data_start: int
    meta: dict

    @property
    def image_bytes(self) -> int:
        return self.count * 3 * self.hw[0] * self.hw[1]

    @property
    def mask_bytes(self) -> int:
        return self.count * self.hw[0] * self.hw[1]

    @property
    def file_bytes(self) -> int:
        return self.data_start + self.image_bytes + self.mask_bytes


def tensor_digest(images: np.ndarray, masks: np.ndarray) -> str:
    """sha256 (hex) of the images' bytes then the masks' bytes (C order), as a shard records it."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).data)  # hashlib releases the GIL for large buffers
    h.update(np.ascontiguousarray(masks).data)
    return h.hexdigest()


def encode_meta(names, skipped, sources: tuple[int, int], masks: np.ndarray) -> dict:
    """The metadata of a shard of ``masks`` (uint8 [k, H, W]) holding ``names`` (all but ``sha256``)."""
    counts = np.bincount(masks.reshape(-1), minlength=256) if masks.size else np.zeros(256, dtype=np.int64)
    return {"format": SHARD_FORMAT, "names": json.dumps(list(names)), "skipped": json.dumps(list(skipped)),
            "sources": json.dumps([int(sources[0]), int(sources[1])]), "label_counts": json.dumps(counts.tolist())}


def _header_bytes(count: int, hw: tuple[int, int], meta: dict) -> bytes:
    h, w = hw
    n_img, n_mask = count * 3 * h * w, count * h * w
    header = {
        "__metadata__": {str(k): str(v) for k, v in meta.items()},
        "images": {"dtype": "U8", "shape": [count, 3, h, w], "data_offsets": [0, n_img]},
        "masks": {"dtype": "U8", "shape": [count, h, w], "data_offsets": [n_img, n_img + n_mask]},
    }
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text


def write_shard(path: str | os.PathLike, images: np.ndarray, masks: np.ndarray, meta: dict) -> str:
    """Write one shard atomically (``core.files.write_atomic``); returns its tensor digest.

    Args:
        images: uint8 [k, 3, H, W]; masks: uint8 [k, H, W] (k may be 0: a range of bad samples).
        meta: from ``encode_meta``; ``sha256`` is added here.

    Raises:
        OSError: the file cannot be written (the target is then untouched).
    """
    images, masks = np.ascontiguousarray(images), np.ascontiguousarray(masks)
    if images.dtype != np.uint8 or masks.dtype != np.uint8 or images.ndim != 4 or masks.shape != (
            images.shape[0], *images.shape[2:]):
        raise ValueError(f"write_shard: expected uint8 [k, 3, H, W] and [k, H, W], got {images.shape} {masks.shape}")
    digest = tensor_digest(images, masks)
    header = _header_bytes(images.shape[0], (images.shape[2], images.shape[3]), {**meta, "sha256": digest})
    write_atomic(path, [header, images.reshape(-1).data, masks.reshape(-1).data])
    return digest


def _parse_header(path: Path, raw: bytes, file_size: int) -> ShardHeader:
    try:
        header = json.loads(raw)
        meta, im, mk = header["__metadata__"], header["images"], header["masks"]
        count, _, h, w = (int(v) for v in im["shape"])
        ok = (im["dtype"] == mk["dtype"] == "U8" and im["shape"][1] == 3
              and [int(v) for v in mk["shape"]] == [count, h, w] and meta.get("format") == SHARD_FORMAT
              and im["data_offsets"] == [0, count * 3 * h * w]
              and mk["data_offsets"] == [count * 3 * h * w, count * 4 * h * w])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"{path}: prepared shard has a damaged header ({type(e).__name__}: {e})") from None
    if not ok:
        raise ShardError(f"{path}: prepared shard's header is not a {SHARD_FORMAT} header")
    out = ShardHeader(count, (h, w), 8 + len(raw), meta)
    if out.file_bytes != file_size:
        raise ShardError(f"{path}: prepared shard is {file_size} bytes; its header says {out.file_bytes}")
    return out


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Parse and check a shard's header (not its data: see ``open_shard(verify=...)``).

    Raises:
        ShardError: unreadable, truncated, or not a shard header (one line naming the file).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise ShardError(f"{path}: prepared shard is truncated or not a safetensors file")
            return _parse_header(path, f.read(n), size)
    except OSError as e:
        raise ShardError(f"{path}: cannot read prepared shard ({e.strerror or e})") from None


_NOWAIT = hasattr(os, "RWF_NOWAIT") and hasattr(os, "preadv")  # Linux >= 4.14: read only what is cached


class ShardFile:
    """A shard opened for random reads of its rows (``os.preadv`` into the caller's buffers).

    Rows are read through the page cache (one copy for every process on the machine) straight
    into the batch buffers: nothing is mapped, so this process's RSS never holds the split. The
    file is advised ``POSIX_FADV_RANDOM`` (no read-ahead around each read: on a disk whose
    read-ahead is 8 MiB that would read 128 times a 64 KiB sample). ``read_cached`` copies the
    rows already in the page cache without waiting (``RWF_NOWAIT``), ``willneed`` asks for the
    rest at once and ``read_rows`` then reads them, so a cold batch is one burst of reads the disk
    serves together and a warm one costs one system call per row and tensor.

    Args:
        path: the shard file.
        expect: the sha256 its tensors must have (the index's), checked now by reading the file in
            4 MiB pieces; None checks only the header.

    Raises:
        ShardError: damaged header, wrong size, or a digest that differs.
    """

    def __init__(self, path: str | os.PathLike, expect: str | None = None):
        self.path = Path(path)
        self.header = read_header(self.path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise ShardError(f"{self.path}: cannot read prepared shard ({e.strerror or e})") from None
        h = self.header
        self._image, self._mask = 3 * h.hw[0] * h.hw[1], h.hw[0] * h.hw[1]
        if expect is not None:
            got = self._digest()
            if got != expect:
                self.close()
                raise ShardError(f"{self.path}: prepared shard is damaged (the sha256 of its tensors is "
                                 f"{got[:16]}..., the index says {expect[:16]}...)")
        self._advise(0, 0, "POSIX_FADV_RANDOM")

    def _digest(self) -> str:
        h = hashlib.sha256()
        start, length = self.header.data_start, self.header.image_bytes + self.header.mask_bytes
        buf = memoryview(bytearray(max(1, min(length, 4 << 20))))
        self._advise(start, length, "POSIX_FADV_SEQUENTIAL")
        while length:
            n = os.preadv(self.fd, [buf[: min(len(buf), length)]], start)
            if not n:
                raise ShardError(f"{self.path}: prepared shard is truncated")
            h.update(buf[:n])
            start, length = start + n, length - n
        return h.hexdigest()

    def _advise(self, offset: int, length: int, name: str) -> None:
        if hasattr(os, "posix_fadvise") and hasattr(os, name):
            try:
                os.posix_fadvise(self.fd, offset, length, getattr(os, name))
            except OSError:
                pass  # advice only

    def read_cached(self, rows, positions, images: np.ndarray | None, masks: np.ndarray | None) -> list[int]:
        """``read_rows`` for the rows whose bytes are in the page cache, without waiting for the disk
        (``RWF_NOWAIT``); returns the indices (into ``rows``) of the others, still to read. Where the
        kernel cannot say, nothing is read and every index comes back."""
        if not _NOWAIT:
            return list(range(len(rows)))
        start, misses = self.header.data_start, []
        for k, (i, j) in enumerate(zip(rows, positions)):
            hit = images is None or self._read_nowait(images[j], start + i * self._image)
            mask_at = start + self.header.image_bytes + i * self._mask
            hit = hit and (masks is None or self._read_nowait(masks[j], mask_at))
            if not hit:
                misses.append(k)
        return misses

    def _read_nowait(self, out: np.ndarray, offset: int) -> bool:
        global _NOWAIT
        try:
            return os.preadv(self.fd, [out], offset, os.RWF_NOWAIT) == out.nbytes
        except BlockingIOError:
            return False
        except OSError:  # EOPNOTSUPP and the like: this file system cannot say; stop asking
            _NOWAIT = False
            return False

    def willneed(self, rows) -> None:
        """Start reading these rows' bytes (both tensors) in the background."""
        start = self.header.data_start
        for i in rows:
            self._advise(start + i * self._image, self._image, "POSIX_FADV_WILLNEED")
            self._advise(start + self.header.image_bytes + i * self._mask, self._mask, "POSIX_FADV_WILLNEED")

    def read_rows(self, rows, positions, images: np.ndarray | None, masks: np.ndarray | None) -> None:
        """Row ``rows[k]`` into ``images[positions[k]]`` and ``masks[positions[k]]`` (C-contiguous
        uint8 [B, 3, H, W] and [B, H, W]; either may be None)."""
        start = self.header.data_start
        for i, j in zip(rows, positions):
            if images is not None:
                self._read(images[j], start + i * self._image)
            if masks is not None:
                self._read(masks[j], start + self.header.image_bytes + i * self._mask)

    def _read(self, out: np.ndarray, offset: int) -> None:
        if os.preadv(self.fd, [out], offset) != out.nbytes:
            raise ShardError(f"{self.path}: prepared shard is truncated (it changed after it was opened)")

    def close(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.close()


def read_shard(path: str | os.PathLike, expect: str | None = None) -> tuple[ShardHeader, np.ndarray, np.ndarray]:
    """A whole shard read into memory: (header, images uint8 [k, 3, H, W], masks uint8 [k, H, W]).

    Raises:
        ShardError: damaged header, wrong size, or (with ``expect``) a digest that differs.
    """
    path = Path(path)
    header = read_header(path)
    data = np.empty(header.image_bytes + header.mask_bytes, dtype=np.uint8)
    try:
        with open(path, "rb") as f:
            f.seek(header.data_start)
            if f.readinto(memoryview(data)) != data.size:
                raise ShardError(f"{path}: prepared shard is truncated")
    except OSError as e:
        raise ShardError(f"{path}: cannot read prepared shard ({e.strerror or e})") from None
    images = data[: header.image_bytes].reshape(header.count, 3, *header.hw)
    masks = data[header.image_bytes:].reshape(header.count, *header.hw)
    if expect is not None:
        got = tensor_digest(images, masks)
        if got != expect:
            raise ShardError(f"{path}: prepared shard is damaged (the sha256 of its tensors is {got[:16]}..., "
                             f"the index says {expect[:16]}...)")
    return header, images, masks
