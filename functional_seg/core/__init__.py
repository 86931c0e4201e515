"""The functional core: pytree utilities, explicit random keys, atomic files and settings.

Names are imported on first use (PEP 562): ``core.settings`` and ``core.files`` need no torch,
so ``fseg --help`` stays fast.
"""

from __future__ import annotations

from .lazy import lazy_exports

_EXPORTS = {
    "tree": ("flatten_with_names", "stack", "tree_allclose", "tree_bytes", "tree_clone", "tree_leaves", "tree_map",
             "tree_size", "tree_structure", "unflatten_like", "unflatten_names", "unstack"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, submodules=("random",))
