"""``pool.parallel_map`` and what happens to its workers when ``prepare`` is stopped.

The signal test starts a real ``fseg prepare`` in a subprocess with two decoding workers whose
samples decode slowly (the real ``load_sample`` behind a 0.2 s sleep, so the pool is still busy
when the signal comes), waits until both workers run, sends a plain ``kill`` (SIGTERM) and checks
that the command exits as SIGTERM asks and no worker is left once it is gone (~5 s: a Python
that imports torch). ``test_data_cache`` does the same with SIGKILL in the middle of a prepare.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from processes import children, survivors, wait_children

from functional_seg.data import make_synthetic_dataset
from functional_seg.data.pool import parallel_map

ROOT = Path(__file__).resolve().parents[1]

SLOW_CLI = """
import sys, time
import functional_seg.data.cache as cache
real = cache.load_sample
def slow(task):
    time.sleep(0.2)
    return real(task)
cache.load_sample = slow
from functional_seg.cli import main
sys.exit(main(["prepare", "--data", sys.argv[1], "--split", "trainval", "--size", "16", "--workers", "2",
               "--cache-dir", sys.argv[2]]))
"""


def _square(x: int) -> int:
    return x * x


def test_parallel_map_keeps_order_through_a_bounded_window():
    tasks = list(range(40))
    assert list(parallel_map(_square, tasks, 2, chunksize=3, in_flight=2)) == [x * x for x in tasks]
    assert list(parallel_map(_square, tasks[:5], 2)) == [x * x for x in tasks[:5]]  # few tasks: serial


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_closing_the_map_early_stops_its_workers():
    results = parallel_map(_square, list(range(64)), 2, chunksize=1, in_flight=2)
    assert next(results) == 0
    workers = children(os.getpid())
    assert len(workers) == 2
    results.close()
    assert survivors(workers) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_to_fseg_prepare_leaves_no_worker(tmp_path):
    pets = make_synthetic_dataset(tmp_path / "pets", n_trainval=24, n_test=2, size=24)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, str(pets), str(tmp_path / "cache")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers = wait_children(proc, 2)
        assert len(workers) == 2, proc.communicate()[1][-2000:] if proc.poll() is not None else "no workers"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)  # generous: a loaded 2-core machine exits a torch process slowly
        assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, (proc.returncode, err[-2000:])
        assert survivors(workers) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
