"""Files written whole or not at all, and JSON that any config or record can become.

Every file the library writes (checkpoints, config.json, metrics.jsonl rewrites, result tables,
predicted PNGs, exported models) goes through :func:`write_atomic`: the bytes go to a temporary
file in the target's directory, which is flushed and fsynced, then renamed over the target
(``os.replace``) and the directory fsynced. A process killed at any moment, or a disk that fills
up mid-write, leaves either the old file or the new one, never half of one.

:func:`jsonable` is the one JSON encoding of configs (dataclasses, tuples, paths, tensors):
non-finite floats become ``null`` so every record is strict JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "write_json", "append_jsonl", "jsonable", "dumps", "user_cache_dir"]


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON values: dataclasses -> dicts, tuples -> lists, tensors -> lists,
    non-finite floats -> None, anything else unknown -> ``str(x)``."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "tolist"):  # tensors and numpy values, without importing either
        return jsonable(x.tolist())
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return str(x)


def dumps(x: Any, **kwargs) -> str:
    """Strict JSON text of ``jsonable(x)`` (never a bare NaN or Infinity)."""
    return json.dumps(jsonable(x), allow_nan=False, **kwargs)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/functional_seg``, else ``~/.cache/functional_seg``: every cache of the library.

    Prepared datasets and compiled code go here, never into a dataset folder: data folders are
    often read-only, shared, or synced, and preparing a split must leave them exactly as they
    were; torch's own ``/tmp`` default is emptied by reboots and fresh containers. A relative
    ``XDG_CACHE_HOME`` is ignored, as the XDG base-directory spec asks.
    """
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "functional_seg"


def write_atomic(path: str | os.PathLike, data: bytes | str | Sequence[bytes | memoryview]) -> Path:
    """Write ``data`` to ``path`` via a fsynced temporary file and ``os.replace``.

    ``data`` may be a list of buffers (bytes, memoryviews of numpy arrays), written one after the
    other, so a large file is never joined into one copy in memory first.

    Raises:
        OSError: as the OS gives it (read-only folder, disk full, a file where a folder should
            be); the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
        with contextlib.suppress(OSError):
            stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented strict JSON, written atomically."""
    return write_atomic(path, dumps(obj, indent=2) + "\n")


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append one strict-JSON line and fsync it (a kill can cut only this line, which readers skip)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
