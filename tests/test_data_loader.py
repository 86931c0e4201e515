"""``Loader``: batches of prepared tensors, shuffled by a key, without a per-sample Python loop."""

from __future__ import annotations

import pytest
import torch

from functional_seg.core import random as jr
from functional_seg.data import Loader, PreparedData, make_synthetic_dataset, prepare


def _data(n: int = 10, size: int = 4) -> PreparedData:
    """Sample i has every image pixel equal to i and every mask pixel equal to i % 3."""
    idx = torch.arange(n, dtype=torch.uint8)
    images = idx.reshape(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    masks = (idx % 3).reshape(n, 1, 1).expand(n, size, size).contiguous()
    return PreparedData(images=images, masks=masks, names=tuple(f"s{i}" for i in range(n)),
                        class_names=("a", "b", "c"))


def _ids(images: torch.Tensor) -> list[int]:
    return images[:, 0, 0, 0].tolist()


def test_ordered_batches_drop_last():
    loader = Loader(_data(10), 3, shuffle=False)
    batches = list(loader.epoch())
    assert len(loader) == len(batches) == 3 and loader.num_samples == 9
    assert [_ids(b[0]) for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    images, masks = batches[1]
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 4, 4)
    assert masks.dtype == torch.int64 and masks.shape == (3, 4, 4)
    assert masks[:, 0, 0].tolist() == [0, 1, 2]  # masks travel with their images
    assert [_ids(b[0]) for b in Loader(_data(10), 3, shuffle=False)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_keep_last_short_batch():
    loader = Loader(_data(10), 4, shuffle=False, drop_last=False)
    assert len(loader) == 3 and loader.num_samples == 10
    assert [len(b[0]) for b in loader.epoch(None)] == [4, 4, 2]


def test_shuffle_is_a_keyed_permutation(key):
    data = _data(10)
    loader = Loader(data, 5)
    first = [i for b, _ in loader.epoch(key) for i in _ids(b)]
    assert sorted(first) == list(range(10)) and first != list(range(10))
    assert [i for b, _ in loader.epoch(key) for i in _ids(b)] == first  # same key, same order
    second = [i for b, _ in loader.epoch(jr.fold_in(key, 1)) for i in _ids(b)]
    assert second != first
    for images, masks in loader.epoch(key):
        assert torch.equal(masks[:, 0, 0], (images[:, 0, 0, 0] % 3).long())  # pairs stay together


def test_shuffle_needs_a_key():
    loader = Loader(_data(4), 2)
    with pytest.raises(ValueError, match="key"):
        next(loader.epoch(None))
    with pytest.raises(TypeError, match="epoch"):
        iter(loader)


def test_bad_arguments():
    with pytest.raises(ValueError, match="no full batch"):
        Loader(_data(3), 4)
    with pytest.raises(ValueError, match="batch_size"):
        Loader(_data(3), 0)


def test_batches_are_not_views_of_the_data(key):
    data = _data(6)
    images, _ = next(Loader(data, 2, shuffle=False).epoch())
    images.fill_(99)
    assert data.images.max() < 99


def test_with_prepared_synthetic_data(tmp_path, key):
    root = make_synthetic_dataset(tmp_path / "syn", n_trainval=12, n_test=4, size=(24, 32))
    data = prepare(root, "trainval", 16, cache_dir=tmp_path / "cache", workers=1)
    loader = Loader(data.repeat(40), 8)
    seen = 0
    for images, masks in loader.epoch(key):
        assert images.shape == (8, 3, 16, 16) and masks.shape == (8, 16, 16)
        assert set(masks.unique().tolist()) <= {0, 1, 2}
        seen += len(images)
    assert seen == 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("resident", [False, True])
def test_cuda_batches(key, resident):
    loader = Loader(_data(10), 5, device="cuda", resident=resident)
    assert loader.pinned != resident
    got = []
    for images, masks in loader.epoch(key):
        assert images.is_cuda and masks.is_cuda and masks.dtype == torch.int64
        got += _ids(images)
    assert sorted(got) == list(range(10))
    cpu = [i for b, _ in Loader(_data(10), 5).epoch(key) for i in _ids(b)]
    assert got == cpu  # the permutation does not depend on the device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_from_shards_gathered_into_pinned_buffers(tmp_path, key):
    """The prefetch thread gathers into pinned host buffers; the batches on the GPU equal the CPU
    loader.s."""
    root = make_synthetic_dataset(tmp_path / "syn", n_trainval=20, n_test=2, size=(24, 32))
    data = prepare(root, "trainval", (16, 24), cache_dir=tmp_path / "cache", workers=1, in_memory=False,
                   shard_samples=3)
    loader = Loader(data, 4, device="cuda")
    assert loader.pinned and data.storage == "shards"
    host = loader._host_batch
    pinned = []

    def watch(idx):
        images, masks = host(idx)
        pinned.append(images.is_pinned() and masks.is_pinned())
        return images, masks

    loader._host_batch = watch
    cpu = list(Loader(data, 4, prefetch=0).epoch(key))
    gpu = list(loader.epoch(key))
    assert len(gpu) == len(cpu) == 5 and pinned == [True] * 5
    for (gi, gm), (ci, cm) in zip(gpu, cpu):
        assert gi.is_cuda and gm.is_cuda and gm.dtype == torch.int64 and gi.shape == (4, 3, 16, 24)
        assert torch.equal(gi.cpu(), ci) and torch.equal(gm.cpu(), cm)
