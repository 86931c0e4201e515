"""Compiled code that outlives the process: a second run of the same model and shapes starts warm.

``torch.compile`` spends most of a short run's first minute in AOTAutograd (the joint graph and
its partition) and in inductor (code generation, then the C++ or Triton builds). torch itself
caches both stages on disk, keyed by the graph, its shapes and dtypes, the device, the torch
version and its config: the FX graph cache and the AOTAutograd cache, on by default. A warm
process still traces with dynamo, then finds the compiled graphs instead of building them. This
module adds two things:

- Where the caches live. torch keeps them in ``/tmp/torchinductor_<user>``, which a reboot, a
  fresh container or a tmp cleaner empties. :func:`use_user_cache_dir` moves them to the user
  cache directory (below), unless the user set ``TORCHINDUCTOR_CACHE_DIR`` themselves.
- Carrying them. :func:`save_artifacts` writes what this process compiled (or found) to one
  file (``torch.compiler.save_cache_artifacts``, the "mega-cache"), atomically;
  :func:`load_artifacts` pre-loads such a file into a fresh machine's caches, so a run on a
  machine that starts bare (a CI runner, a rented GPU) starts warm. ``fseg train
  --compile-cache FILE`` does both.

The user cache directory is ``core.files.user_cache_dir()`` (``$XDG_CACHE_HOME/functional_seg``,
else ``~/.cache/functional_seg``, where prepared datasets go too); compiled code goes to its
``compile/`` folder.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

from .core.files import user_cache_dir, write_atomic

__all__ = ["use_user_cache_dir", "save_artifacts", "load_artifacts", "SaveArtifacts", "compile_cache_hooks",
           "CompileCacheError"]

log = logging.getLogger(__name__)

_ENV = "TORCHINDUCTOR_CACHE_DIR"


class CompileCacheError(OSError):
    """A compile-cache file that cannot be read or written; the message names it."""


def _torch_default_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return os.path.abspath(default_cache_dir())
    except Exception:  # private API: moved or changed in another torch version
        return None


def use_user_cache_dir() -> Path | None:
    """Point torch's on-disk compile caches at ``user_cache_dir() / "compile"``; returns the folder used.

    A ``TORCHINDUCTOR_CACHE_DIR`` that the user set is kept (and returned). If the user cache
    directory cannot be created (a read-only home), torch's default stays and a warning says so.
    Call it before the first compilation: torch reads the variable when it first looks up a cache.
    """
    current = os.environ.get(_ENV)
    if current and os.path.abspath(current) != _torch_default_dir():
        return Path(current)
    folder = user_cache_dir() / "compile"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        warnings.warn(f"compile cache: cannot create {folder} ({err.strerror or err}); torch's default "
                      f"{current or _torch_default_dir()} stays", RuntimeWarning, stacklevel=2)
        return None
    os.environ[_ENV] = str(folder)
    return folder


def save_artifacts(path: str | os.PathLike) -> int:
    """Write the compile artifacts of this process to ``path`` (atomic); returns the bytes written.

    Returns 0 and writes nothing when this process compiled nothing. Raises CompileCacheError
    naming the file when it cannot be written (the previous file, if any, is kept whole).
    """
    saved = torch.compiler.save_cache_artifacts()
    if saved is None or not saved[0]:
        return 0
    blob, _info = saved
    try:
        write_atomic(path, blob)
    except OSError as err:
        raise CompileCacheError(f"compile cache {path}: cannot write it ({err.strerror or err})") from None
    return len(blob)


def load_artifacts(path: str | os.PathLike) -> bool:
    """Pre-load the compile caches from a file of :func:`save_artifacts`; False if there is none.

    Raises CompileCacheError naming the file when it exists but cannot be read, or is damaged or
    of another torch version (torch checks both).
    """
    path = Path(path)
    if not path.exists():
        return False
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise CompileCacheError(f"compile cache {path}: cannot read it ({err.strerror or err})") from None
    torch_log = logging.getLogger("torch.compiler._cache")  # logs a traceback for damaged bytes, then returns None
    level = torch_log.level
    torch_log.setLevel(logging.CRITICAL)
    try:
        info = torch.compiler.load_cache_artifacts(blob)
    except Exception:  # torch raises various errors on foreign or damaged bytes
        info = None
    finally:
        torch_log.setLevel(level)
    if info is None:
        raise CompileCacheError(f"compile cache {path}: not a compile-cache file of torch {torch.__version__} "
                                "(damaged, or written by another torch version)")
    return True


class SaveArtifacts:
    """A ``fit`` hook: after the first epoch (everything compiled by then: the train step and the
    eval step), write the process's compile artifacts to ``path``; a failure is one warning line,
    never the end of the run."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.done = Path(path), False

    def on_epoch_end(self, record: dict, epochs: int) -> None:
        if self.done:
            return
        self.done = True
        try:
            n = save_artifacts(self.path)
        except CompileCacheError as err:
            warnings.warn(str(err), RuntimeWarning, stacklevel=2)
            return
        if n:
            log.info("compile cache: %.1f MB of compiled code written to %s", n / 2**20, self.path)


def compile_cache_hooks(path: str | os.PathLike | None, compiles: bool) -> list:
    """``fseg train --compile-cache FILE``: preload FILE now (before anything compiles) and return the
    hook that writes this run's compiled code to it after the first epoch; a warning and no hook
    when the run does not compile.

    Raises:
        CompileCacheError: FILE exists but cannot be read as this torch's compile artifacts.
    """
    if not path:
        return []
    if not compiles:
        warnings.warn(f"--compile-cache {path} is unused: this run does not compile (--compile off, or auto on "
                      "the CPU)", RuntimeWarning, stacklevel=2)
        return []
    if load_artifacts(path):
        log.warning("compile cache: preloaded %s", path)
    return [SaveArtifacts(path)]
