"""Lazy exports for a package's ``__init__`` (PEP 562): each name is imported from its module on
first use, so importing a package costs nothing until one of its names is needed (the pure train
step loads no reader, ``fseg --help`` loads no torch)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Collection, Mapping, Sequence

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]], submodules: Collection[str] = ()
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``.

    Args:
        package: the package's ``__name__`` (it is being imported: its namespace caches each name).
        exports: module -> the names it exports, e.g. ``{"loader": ("Loader",)}``.
        submodules: modules returned themselves (``package.random``).
    """
    home = {name: module for module, names in exports.items() for name in names}
    names = sorted([*home, *submodules])
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str):
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name in home:
            value = getattr(importlib.import_module(f"{package}.{home[name]}"), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__, names
