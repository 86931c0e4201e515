"""The run directory: the one owner of a run's files and of the guarantees around them.

    RUN_DIR/config.json        the run's settings (model, preprocessing, data, FitConfig, CLI args)
    RUN_DIR/metrics.jsonl      one strict-JSON record per epoch, appended and fsynced
    RUN_DIR/last.safetensors   the train state at the last epoch end (or ``checkpoint_every``)
    RUN_DIR/best.safetensors   the train state of the best validation mean IoU
    RUN_DIR/test.json          the test split's scores of the selected checkpoint, written once at the end
    RUN_DIR/reliability.png    its calibration (reliability diagram; -member<i>.png for an ensemble)
    RUN_DIR/.lock              held (flock) while a run writes here

Guarantees:
- one live run per directory: a second one is refused in one line naming the holder's pid;
- nothing a user made is deleted or overwritten: a fresh run refuses a directory that already
  holds run files, and a resume refuses one that holds results but no ``last.safetensors``;
- a resume continues the same experiment or none: every setting that changes the maths
  (``config.maths_record``) is compared with the checkpoint's, and the first difference is named
  with both values;
- a checkpoint never holds a non-finite parameter, statistic or optimizer moment: the state is
  checked before every write and the run stops with :class:`TrainingDiverged`;
- every write is atomic (``core.files``); OS errors (read-only folder, disk full, a file where
  the folder should be) become one :class:`RunDirError` line naming the path;
- in a data-parallel run only rank 0 writes (``writer=True``); the other ranks open the directory
  with ``writer=False``: they take no lock, write nothing, read the checkpoint on resume and
  check each state for nan/inf as rank 0 does, so every rank stops together.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt
from ..core.files import append_jsonl, write_atomic, write_json
from ..core.tree import flatten_with_names
from ..models.saved import check_model, model_metadata
from .config import first_difference

__all__ = ["RunDir", "RunDirError", "TrainingDiverged", "RUN_FILES", "nonfinite_leaves"]

RUN_FILES = ("config.json", "metrics.jsonl", "last.safetensors", "best.safetensors", "test.json")


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message says what is there and what to do."""


class TrainingDiverged(RuntimeError):
    """The loss or the train state became nan or inf; the run stopped and kept its last good checkpoint."""


def _os_error(path: Path, err: OSError, doing: str) -> RunDirError:
    reason = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
              errno.EACCES: "permission denied", errno.ENOTDIR: "a file is in the way of the folder",
              errno.EEXIST: "a file is in the way of the folder"}.get(err.errno, err.strerror or str(err))
    where = err.filename or path
    return RunDirError(f"cannot {doing} {where}: {reason}")


