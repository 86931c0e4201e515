"""``parallel_map``: a function over many small tasks in a process pool, in order, falling back to
this process when a pool is not worth it or not possible. Workers only run PIL and numpy."""

from __future__ import annotations

import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

__all__ = ["parallel_map", "cpu_count"]

_SERIAL_BELOW = 16  # fewer tasks than this: a pool costs more than it saves


def cpu_count() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _pool_context():
    # fork is cheap (no torch re-import) and safe here: workers only run PIL and numpy.
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None


def parallel_map(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int) -> Iterator[Any]:
    """``map(fn, tasks)`` in order over ``workers`` processes, or serially for few tasks or one
    worker; a pool that cannot start or breaks midway hands the rest to this process."""
    if workers <= 1 or len(tasks) < _SERIAL_BELOW:
        yield from map(fn, tasks)
        return
    done = 0
    try:
        ex = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context())
    except (OSError, NotImplementedError, ValueError) as e:
        warnings.warn(f"prepare: no process pool ({e}); decoding serially", RuntimeWarning, stacklevel=3)
        yield from map(fn, tasks)
        return
    try:
        with warnings.catch_warnings():
            # Python >= 3.12 warns about fork in a threaded process; the workers never use torch.
            warnings.filterwarnings("ignore", message=r".*fork\(\).*", category=DeprecationWarning)
            results = ex.map(fn, tasks, chunksize=max(1, min(32, len(tasks) // (workers * 4))))
        for r in results:
            yield r
            done += 1
    except (BrokenProcessPool, OSError) as e:
        warnings.warn(
            f"prepare: process pool failed ({e}); decoding the rest serially", RuntimeWarning, stacklevel=3
        )
        yield from map(fn, tasks[done:])
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
