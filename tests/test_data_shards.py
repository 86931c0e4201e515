"""Shard files: any safetensors reader opens them, the digest is sha256 of the tensor bytes, and a
damaged header, size or byte is refused in one line naming the file."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

from functional_seg.data import DataError
from functional_seg.data.shards import ShardFile, encode_meta, read_header, read_shard, write_shard


def _arrays(k: int, h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (k, 3, h, w), dtype=np.uint8),
            rng.choice(np.array([0, 1, 2, 255], dtype=np.uint8), (k, h, w)))


@given(k=st.integers(0, 4), h=st.integers(1, 7), w=st.integers(1, 7), seed=st.integers(0, 2**32 - 1))
def test_shards_round_trip_through_safetensors(tmp_path_factory, k, h, w, seed):
    path = tmp_path_factory.mktemp("shard") / "s.safetensors"
    images, masks = _arrays(k, h, w, seed)
    names = [f"n{i}" for i in range(k)]
    digest = write_shard(path, images, masks, encode_meta(names, ["bad one"], (3, 3 + k + 1), masks))
    assert digest == hashlib.sha256(images.tobytes() + masks.tobytes()).hexdigest()
    with safe_open(str(path), framework="pt") as f:  # the reference reader
        assert torch.equal(f.get_tensor("images"), torch.from_numpy(images))
        assert torch.equal(f.get_tensor("masks"), torch.from_numpy(masks))
        meta = f.metadata()
    assert json.loads(meta["names"]) == names and json.loads(meta["skipped"]) == ["bad one"]
    assert json.loads(meta["sources"]) == [3, 4 + k] and meta["sha256"] == digest
    assert json.loads(meta["label_counts"]) == np.bincount(masks.reshape(-1), minlength=256).tolist()
    _, got_images, got_masks = read_shard(path, expect=digest)
    assert np.array_equal(got_images, images) and np.array_equal(got_masks, masks)
    rows = list(range(k))[::-1]  # rows read at random into a batch, in any order
    out_images, out_masks = np.zeros((k, 3, h, w), np.uint8), np.zeros((k, h, w), np.uint8)
    ShardFile(path, expect=digest).read_rows(rows, range(k), out_images, out_masks)
    assert np.array_equal(out_images, images[rows]) and np.array_equal(out_masks, masks[rows])
    again = path.with_name("again.safetensors")
    write_shard(again, images.copy(), masks.copy(), encode_meta(names, ["bad one"], (3, 3 + k + 1), masks))
    assert again.read_bytes() == path.read_bytes()  # same samples, same bytes


@pytest.fixture
def shard(tmp_path):
    images, masks = _arrays(3, 4, 5, 0)
    path = tmp_path / "shard-00000.safetensors"
    return path, write_shard(path, images, masks, encode_meta(["a", "b", "c"], [], (0, 3), masks))


def test_a_changed_byte_is_refused_naming_the_shard(shard):
    path, digest = shard
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1  # the last mask pixel
    path.write_bytes(bytes(raw))
    read_header(path)  # the header is intact
    for read in (lambda: ShardFile(path, expect=digest), lambda: read_shard(path, expect=digest)):
        with pytest.raises(DataError, match=rf"^{path}: prepared shard is damaged \(the sha256"):
            read()


@pytest.mark.parametrize("damage, says", [
    (lambda raw: raw[: len(raw) - 7], "is {short} bytes; its header says {full}"),
    (lambda raw: raw[:20], "truncated or not a safetensors file"),
    (lambda raw: raw[:8] + b"[" + raw[9:], "damaged header"),
    (lambda raw: b"\xff" * 8 + raw[8:], "truncated or not a safetensors file"),
])
def test_damaged_headers_and_sizes_are_refused(shard, damage, says):
    path, digest = shard
    full = path.stat().st_size
    path.write_bytes(damage(path.read_bytes()))
    says = says.format(short=full - 7, full=full)
    with pytest.raises(DataError, match=rf"^{path}: .*{says}") as info:
        ShardFile(path, expect=digest)
    assert "\n" not in str(info.value)
