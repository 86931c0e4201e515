"""Test helpers: the processes a process started, read from /proc (Linux), so a test can check
that none of them outlives its parent."""

from __future__ import annotations

import os
import time


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Running or sleeping: a zombie has exited and only waits to be reaped."""
    state = _stat(pid)
    return state is not None and state[0] != "Z"


def children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            state = _stat(int(entry))
            if state is not None and state[1] == pid and state[0] != "Z":
                found.append(int(entry))
    return found


def wait_children(proc, n: int, timeout: float = 60.0) -> list[int]:
    """The first ``n`` children of the ``subprocess.Popen`` ``proc`` once they run (fewer if it
    exits or ``timeout`` passes first)."""
    deadline = time.monotonic() + timeout
    found: list[int] = []
    while len(found) < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        found = children(proc.pid)
    return found


def survivors(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Those of ``pids`` still alive after waiting up to ``timeout`` seconds for them to go."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]
