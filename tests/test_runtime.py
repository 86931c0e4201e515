"""runtime: the "auto" decisions, and the CPU allocator setting that keeps freed memory for the next step.

The allocator tests run in a fresh interpreter each: the setting is process-wide and one-way.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from functional_seg.runtime import resolve_channels_last, resolve_compile, resolve_device, resolve_precision

ON_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Four 32 MiB products of one tensor, freed, six rounds: glibc maps each one fresh (8,192 faults
# of a 4 KiB page apiece) unless freed blocks stay in the heap. Prints "<set> <faults per round>".
_ROUNDS = """
import resource, sys, torch
from functional_seg.runtime import reuse_freed_cpu_memory
torch.set_num_threads(1)
done = reuse_freed_cpu_memory() if sys.argv[1] == "reuse" else None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(8 << 20)
counts = []
for _ in range(8):
    f0 = faults()
    ys = [x * i for i in range(4)]
    del ys
    counts.append(faults() - f0)
print(done, *counts)
"""
_PAGES_PER_ROUND = 4 * (32 << 20) // 4096


def _rounds(mode: str, **env) -> tuple[str, list[int]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], env={**clean, **env}, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    return out[0], [int(c) for c in out[1:]]


@pytest.mark.skipif(not ON_GLIBC, reason="the setting is glibc's")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    done, system = _rounds("system")
    assert done == "None" and min(system) > _PAGES_PER_ROUND // 2  # glibc's default: every round faults
    done, reused = _rounds("reuse")
    assert done == "True"
    # steady state: the heap serves the blocks again. Not every round: under load glibc now and then
    # places one 32 MiB block fresh (one round in ten faults 8,192 pages), so the median and the sum.
    steady, baseline = reused[2:], system[2:]
    assert sorted(steady)[len(steady) // 2] < _PAGES_PER_ROUND // 20
    assert sum(steady) < sum(baseline) // 4


@pytest.mark.skipif(not ON_GLIBC, reason="the setting is glibc's")
@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"},
                                 {"MALLOC_MMAP_MAX_": "65536"}])
def test_a_user_s_own_allocator_choice_is_left_alone(env):
    done, counts = _rounds("reuse", **env)
    assert done == "False"
    if "MALLOC_MMAP_MAX_" in env:  # glibc's default kept on request: the faults stay
        assert min(counts) > _PAGES_PER_ROUND // 2


def test_auto_resolves_by_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_channels_last(None, "cpu") is False and resolve_channels_last(True, "cpu") is True
    assert resolve_compile("auto", "cpu") is False and resolve_compile(True, "cpu") is True
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu"):
        resolve_device("tpu")
