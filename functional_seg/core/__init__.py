"""The functional core: pytree utilities and explicit random keys."""

from . import random
from .tree import (
    flatten_with_names,
    stack,
    tree_allclose,
    tree_bytes,
    tree_clone,
    tree_leaves,
    tree_map,
    tree_size,
    tree_structure,
    unflatten_like,
    unflatten_names,
    unstack,
)

__all__ = [
    "random",
    "flatten_with_names",
    "stack",
    "tree_allclose",
    "tree_bytes",
    "tree_clone",
    "tree_leaves",
    "tree_map",
    "tree_size",
    "tree_structure",
    "unflatten_like",
    "unflatten_names",
    "unstack",
]
