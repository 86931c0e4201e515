"""Laws of the pytree utilities: names round-trip, stack/unstack are inverse, helpers agree with hand counts."""

from __future__ import annotations

import pytest
import torch
import torchopt
from hypothesis import given
from hypothesis import strategies as st
from strategies import stackable, tensors, trees

from functional_seg.core.tree import (
    flatten_with_names,
    stack,
    tree_allclose,
    tree_bytes,
    tree_clone,
    tree_leaves,
    tree_map,
    tree_map_indexed,
    tree_size,
    unflatten_like,
    unflatten_names,
    unstack,
)


def _params() -> dict:
    return {
        "encoder": {"0": {"conv": {"weight": torch.ones(4, 3, 3, 3), "bias": torch.zeros(4)}}},
        "head": {"weight": torch.arange(8.0).reshape(2, 4), "bias": torch.zeros(2)},
    }


def test_flatten_names_read_like_state_dict():
    flat = flatten_with_names(_params())
    assert list(flat) == ["encoder.0.conv.weight", "encoder.0.conv.bias", "head.weight", "head.bias"]
    assert torch.equal(flat["head.weight"], torch.arange(8.0).reshape(2, 4))
    params = _params()
    assert flatten_with_names(params)["head.bias"] is params["head"]["bias"]  # leaves are not copied


@given(trees())
def test_flatten_unflatten_names_round_trip(tree):
    flat = flatten_with_names(tree)
    assert all(isinstance(v, torch.Tensor) for v in flat.values())
    back = unflatten_names(flat)
    assert tree_allclose(back, tree)
    assert list(flatten_with_names(back)) == list(flat)  # order is kept too


@given(trees())
def test_unflatten_like_round_trip(tree):
    assert tree_allclose(unflatten_like(tree, flatten_with_names(tree)), tree)


def test_unflatten_like_torchopt_adam_state():
    params = _params()
    opt_state = torchopt.adam(1e-3).init(params)
    flat = flatten_with_names(opt_state)
    assert flat and all(isinstance(v, torch.Tensor) for v in flat.values())
    # NamedTuple fields appear by name; torchopt keeps mu/nu as flat lists, so leaves are positional
    assert {name.split(".")[1] for name in flat} == {"mu", "nu", "count"}
    assert sum(name.split(".")[1] == "mu" for name in flat) == len(tree_leaves(params))
    # perturb every leaf so the round trip is not trivially satisfied by the template's values
    back = unflatten_like(opt_state, {n: v + 1 for n, v in flat.items()})
    assert type(back) is type(opt_state)
    assert tree_allclose(back, tree_map(lambda v: v + 1, opt_state))
    # the rebuilt state is usable by torchopt
    updates, _ = torchopt.adam(1e-3).update(tree_map(torch.ones_like, params), back, params=params, inplace=False)
    assert tree_allclose(tree_map(lambda u: u.shape, updates), tree_map(lambda p: p.shape, params))


def test_unflatten_like_names_missing_leaves():
    with pytest.raises(KeyError, match="head.bias"):
        unflatten_like(_params(), {k: v for k, v in flatten_with_names(_params()).items() if k != "head.bias"})


@given(stackable())
def test_stack_then_unstack_is_identity(trees_):
    stacked = stack(trees_)
    assert all(leaf.shape[0] == len(trees_) for leaf in tree_leaves(stacked))
    back = unstack(stacked)
    assert len(back) == len(trees_)
    for a, b in zip(back, trees_):
        assert tree_allclose(a, b)


@given(stackable(min_n=1))
def test_unstack_then_stack_is_identity(trees_):
    stacked = stack(trees_)
    assert tree_allclose(stack(unstack(stacked)), stacked)


def test_stack_and_unstack_errors():
    with pytest.raises(ValueError):
        stack([])
    with pytest.raises(ValueError, match="leading"):
        unstack({"a": torch.zeros(3), "b": torch.zeros(2)})
    with pytest.raises(ValueError, match="0-d"):
        unstack({"a": torch.zeros(3), "b": torch.tensor(1.0)})
    assert unstack({}) == []


