"""``PreparedData.subset`` / ``carve`` (a seeded validation split by sample names) and ``overlap``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from functional_seg.data import PreparedData, overlap


def _data(names) -> PreparedData:
    n = len(names)
    images = torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return PreparedData(images=images, masks=torch.zeros(n, 2, 2, dtype=torch.uint8), names=tuple(names),
                        class_names=("a", "b"))


names_st = st.lists(st.text(min_size=1, max_size=6), min_size=2, max_size=40, unique=True)
fraction_st = st.floats(min_value=0.001, max_value=0.999)


@given(names=names_st, fraction=fraction_st, seed=st.integers(0, 2**31 - 1))
def test_carve_is_a_partition_of_the_right_size(names, fraction, seed):
    data = _data(names)
    rest, carved = data.carve(fraction, seed)
    assert set(rest.names).isdisjoint(carved.names)
    assert set(rest.names) | set(carved.names) == set(names)
    assert len(carved) == min(max(round(fraction * len(names)), 1), len(names) - 1)
    assert carved.class_names == rest.class_names == ("a", "b")
    for part in (rest, carved):  # each sample keeps its own pixels, in data order
        idx = part.images[:, 0, 0, 0].tolist()
        assert idx == sorted(idx) and [names[i] for i in idx] == list(part.names)


@given(names=names_st, fraction=fraction_st, seed=st.integers(0, 2**31 - 1), shuffle=st.randoms())
def test_carve_is_deterministic_and_order_independent(names, fraction, seed, shuffle):
    _, carved = _data(names).carve(fraction, seed)
    _, again = _data(names).carve(fraction, seed)
    assert carved.names == again.names
    permuted = list(names)
    shuffle.shuffle(permuted)
    _, from_permuted = _data(permuted).carve(fraction, seed)
    assert set(from_permuted.names) == set(carved.names)


def test_carve_example_and_seed_matters():
    data = _data([f"s{i}" for i in range(50)])
    rest, carved = data.carve(0.1, seed=0)
    assert len(carved) == 5 and len(rest) == 45
    assert {data.carve(0.1, seed=s)[1].names for s in range(5)} != {carved.names}
    assert len(_data(["a", "b"]).carve(0.01, 0)[1]) == 1  # clamped to [1, N - 1]
    assert len(_data(["a", "b"]).carve(0.99, 0)[1]) == 1


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan"), True])
def test_carve_refuses_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match="fraction must lie strictly between 0 and 1"):
        _data(["a", "b", "c"]).carve(fraction, 0)


def test_carve_refuses_one_sample_and_repeated_names():
    with pytest.raises(ValueError, match="at least 2 samples"):
        _data(["a"]).carve(0.5, 0)
    with pytest.raises(ValueError, match="names must be unique .*carve before repeat"):
        _data(["a", "b"]).repeat(4).carve(0.5, 0)


def test_subset_and_overlap():
    data = _data(["a", "b", "c", "d"])
    sub = data.subset([3, 1, 1])
    assert sub.names == ("d", "b", "b") and sub.images[:, 0, 0, 0].tolist() == [3, 1, 1]
    assert sub.class_names == data.class_names and sub.cache_path is None
    assert len(data.subset(torch.tensor([], dtype=torch.int64))) == 0
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        data.subset([4])
    assert overlap(data, _data(["x", "c", "a"])) == ["a", "c"]
    assert overlap(data, _data(["x", "y"])) == []
    rest, carved = data.carve(0.5, 1)
    assert overlap(rest, carved) == []
