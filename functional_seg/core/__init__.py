"""The functional core: pytree utilities, explicit random keys, atomic files and settings.

Names are imported on first use (PEP 562): ``core.settings`` and ``core.files`` need no torch,
so ``fseg --help`` stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "tree": ("flatten_with_names", "stack", "tree_allclose", "tree_bytes", "tree_clone", "tree_leaves", "tree_map",
             "tree_size", "tree_structure", "unflatten_like", "unflatten_names", "unstack"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted([*_HOME, "random"])


def __getattr__(name: str):
    if name == "random":
        return importlib.import_module(f"{__name__}.random")
    if name in _HOME:
        value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
