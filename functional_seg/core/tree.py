"""Pytree utilities for parameter and state trees.

Trees here are nested dicts (and the NamedTuples torchopt uses) whose leaves are tensors.
Flattened names read like torch's ``state_dict`` keys (``encoder.0.conv.weight``), which
is what safetensors files and error messages show.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

try:  # optree's C++ flatten/unflatten behind torch's own API: the same leaf order, several times faster
    import torch.utils._cxx_pytree as _cxx_pytree
except ImportError:  # optree missing (torchopt requires it, but a bare torch may lack it)
    _cxx_pytree = None

Tree = Any

__all__ = [
    "tree_map",
    "tree_map_indexed",
    "tree_leaves",
    "pytree_impl",
    "tree_structure",
    "flatten_with_names",
    "unflatten_names",
    "unflatten_like",
    "stack",
    "unstack",
    "tree_size",
    "tree_bytes",
    "tree_clone",
    "tree_allclose",
]


def pytree_impl():
    """torch's C++ pytree in eager code, its Python pytree while dynamo traces (which it reads best).

    Why: an eager train step maps over its trees a dozen and more times; the Python version
    costs ~0.3 ms a map over a 62-leaf SegNet tree, a sixth of a small model's CPU step. Only
    functions that flatten and unflatten within one call use this (a treespec of one version
    must not reach the other).
    """
    return pytree if _cxx_pytree is None or torch.compiler.is_compiling() else _cxx_pytree


def tree_map(fn: Callable, tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf-wise to one or more trees of the same structure."""
    return pytree_impl().tree_map(fn, tree, *rest)


def tree_map_indexed(fn: Callable, tree: Tree, *rest: Tree) -> Tree:
    """``tree_map`` that also passes each leaf's position in ``tree_leaves(tree)``: ``fn(i, leaf, *others)``.

    For per-leaf values computed together as one vector (e.g. the optimizer's bias corrections
    of all the leaves in a few ops): leaf i takes entry i.
    """
    impl = pytree_impl()
    leaves, spec = impl.tree_flatten(tree)
    others = [impl.tree_leaves(r) for r in rest]
    if any(len(o) != len(leaves) for o in others):
        raise ValueError(f"tree_map_indexed: trees of {len(leaves)} and {[len(o) for o in others]} leaves")
    return impl.tree_unflatten([fn(i, x, *(o[i] for o in others)) for i, x in enumerate(leaves)], spec)


def tree_leaves(tree: Tree) -> list:
    return pytree_impl().tree_leaves(tree)


def tree_structure(tree: Tree):
    return pytree.tree_structure(tree)


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flatten_with_names(tree: Tree) -> dict[str, Any]:
    """Flatten to ``{"a.b.c": leaf}`` in the tree's own (deterministic) order.

    ``None`` leaves (empty optimizer slots) are dropped: they carry no data.
    """
    flat, _ = pytree.tree_flatten_with_path(tree)
    out: dict[str, Any] = {}
    for path, leaf in flat:
        if leaf is None:
            continue
        name = ".".join(_key_name(entry) for entry in path)
        if name in out:
            raise ValueError(f"two leaves share the flattened name {name!r}; keys must not contain '.'")
        out[name] = leaf
    return out


def unflatten_names(flat: Mapping[str, Any]) -> dict:
    """Inverse of :func:`flatten_with_names` for trees made of nested dicts."""
    root: dict = {}
    for name, leaf in flat.items():
        parts = name.split(".")
        node = root
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"name {name!r} clashes with the leaf {'.'.join(parts[: i + 1])!r}")
            node = child
        if parts[-1] in node:
            raise ValueError(f"name {name!r} is both a leaf and a subtree")
        node[parts[-1]] = leaf
    return root


def unflatten_like(template: Tree, flat: Mapping[str, Any]) -> Tree:
    """Rebuild a tree shaped like ``template`` from named leaves (for NamedTuple states)."""
    leaves, spec = pytree.tree_flatten_with_path(template)
    values = []
    missing = []
    for path, leaf in leaves:
        name = ".".join(_key_name(entry) for entry in path)
        if leaf is None:
            values.append(None)
        elif name in flat:
            values.append(flat[name])
        else:
            missing.append(name)
    if missing:
        raise KeyError(f"missing leaves: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    return pytree.tree_unflatten(values, spec)


def stack(trees: Iterable[Tree]) -> Tree:
    """Stack trees of equal structure along a new leading axis (for ``torch.func.vmap``)."""
    trees = list(trees)
    if not trees:
        raise ValueError("stack needs at least one tree")
    return pytree.tree_map(lambda *xs: torch.stack(xs), *trees)


def unstack(tree: Tree) -> list[Tree]:
    """Inverse of :func:`stack`: split the leading axis into a list of trees."""
    leaves, spec = pytree.tree_flatten(tree)
    if not leaves:
        return []
    if any(leaf.dim() == 0 for leaf in leaves):
        raise ValueError("unstack needs a leading (stacked) dimension on every leaf; got a 0-d leaf")
    n = leaves[0].shape[0]
    if any(leaf.shape[0] != n for leaf in leaves):
        raise ValueError("all leaves must share the leading (stacked) dimension")
    return [pytree.tree_unflatten([leaf[i] for leaf in leaves], spec) for i in range(n)]


def tree_size(tree: Tree) -> int:
    """Number of scalar elements over all tensor leaves."""
    return sum(leaf.numel() for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor))


def tree_bytes(tree: Tree) -> int:
    return sum(
        leaf.numel() * leaf.element_size() for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)
    )


def tree_clone(tree: Tree) -> Tree:
    return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def tree_allclose(a: Tree, b: Tree, *, rtol: float = 0.0, atol: float = 0.0) -> bool:
    """True when both trees have the same structure and leaves (same shape and dtype) equal within tolerance."""
    if tree_structure(a) != tree_structure(b):
        return False
    for x, y in zip(tree_leaves(a), tree_leaves(b)):
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.shape != y.shape or x.dtype != y.dtype:
                return False
            if not torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
                return False
        elif x != y:
            return False
    return True
