"""The sharded cache: resume after a kill (byte for byte), integrity, storage in memory or in shards,
non-square sizes, and the loader reading shards through its prefetch thread.

Data: 30 synthetic Oxford-layout samples at 16 px in shards of 4 (8 shards, the last of 2), so
every batch crosses shards; a whole prepare takes well under a second.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from processes import survivors, wait_children
from safetensors import safe_open

import functional_seg.data.cache as cache_module
import functional_seg.data.store as store_module
from functional_seg.core import random as jr
from functional_seg.data import IGNORE_INDEX, DataError, DataWarning, Loader, make_synthetic_dataset, prepare
from functional_seg.data.preprocess import Preprocess

ROOT = Path(__file__).resolve().parents[1]
N, L = 30, 4  # samples, samples per shard

KILLED = """
import sys, time
import functional_seg.data.cache as cache
real = cache.load_sample
def slow(task):
    time.sleep(0.1)
    return real(task)
cache.load_sample = slow
cache.prepare(sys.argv[1], "trainval", 16, cache_dir=sys.argv[2], workers=2, shard_samples=4)
"""


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("pets") / "pets", n_trainval=N, n_test=4, size=(20, 36))


def _prepare(root, cache, **kw):
    kw.setdefault("workers", 1)
    return prepare(root, "trainval", 16, cache_dir=cache, shard_samples=L, **kw)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class _Count:
    """``load_sample`` counting its calls (the real one does the work)."""

    def __init__(self):
        self.calls, self.real = 0, cache_module.load_sample

    def __call__(self, task):
        self.calls += 1
        return self.real(task)


@pytest.fixture(scope="module")
def reference(pets, tmp_path_factory):
    """An uninterrupted prepare: its cache folder."""
    return _prepare(pets, tmp_path_factory.mktemp("ref")).cache_path


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_prepare_killed_midway_resumes_to_the_same_bytes(pets, reference, tmp_path, monkeypatch):
    """SIGKILL after two shards: no decoding worker survives, the next prepare decodes only the
    missing shards, and its cache equals an uninterrupted prepare's byte for byte."""
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(pets), str(cache)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers = wait_children(proc, 2)
        assert len(workers) == 2, proc.communicate()[1][-2000:] if proc.poll() is not None else "no workers"
        deadline = time.monotonic() + 60
        while len(list(cache.rglob("shard-*.safetensors"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert survivors(workers) == []
    folder = cache / reference.name
    kept = sorted(p.name for p in folder.glob("shard-*.safetensors"))
    assert 2 <= len(kept) < 8 and not (folder / "index.json").exists()  # killed midway
    count = _Count()
    monkeypatch.setattr(cache_module, "load_sample", count)
    data = _prepare(pets, cache)
    assert count.calls == N - L * len(kept)  # the kept shards were not decoded again
    assert _files(data.cache_path) == _files(reference)


def test_leftovers_of_a_killed_write_are_redone(pets, reference, tmp_path, monkeypatch):
    """A truncated shard, one with a damaged header, a stale temporary file and no index."""
    folder = tmp_path / reference.name
    shutil.copytree(reference, folder)
    (folder / "index.json").unlink()
    one = folder / "shard-00001.safetensors"
    one.write_bytes(one.read_bytes()[:100])
    three = folder / "shard-00003.safetensors"
    three.write_bytes(b"\x00" * 8 + three.read_bytes()[8:])
    (folder / ".shard-00001.safetensors.x1y2.tmp").write_bytes(b"half a file")
    count = _Count()
    monkeypatch.setattr(cache_module, "load_sample", count)
    data = _prepare(pets, tmp_path)
    assert count.calls == 2 * L
    assert _files(data.cache_path) == _files(reference)


def test_concurrent_prepares_build_the_cache_once(pets, reference, tmp_path, monkeypatch):
    """The ranks of a job all call prepare: one builds (holding the folder's lock), the others
    wait and read what it wrote; nobody falls back to an uncached copy."""
    import threading
    import warnings

    count = _Count()
    monkeypatch.setattr(cache_module, "load_sample", count)
    results, errors = [], []

    def one():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                results.append(_prepare(pets, tmp_path))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and count.calls == N
    assert all(r.cache_path == results[0].cache_path for r in results)
    assert _files(results[0].cache_path) == _files(reference)


# ------------------------------------------------------------------------------------------ integrity


def _damage(path: Path, value: int = 77) -> bytes:
    """Set the last byte (a mask pixel) of a shard to ``value``; returns the good bytes."""
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([value]))
    return good


def test_a_damaged_shard_is_rebuilt_from_the_source(pets, reference, tmp_path):
    """Label 77 with 3 classes: before, the loss met it as an index error; now the shard's sha256
    catches it before use and the shard is decoded again from the unchanged source."""
    folder = tmp_path / reference.name
    shutil.copytree(reference, folder)
    want = _prepare(pets, tmp_path, in_memory=True)
    want_images, want_masks = want.images, want.masks
    shard = folder / "shard-00002.safetensors"
    good = _damage(shard)
    data = _prepare(pets, tmp_path, in_memory=False)
    assert data.storage == "shards"
    batches = list(Loader(data, 6, shuffle=False).epoch())
    assert torch.equal(torch.cat([b[1] for b in batches]), want_masks.long())
    assert torch.equal(torch.cat([b[0] for b in batches]), want_images)
    assert shard.read_bytes() == good
    _damage(shard)
    data = _prepare(pets, tmp_path, in_memory=True)  # held in memory: checked when loaded
    assert data.storage == "memory" and shard.read_bytes() == good and torch.equal(data.masks, want_masks)


def test_a_damaged_shard_whose_source_changed_is_refused_in_one_line(pets, tmp_path):
    root = tmp_path / "pets"
    shutil.copytree(pets, root)
    data = _prepare(root, tmp_path / "cache", in_memory=False)
    shard = data.cache_path / "shard-00001.safetensors"
    _damage(shard)
    data = _prepare(root, tmp_path / "cache", in_memory=False)  # the cache still matches the source
    os.utime(root / "images" / f"{data.names[L]}.jpg", ns=(1, 1))  # ... until a file of shard 1 changes
    data.gather([0, 1])  # shard 0 is fine
    with pytest.raises(DataError) as info:
        list(Loader(data, 5, shuffle=False).epoch())
    message = str(info.value)
    assert message.startswith(f"{shard}: prepared shard is damaged") and "\n" not in message
    assert "cannot be rebuilt from the source" in message and str(data.cache_path) in message


# ------------------------------------------------------------------------------------------ loader


@pytest.fixture(scope="module")
def both(pets, tmp_path_factory):
    """The same split held in memory and read from shards (their own caches: their stores share nothing)."""
    return (_prepare(pets, tmp_path_factory.mktemp("memory"), in_memory=True),
            _prepare(pets, tmp_path_factory.mktemp("shards"), in_memory=False))


@given(local=st.integers(1, 4), world=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31 - 1),
       drop_last=st.booleans(), prefetch=st.integers(0, 3), cycled=st.booleans())
def test_prefetched_batches_from_shards_equal_in_memory_batches(both, local, world, seed, drop_last, prefetch,
                                                                cycled):
    """Every rank's batches read from shards through the prefetch thread equal, byte for byte, the
    in-memory loader's, and the ranks' slices put together are the global batch of the permutation."""
    memory, sharded = both
    if cycled:  # views that repeat samples across shard boundaries
        memory, sharded = memory.repeat(47), sharded.repeat(47)
    b, key = local * world, jr.key(seed)
    order = jr.permutation(key, len(memory))
    everything = memory.images, memory.masks
    per_rank = []
    for rank in range(world):
        ref = Loader(memory, b, shard=(rank, world), drop_last=drop_last, prefetch=0)
        got = Loader(sharded, b, shard=(rank, world), drop_last=drop_last, prefetch=prefetch)
        ref_batches, got_batches = list(ref.epoch(key)), list(got.epoch(key))
        assert len(ref_batches) == len(got_batches) == len(ref)
        for (ri, rm), (gi, gm) in zip(ref_batches, got_batches):
            assert torch.equal(ri, gi) and torch.equal(rm, gm) and gm.dtype == torch.int64
        per_rank.append(got_batches)
    for i, parts in enumerate(zip(*per_rank)):
        idx = order[i * b : (i + 1) * b]
        assert torch.equal(torch.cat([p[0] for p in parts]), everything[0][idx])
        assert torch.equal(torch.cat([p[1] for p in parts]), everything[1][idx].long())


def test_an_epoch_can_start_at_a_later_batch(both, key):
    _, sharded = both
    loader = Loader(sharded, 4)
    full = list(loader.epoch(key))
    late = list(loader.epoch(key, start=3))
    assert len(late) == len(full) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(late, full[3:]))


