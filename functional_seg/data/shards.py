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
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.files import write_atomic
from .errors import DataError

__all__ = ["SHARD_FORMAT", "ShardHeader", "encode_meta", "write_shard", "read_header", "open_shard",
           "tensor_digest"]

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


def _file_digest(f, start: int, length: int, path: Path) -> str:
    """sha256 of ``length`` bytes of the open file ``f`` from ``start``, read in 4 MiB pieces."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(min(length, 4 << 20)))
    f.seek(start)
    while length:
        n = f.readinto(buf[: min(len(buf), length)])
        if not n:
            raise ShardError(f"{path}: prepared shard is truncated")
        h.update(buf[:n])
        length -= n
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


@dataclass
class OpenShard:
    """A shard's arrays, mapped (read-only, backed by the page cache) or read into private memory."""

    header: ShardHeader
    images: np.ndarray  # uint8 [k, 3, H, W]
    masks: np.ndarray  # uint8 [k, H, W]
    mapping: mmap.mmap | None = None

    def release(self) -> None:
        """Drop this process's resident pages of a mapped shard (the page cache keeps them; the next
        read maps them again without touching the disk), so RSS stays bounded over an epoch."""
        self._advise("MADV_DONTNEED")

    def willneed(self, rows) -> None:
        """Ask the kernel to read these rows' bytes now, one request per row and tensor, before they
        are copied (a mapped shard is read at random, with the kernel's read-around off)."""
        if self.mapping is None:
            return
        h, w = self.header.hw
        start, n_img = self.header.data_start, self.header.image_bytes
        for i in rows:
            self._advise("MADV_WILLNEED", start + i * 3 * h * w, 3 * h * w)
            self._advise("MADV_WILLNEED", start + n_img + i * h * w, h * w)

    def _advise(self, name: str, start: int = 0, length: int = 0) -> None:
        if self.mapping is None or not hasattr(mmap, name):
            return
        try:
            if length:
                aligned = start - start % mmap.PAGESIZE  # madvise takes page-aligned starts
                self.mapping.madvise(getattr(mmap, name), aligned, length + start - aligned)
            else:
                self.mapping.madvise(getattr(mmap, name))
        except (OSError, ValueError):
            pass  # advice only


def open_shard(path: str | os.PathLike, *, mapped: bool, expect: str | None = None) -> OpenShard:
    """Open a shard for reading, optionally checking its tensors against a digest.

    Args:
        mapped: memory-map the file (no copy; pages shared with every process reading it) or read
            it into this process's memory.
        expect: the sha256 its tensors must have (the index's); None checks only the header.

    Raises:
        ShardError: damaged header, wrong size, or (with ``expect``) a digest that differs.
    """
    path = Path(path)
    header = read_header(path)
    n_img, n_mask = header.image_bytes, header.mask_bytes
    shape_i, shape_m = (header.count, 3, *header.hw), (header.count, *header.hw)
    mapping, got = None, None
    try:
        with open(path, "rb") as f:
            if mapped and header.count:
                if expect is not None:  # hashed through read(): a mapping would pull the whole shard into RSS
                    got = _file_digest(f, header.data_start, n_img + n_mask, path)
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                data = np.frombuffer(mapping, dtype=np.uint8, count=n_img + n_mask, offset=header.data_start)
            else:
                data = np.empty(n_img + n_mask, dtype=np.uint8)
                f.seek(header.data_start)
                if f.readinto(memoryview(data)) != data.size:
                    raise ShardError(f"{path}: prepared shard is truncated")
    except OSError as e:
        raise ShardError(f"{path}: cannot read prepared shard ({e.strerror or e})") from None
    shard = OpenShard(header, data[:n_img].reshape(shape_i), data[n_img:].reshape(shape_m), mapping)
    # Samples are then read at random: without this every page fault reads the device's whole
    # read-ahead window around it (8 MiB on some virtual disks: 128 times a 64 KiB sample).
    shard._advise("MADV_RANDOM")
    if expect is not None:
        got = got if got is not None else tensor_digest(shard.images, shard.masks)
        if got != expect:
            raise ShardError(f"{path}: prepared shard is damaged (the sha256 of its tensors is {got[:16]}..., "
                             f"the index says {expect[:16]}...)")
    return shard
