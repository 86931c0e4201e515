"""Hypothesis strategies: keys, trees of tensors, and small image batches.

Tensor values come from a seeded local ``torch.Generator`` (hypothesis draws the seed and the
shape), which keeps examples cheap and never touches torch's global RNG.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from functional_seg.core import random as jr

seeds = st.integers(min_value=0, max_value=2**63 - 1)
keys = seeds.map(jr.key)

# Tree keys: identifiers without dots, so flattened names ("a.b.c") are unambiguous.
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=6)
shapes = st.lists(st.integers(min_value=1, max_value=4), min_size=0, max_size=3).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool])


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=dtype)
    return torch.randint(-100, 100, shape, generator=g, dtype=dtype)


@st.composite
def tensors(draw, shape=shapes, dtype=dtypes) -> torch.Tensor:
    return _tensor(draw(shape), draw(dtype), draw(st.integers(0, 2**31)))


def trees(leaves=None, max_leaves: int = 8) -> st.SearchStrategy:
    """Nested dicts (non-empty at every level) with tensor leaves, as params and state trees are."""
    leaves = tensors() if leaves is None else leaves
    return st.recursive(
        leaves, lambda children: st.dictionaries(names, children, min_size=1, max_size=3), max_leaves=max_leaves
    ).filter(lambda t: isinstance(t, dict))


@st.composite
def stackable(draw, min_n: int = 1, max_n: int = 4) -> list:
    """A list of n trees of identical structure, shapes and dtypes (inputs to ``stack``)."""
    template = draw(trees())
    n = draw(st.integers(min_n, max_n))
    seed = draw(st.integers(0, 2**31))

    def fill(i: int, tree):
        if isinstance(tree, dict):
            return {k: fill(i, v) for k, v in tree.items()}
        return _tensor(tuple(tree.shape), tree.dtype, seed + i)

    return [fill(i, template) for i in range(n)]


@st.composite
def image_batches(draw, channels: int | None = None, max_n: int = 3, max_side: int = 12, multiple: int = 1
                  ) -> torch.Tensor:
    """float32 [N, C, H, W] with H and W multiples of ``multiple``."""
    n = draw(st.integers(1, max_n))
    c = channels if channels is not None else draw(st.integers(1, 4))
    h = multiple * draw(st.integers(1, max(1, max_side // multiple)))
    w = multiple * draw(st.integers(1, max(1, max_side // multiple)))
    return _tensor((n, c, h, w), torch.float32, draw(st.integers(0, 2**31)))