def nonfinite_leaves(tree) -> list[str]:
    """Flattened names of the floating-point leaves holding a nan or inf (one host sync)."""
    named = {k: v for k, v in flatten_with_names(tree).items()
             if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if not named:
        return []
    ok = torch.stack([torch.isfinite(v).all() for v in named.values()]).cpu().tolist()
    return [name for name, fine in zip(named, ok) if not fine]


class RunDir:
    """A locked run directory; use as a context manager (the lock is released on exit)."""

    def __init__(self, path: str | os.PathLike, *, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.last = self.path / "last.safetensors"
        self.best = self.path / "best.safetensors"
        self.test = self.path / "test.json"
        self._lock_fd: int | None = None
        self._created = False

    # -- opening -------------------------------------------------------------------------------

    def __enter__(self) -> RunDir:
        import fcntl

        if not self.writer:
            return self
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} is a file, not a folder; choose a folder for the run")
        try:
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise _os_error(self.path, err, "create the run directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(f"another run (pid {holder}) is writing to {self.path}; wait for it to end "
                              "or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_fd is None:
            return
        if not self.existing():  # refused or failed before its first file: leave no trace behind
            with contextlib.suppress(OSError):
                (self.path / ".lock").unlink()
                if self._created:
                    self.path.rmdir()
        os.close(self._lock_fd)  # closing releases the flock
        self._lock_fd = None

    # -- starting or resuming ------------------------------------------------------------------

    def existing(self) -> list[str]:
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def start(self, record: Mapping[str, Any], maths: Mapping[str, Any], *, resume: bool) -> bool:
        """Check the directory for a fresh run or a resume, then write config.json.

        Returns True when there is a checkpoint to resume from (``restore`` it next).
        """
        found = self.existing()
        if not resume and found:
            raise RunDirError(f"{self.path} already holds a run ({', '.join(found)}); continue it with --resume, "
                              "or choose another --out")
        has_last = self.last.exists()
        if resume and not found:
            raise RunDirError(f"--resume: {self.path} holds no run to continue (no config.json or "
                              "last.safetensors); drop --resume to start one there")
        if resume and not has_last:
            results = [f for f in found if f != "config.json"]
            if results:
                raise RunDirError(f"cannot resume {self.path}: it holds {', '.join(results)} but no "
                                  "last.safetensors (the run stopped before its first checkpoint); move those "
                                  "files away to start it again, or choose another --out")
            if self.config.exists():  # only settings written: starting again loses nothing if they agree
                self._refuse_changes(self._read_config().get("maths") or {}, maths, self.config)
        if not has_last:
            self.write_config(record, maths)
        return has_last and resume

    def write_config(self, record: Mapping[str, Any], maths: Mapping[str, Any]) -> None:
        if not self.writer:
            return
        self._write(self.config, lambda p: write_json(p, {**record, "maths": dict(maths)}))

    def _read_config(self) -> dict:
        try:
            return json.loads(self.config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise RunDirError(f"cannot read {self.config}: {err}") from None

    def _refuse_changes(self, old: Mapping, new: Mapping, source: Path) -> None:
        diff = first_difference(old, new)
        if diff is not None:
            name, was, now = diff
            raise RunDirError(f"cannot resume {self.path}: {name} was {was!r} in {source.name}, this run has "
                              f"{now!r}; resume with the same settings, or start a new run with another --out")

    def restore(self, template, model, record: Mapping[str, Any], maths: Mapping[str, Any]):
        """``(train_state, extra)`` from last.safetensors, after checking model and maths agree;
        then config.json records this run's settings (the maths are the same)."""
        _, meta = ckpt.read(self.last)  # settings first: they explain a structure mismatch best
        check_model(meta, model, path=self.last)
        self._refuse_changes(meta.get("maths") or {}, maths, self.last)
        train_state, meta = ckpt.load(self.last, template=template)
        self.write_config(record, maths)
        return train_state, dict(meta.get("extra") or {})

    # -- writing -------------------------------------------------------------------------------

    def _write(self, path: Path, write) -> None:
        try:
            write(path)
        except OSError as err:
            raise _os_error(path, err, "write") from None

    def save(self, which: str, train_state, *, model, metadata: Mapping[str, Any], extra: Mapping) -> Path:
        """Write ``last`` or ``best`` atomically, refusing a state with nan or inf in it."""
        bad = nonfinite_leaves(train_state)
        if bad:
            kept = f"the last good checkpoint is {self.last}" if self.last.exists() else "no checkpoint was written"
            raise TrainingDiverged(f"the train state became non-finite ({len(bad)} tensors, first {bad[0]}) at "
                                   f"step {int(train_state.step.reshape(-1)[0])}; training stopped and {kept}")
        path = {"last": self.last, "best": self.best}[which]
        if not self.writer:
            return path
        k = 0 if train_state.step.dim() == 0 else int(train_state.step.shape[0])
        meta = {**model_metadata(model), **dict(metadata), "ensemble": k, "extra": dict(extra)}
        self._write(path, lambda p: ckpt.save(p, train_state, meta))
        return path

    def write_test(self, result: Mapping[str, Any]) -> None:
        """test.json: the test split's scores of the selected checkpoint (rank 0 only)."""
        if self.writer:
            self._write(self.test, lambda p: write_json(p, dict(result)))

    def write_reliability(self, summary) -> None:
        """reliability.png: the test split's calibration (one file per member of an ensemble)."""
        if self.writer:
            from ..reliability import save_summary_diagrams

            self._write(self.path / "reliability.png", lambda p: save_summary_diagrams(p, summary, title="test split"))

    def append(self, record: Mapping[str, Any]) -> None:
        if not self.writer:
            return
        self._write(self.metrics, lambda p: append_jsonl(p, record))

    def history(self, max_step: int) -> list[dict]:
        """The whole-epoch records up to ``max_step``; the file is rewritten to hold just those."""
        if not self.metrics.exists():
            return []
        kept = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):  # a line cut by a kill mid-write
                record = json.loads(line)
                if record.get("step", 0) <= max_step and not record.get("partial"):
                    kept.append(record)
        if self.writer:
            self._write(self.metrics, lambda p: write_atomic(p, "".join(json.dumps(r) + "\n" for r in kept)))
        return kept