@given(trees())
def test_tree_map_size_bytes_clone(tree):
    leaves = tree_leaves(tree)
    assert tree_size(tree) == sum(x.numel() for x in leaves)
    assert tree_bytes(tree) == sum(x.numel() * x.element_size() for x in leaves)
    doubled = tree_map(lambda x: x * 2 if x.dtype != torch.bool else x, tree)
    assert all(torch.equal(d, x * 2 if x.dtype != torch.bool else x) for d, x in zip(tree_leaves(doubled), leaves))
    clone = tree_clone(tree)
    assert tree_allclose(clone, tree)
    assert all(c.data_ptr() != x.data_ptr() for c, x in zip(tree_leaves(clone), leaves) if x.numel())


def test_tree_map_several_trees():
    a, b = _params(), tree_map(torch.ones_like, _params())
    assert tree_allclose(tree_map(lambda x, y: x + y, a, b), tree_map(lambda x: x + 1, a))


def test_tree_size_by_hand():
    assert tree_size(_params()) == 4 * 3 * 3 * 3 + 4 + 8 + 2
    assert tree_bytes(_params()) == 4 * tree_size(_params())


@given(tensors(dtype=st.just(torch.float32)))
def test_tree_allclose(x):
    assert tree_allclose({"a": x}, {"a": x.clone()})
    assert not tree_allclose({"a": x}, {"b": x})  # structure
    assert not tree_allclose({"a": x}, {"a": x.double()})  # dtype
    assert not tree_allclose({"a": x}, {"a": x.reshape(1, *x.shape)})  # shape
    assert not tree_allclose({"a": x}, {"a": x + 1})
    assert tree_allclose({"a": x}, {"a": x + 1e-3}, atol=2e-3)
    nan = torch.full((2,), float("nan"))
    assert tree_allclose({"a": nan}, {"a": nan.clone()})


def test_clashing_names_raise():
    with pytest.raises(ValueError, match="a.b"):
        flatten_with_names({"a.b": torch.zeros(1), "a": {"b": torch.zeros(1)}})
    with pytest.raises(ValueError):
        unflatten_names({"a": torch.zeros(1), "a.b": torch.zeros(1)})
    with pytest.raises(ValueError):
        unflatten_names({"a.b": torch.zeros(1), "a": torch.zeros(1)})


def test_none_leaves_are_dropped_and_restored():
    tree = {"a": torch.zeros(2), "b": None}
    assert list(flatten_with_names(tree)) == ["a"]
    assert unflatten_like(tree, {"a": torch.ones(2)})["b"] is None


@given(trees(), st.booleans())
def test_the_fast_pytree_agrees_with_torch_s_python_pytree(tree, with_namedtuple):
    # eager code maps over the C++ pytree, dynamo traces the Python one: the same leaves in the same
    # order and the same rebuilt structure, or a spec of one would misplace leaves of the other
    import torch.utils._pytree as python_pytree
    from torchopt.transform.scale_by_adam import ScaleByAdamState

    if with_namedtuple:  # torchopt's states are NamedTuples of trees
        tree = ScaleByAdamState(mu=tree, nu=tree_clone(tree), count=tree)
    assert [id(x) for x in tree_leaves(tree)] == [id(x) for x in python_pytree.tree_leaves(tree)]
    doubled = tree_map(lambda x: x * 2, tree)
    assert python_pytree.tree_structure(doubled) == python_pytree.tree_structure(tree)
    for d, x in zip(python_pytree.tree_leaves(doubled), python_pytree.tree_leaves(tree)):
        assert torch.equal(d, x * 2)


@given(trees())
def test_tree_map_indexed_passes_each_leaf_its_position(tree):
    leaves, other = tree_leaves(tree), tree_clone(tree)
    seen = []
    out = tree_map_indexed(lambda i, x, y: seen.append((i, x, y)) or x + i, tree, other)
    assert [i for i, _, _ in seen] == list(range(len(leaves)))
    assert all(x is a and y is b for (_, x, y), a, b in zip(seen, leaves, tree_leaves(other)))
    for i, (o, x) in enumerate(zip(tree_leaves(out), leaves)):
        assert torch.equal(o, x + i)
    with pytest.raises(ValueError, match="tree_map_indexed: trees of"):
        tree_map_indexed(lambda i, x, y: x, tree, [*leaves, torch.zeros(1)])
