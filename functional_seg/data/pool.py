"""``parallel_map``: a function over many small tasks in a process pool, in order, with a bounded
number of results in flight, falling back to this process when a pool is not worth it or not
possible. Workers only run PIL and numpy.

Workers never outlive this process: each asks the kernel to kill it when its parent dies
(``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on Linux, checked against a parent that died before the
call), so a ``kill -9`` of ``prepare`` leaves no worker behind. A plain ``kill`` (SIGTERM) while the
pool runs is turned into ``PoolTerminated`` in the main thread, so the pool is shut down, the
shards already written stay (a later ``prepare`` resumes from them) and the process exits with
status 143, as if SIGTERM had killed it. Workers ignore SIGINT: Ctrl-C reaches the parent alone,
which stops them.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

__all__ = ["parallel_map", "cpu_count", "PoolTerminated"]

_SERIAL_BELOW = 16  # fewer tasks than this: a pool costs more than it saves
_PR_SET_PDEATHSIG = 1


class PoolTerminated(SystemExit):
    """SIGTERM reached the process while a pool ran: the pool is stopped and the process exits 143."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


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


def _die_with_parent(parent: int) -> None:
    """Worker initializer: be killed when the parent dies; leave Ctrl-C to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, inherited through fork
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl: nobody will signal us
        os._exit(1)


def _run_chunk(fn: Callable[[Any], Any], chunk: Sequence[Any]) -> list:
    return [fn(task) for task in chunk]


@contextlib.contextmanager
def _sigterm_stops_the_pool():
    """While the pool runs: SIGTERM raises ``PoolTerminated`` in the main thread (only if nobody
    else installed a handler, and only from the main thread, where Python delivers signals)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
            signal.SIG_DFL, None):
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills outright
        raise PoolTerminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parallel_map(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int, *, chunksize: int | None = None,
                 in_flight: int | None = None) -> Iterator[Any]:
    """``map(fn, tasks)`` in order over ``workers`` processes, or serially for few tasks or one
    worker; a pool that cannot start or breaks midway hands the rest to this process.

    Args:
        chunksize: tasks sent to a worker at once (default: up to 32, a quarter of a worker's share).
        in_flight: chunks submitted ahead of the one being consumed (default 2 per worker): with
            ``chunksize`` it bounds the results held in memory whatever the number of tasks.
    """
    if workers <= 1 or len(tasks) < _SERIAL_BELOW:
        yield from map(fn, tasks)
        return
    chunksize = chunksize or max(1, min(32, len(tasks) // (workers * 4)))
    in_flight = max(1, in_flight or 2 * workers)
    done = 0
    try:
        ex = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(), initializer=_die_with_parent,
                                 initargs=(os.getpid(),))
    except (OSError, NotImplementedError, ValueError) as e:
        warnings.warn(f"prepare: no process pool ({e}); decoding serially", RuntimeWarning, stacklevel=3)
        yield from map(fn, tasks)
        return
    pending: collections.deque = collections.deque()
    starts = iter(range(0, len(tasks), chunksize))

    def submit() -> None:
        start = next(starts, None)
        if start is not None:
            pending.append(ex.submit(_run_chunk, fn, tasks[start:start + chunksize]))

    clean = False
    try:
        with _sigterm_stops_the_pool():
            with warnings.catch_warnings():  # the workers fork during the first submits
                # Python >= 3.12 warns about fork in a threaded process; the workers never use torch.
                warnings.filterwarnings("ignore", message=r".*fork\(\).*", category=DeprecationWarning)
                for _ in range(in_flight):
                    submit()
            while pending:
                chunk = pending.popleft().result()
                submit()
                for r in chunk:
                    yield r
                    done += 1
        clean = True
    except (BrokenProcessPool, OSError) as e:
        warnings.warn(
            f"prepare: process pool failed ({e}); decoding the rest serially", RuntimeWarning, stacklevel=3
        )
        clean = True
        yield from map(fn, tasks[done:])
    finally:
        if not clean:
            # Stopped early (an exception, SIGTERM, the consumer closing the generator): nobody
            # wants the chunks being decoded, so the workers are stopped rather than waited for.
            for process in list((getattr(ex, "_processes", None) or {}).values()):
                with contextlib.suppress(OSError, AttributeError):
                    process.terminate()
        ex.shutdown(wait=clean, cancel_futures=True)
