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

# Rounds of four 32 MiB products of one tensor, each round freed before the next, like a step's
# activations. glibc's own counters (mallinfo2, glibc >= 2.33) say where the blocks come from: bytes
# in mmapped blocks (returned to the kernel on free, faulted in again next round) or in the heap
# (kept on free, served again). Prints "<set> <most mmapped bytes while held> <heap growth after
# each round, bytes>...".
_ROUNDS = """
import ctypes, sys, torch
from functional_seg.runtime import reuse_freed_cpu_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
torch.set_num_threads(1)
done = reuse_freed_cpu_memory() if sys.argv[1] == "reuse" else None
x = torch.ones(8 << 20)
start = libc.mallinfo2()
mmapped, heap = 0, []
for _ in range(32):
    ys = [x * i for i in range(4)]
    mmapped = max(mmapped, libc.mallinfo2().hblkhd - start.hblkhd)
    del ys
    heap.append(libc.mallinfo2().arena - start.arena)
print(done, mmapped, *heap)
"""
_ROUND_BYTES = 4 * (32 << 20)


def _rounds(mode: str, **env) -> tuple[str, int, list[int]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], env={**clean, **env}, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    return out[0], int(out[1]), [int(c) for c in out[2:]]


# mallinfo2 is glibc 2.33's (Debian 12, Ubuntu 22.04 and later); the running glibc's version, not
# the one the interpreter was built against (platform.libc_ver)
ON_GLIBC_233 = ON_GLIBC and tuple(map(int, os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2])) >= (2, 33)


@pytest.mark.skipif(not ON_GLIBC_233, reason="the setting is glibc's; its counters (mallinfo2) are 2.33's")
def test_freed_memory_stays_in_the_heap_and_serves_the_next_rounds():
    done, mmapped, heap = _rounds("system")
    # glibc's default: every 32 MiB block is a fresh mapping, unmapped again on free
    assert done == "None" and mmapped >= _ROUND_BYTES and max(heap) < _ROUND_BYTES // 8
    done, mmapped, heap = _rounds("reuse")
    assert done == "True" and mmapped == 0  # served from the heap ...
    assert heap[0] >= _ROUND_BYTES  # ... which keeps them on free, not trimmed
    # Small allocations between the blocks split the free heap now and then, so it grows by a block
    # on some rounds (seen over 200 rounds, under load too: 1.25 to 2.75 rounds' bytes in all, most
    # of it in the first rounds). Without reuse, 32 rounds would take 32 rounds' fresh bytes.
    assert heap == sorted(heap) and heap[-1] <= 4 * _ROUND_BYTES


@pytest.mark.skipif(not ON_GLIBC_233, reason="the setting is glibc's; its counters (mallinfo2) are 2.33's")
@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"},
                                 {"MALLOC_MMAP_MAX_": "65536"}])
def test_a_user_s_own_allocator_choice_is_left_alone(env):
    done, mmapped, _ = _rounds("reuse", **env)
    assert done == "False"
    if "MALLOC_MMAP_MAX_" in env:  # glibc's default kept on request: each block a fresh mapping
        assert mmapped >= _ROUND_BYTES


def test_auto_resolves_by_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_channels_last(None, "cpu") is False and resolve_channels_last(True, "cpu") is True
    assert resolve_compile("auto", "cpu") is False and resolve_compile(True, "cpu") is True
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu"):
        resolve_device("tpu")