def test_an_abandoned_epoch_stops_its_thread(both, key):
    import threading

    _, sharded = both
    before = threading.active_count()
    batches = Loader(sharded, 2, prefetch=2).epoch(key)
    next(batches)
    batches.close()
    assert threading.active_count() == before


# ------------------------------------------------------------------------------------------ storage


def test_storage_follows_the_size_and_the_memory(pets, tmp_path, monkeypatch):
    assert store_module.keep_in_memory(100, available=800)
    assert not store_module.keep_in_memory(101, available=800)  # more than 1/8 of what is free
    assert not store_module.keep_in_memory(store_module.RESIDENT_MAX_BYTES + 1, available=1 << 50)
    assert _prepare(pets, tmp_path).storage == "memory"  # 30 KB
    monkeypatch.setattr(store_module, "RESIDENT_MAX_BYTES", 1000)
    data = _prepare(pets, tmp_path)
    assert data.storage == "shards" and data.nbytes == N * 4 * 16 * 16


def _rss_kb_of_files_in(folder: Path) -> int:
    """Resident kB of this process's mappings of files in ``folder`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
                inside = len(head) >= 6 and head[5].startswith(str(folder))
            elif inside and head and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_reading_from_shards_holds_none_of_them_in_this_process(pets, tmp_path):
    data = _prepare(pets, tmp_path, in_memory=False)
    images, _ = data.gather(range(N))
    assert _rss_kb_of_files_in(data.cache_path) == 0  # read through the page cache, never mapped
    opened = {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if os.path.exists(
        f"/proc/self/fd/{fd}")}
    assert sum(p.startswith(str(data.cache_path)) for p in opened) == 8  # one descriptor per shard
    for shard in data.cache_path.glob("shard-*.safetensors"):  # out of the page cache: read from the disk
        fd = os.open(shard, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    assert torch.equal(data.gather(range(N))[0], images)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    assert torch.equal(data.gather(order)[1], data.masks[order])


def test_strict_failure_then_skip_bad_decodes_nothing_again(pets, tmp_path, monkeypatch):
    root = tmp_path / "pets"
    shutil.copytree(pets, root)
    names = (root / "annotations/trainval.txt").read_text().split("\n")
    bad = names[5].split()[0]
    (root / "images" / f"{bad}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=rf"1 of {N} samples .*{bad}\.jpg: cannot decode"):
        _prepare(root, tmp_path / "cache")
    monkeypatch.setattr(cache_module, "load_sample", lambda task: pytest.fail("decoded again"))
    with pytest.raises(DataError, match=rf"{bad}\.jpg"):
        _prepare(root, tmp_path / "cache")  # strict again: the same report, from the cache
    with pytest.warns(DataWarning, match=rf"{bad}\.jpg.*from cache"):
        data = _prepare(root, tmp_path / "cache", strict=False)
    assert len(data) == N - 1 and bad not in data.names
    index = json.loads((data.cache_path / "index.json").read_text())
    assert [s["sources"] for s in index["shards"]] == [[a, min(a + L, N)] for a in range(0, N, L)]
    assert [s["rows"][1] - s["rows"][0] for s in index["shards"]][:2] == [4, 3]  # sample 5 is in shard 1
    with safe_open(str(data.cache_path / "shard-00001.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert bad not in json.loads(meta["names"]) and bad in json.loads(meta["skipped"])[0]


def test_an_unwritable_cache_folder_keeps_the_split_in_memory(pets, tmp_path, both):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(RuntimeWarning, match="could not write cache"):
        data = _prepare(pets, blocker)
    assert data.cache_path is None and data.storage == "memory"
    assert torch.equal(data.images, both[0].images) and data.names == both[0].names


# ------------------------------------------------------------------------------------------ (H, W)


def test_non_square_sizes_resize_pad_and_load(pets, tmp_path):
    data = prepare(pets, "test", (12, 20), cache_dir=tmp_path, workers=1)
    assert data.size == data.hw == (12, 20) and data.images.shape == (4, 3, 12, 20)
    assert "-12x20-resize-" in data.cache_path.name and Preprocess(size=data.size).hw == (12, 20)
    name = data.names[0]
    img = Image.open(pets / "images" / f"{name}.jpg").convert("RGB").resize((20, 12), Image.Resampling.BILINEAR)
    tri = Image.open(pets / "annotations/trimaps" / f"{name}.png").resize((20, 12), Image.Resampling.NEAREST)
    assert np.array_equal(data.images[0].permute(1, 2, 0).numpy(), np.asarray(img))
    assert np.array_equal(data.masks[0].numpy(), np.asarray(tri) - 1)
    images, masks = next(Loader(data, 2, shuffle=False).epoch())
    assert images.shape == (2, 3, 12, 20) and masks.shape == (2, 12, 20)
    padded = prepare(pets, "test", (12, 20), policy="pad", cache_dir=tmp_path, workers=1)
    for i, name in enumerate(padded.names):
        w, h = Image.open(pets / "annotations/trimaps" / f"{name}.png").size
        valid = padded.masks[i] != IGNORE_INDEX
        rows, cols = int(valid.any(1).sum()), int(valid.any(0).sum())
        assert rows == 12 or cols == 20  # fits inside, touching two sides
        assert rows <= 12 and cols <= 20 and abs(cols / rows - w / h) < 0.15 * max(w / h, 1)
        assert (padded.images[i][:, ~valid] == 0).all()


def test_preprocess_size_takes_h_w_and_records_squares_as_before():
    wide = Preprocess(size=(512, 1024), policy="pad")
    assert wide.hw == (512, 1024) and wide.to_dict()["size"] == [512, 1024]
    assert Preprocess.from_dict(wide.to_dict()) == wide  # through JSON metadata and back
    square = Preprocess(size=(64, 64))
    assert square.size == 64 and square.to_dict()["size"] == 64 and square == Preprocess(size=64)
    assert Preprocess.from_dict({"size": 48}).hw == (48, 48)  # a checkpoint written before (H, W)
    assert Preprocess().hw is None
    for bad in (0, (0, 4), (4,), (4, 4, 4), True, (2.5, 4), "64"):
        with pytest.raises(ValueError, match="preprocess size must be a positive integer S or a pair"):
            Preprocess(size=bad)
