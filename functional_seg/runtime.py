"""Where and how a computation runs: device, precision, memory layout. Decided here only.

Every entry point (``fit``, ``fseg eval``/``predict``/``export``, the experiments and
benchmarks) resolves these settings through this module, so "auto" means the same everywhere:

    device        "auto" -> cuda if available, else cpu
    precision     "auto" -> bf16 autocast on CUDA, fp32 elsewhere
    channels_last None   -> on for CUDA (cuDNN's fast conv layout), off elsewhere
    compile       "auto" -> on for CUDA, off elsewhere: on the CPU a cold inductor build of the train
                  and eval steps takes 70-85 s and needs a C++ compiler, and at the series' SegNet
                  widths the compiled step is no faster than eager (convolutions dominate); at small
                  widths it is 2x faster but needs ~3,400 steps cold (~300 warm) to pay back
                  (``benchmarks/bench_compile_cache.py``). ``--compile on`` is there for long runs.
    CPU memory    ``reuse_freed_cpu_memory()``: freed blocks stay in the process for the next step
    host memory   ``host_memory_available()``: MemAvailable, capped by the process's cgroup limit
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import sys
from dataclasses import dataclass

import torch

from .options import PRECISIONS

__all__ = ["PRECISIONS", "Runtime", "resolve_runtime", "resolve_device", "resolve_precision", "resolve_channels_last",
           "resolve_compile",
           "autocast", "reuse_freed_cpu_memory", "host_memory_available"]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; other names are checked (ValueError naming them)."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but CUDA is not available here")
    return device


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"auto" -> "bf16" on CUDA, "fp32" elsewhere; other values are checked and returned."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected auto, {', '.join(PRECISIONS)}")
    return precision


def resolve_channels_last(channels_last: bool | None, device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" if channels_last is None else bool(channels_last)


def resolve_compile(compile: bool | str, device: torch.device | str) -> bool:
    if compile == "auto":
        return torch.device(device).type == "cuda"
    return bool(compile)


@dataclass(frozen=True)
class Runtime:
    """Where and how a computation runs, every "auto" resolved: what ``fit``, ``fseg eval``,
    ``predict`` and the benchmarks run under."""

    device: torch.device
    precision: str
    channels_last: bool
    compile: bool

    def autocast(self):
        return autocast(self.precision, self.device.type)


def resolve_runtime(device: str | torch.device = "auto", precision: str = "auto", compile: bool | str = "auto",
                    channels_last: bool | None = None) -> Runtime:
    """Resolve every setting as the module docstring says; on the CPU, also keep freed memory in the
    process for the next step (:func:`reuse_freed_cpu_memory`).

    Raises:
        ValueError: an unknown device or precision, or CUDA asked for where there is none.
    """
    resolved = resolve_device(device)
    if resolved.type == "cpu":
        reuse_freed_cpu_memory()
    return Runtime(resolved, resolve_precision(precision, resolved), resolve_channels_last(channels_last, resolved),
                   resolve_compile(compile, resolved))


def autocast(precision: str, device_type: str):
    """bf16 autocast for "bf16", a no-op for "fp32" (``precision`` already resolved)."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_ALLOCATOR_CHOICES = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD")
_reused = False


def reuse_freed_cpu_memory() -> bool:
    """Keep freed CPU memory in the process for the next training step, instead of unmapping it.

    Why: glibc's malloc serves every block above its mmap threshold (at most 32 MiB, often less)
    with a fresh ``mmap`` and returns it to the kernel on ``free``, so an eager step on the CPU
    page-faults its whole activation footprint again on every step: about 250,000 faults (1 GB of
    zeroed pages) and a quarter of the step time for SegNet at batch 32, 64 px, in this library and
    in a plain ``nn.Module`` alike (``python -m benchmarks.bench_eager_step --malloc system``).
    With mmap off and trimming off, freed blocks stay in the heap and the next step reuses them.
    The cost: the process keeps its peak memory until it exits, which a training or inference
    loop reaches on every batch anyway; small allocations between the large blocks can split the
    kept heap, so it may settle somewhat above one step's peak (four 32 MiB blocks a round settle
    at 1.25-2.75 times their bytes in ``tests/test_runtime.py``, glibc's own counters).

    Process-wide and idempotent. Does nothing (returns False) where malloc is not glibc's (macOS,
    Windows, musl), or where the user already chose: any ``MALLOC_*`` variable,
    ``GLIBC_TUNABLES`` or ``LD_PRELOAD`` (jemalloc, tcmalloc) in the environment; setting
    ``MALLOC_MMAP_MAX_=65536`` keeps glibc's default behaviour.

    Returns:
        True if this call or an earlier one set glibc to keep freed memory.
    """
    global _reused
    if _reused:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if any(name.startswith(_ALLOCATOR_CHOICES) for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        # -1: never trim (mallopt(3)); with mmap off alone, a shrinking heap would fault instead
        _reused = bool(libc.mallopt(_M_TRIM_THRESHOLD, -1) and libc.mallopt(_M_MMAP_MAX, 0))
    except (OSError, AttributeError):
        return False
    return _reused


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (cgroup v2: no limit) reads as None


def _cgroup_headroom() -> int | None:
    """Bytes this process's memory cgroup may still charge (limit - usage + its inactive file pages,
    which the kernel reclaims before it fails an allocation), or None without a limit.

    cgroup v2 (``memory.max``) and v1 (``memory.limit_in_bytes``, whose "no limit" is a huge number).
    """
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # v2: the one unified hierarchy
            base, names = f"/sys/fs/cgroup{rel}", ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, names = (f"/sys/fs/cgroup/memory{rel}",
                           ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))
        else:
            continue
        limit = _read_int(f"{base}/{names[0]}")
        if limit is None or limit >= 1 << 60:
            continue
        usage = _read_int(f"{base}/{names[1]}") or 0
        inactive = 0
        try:
            with open(f"{base}/memory.stat") as f:
                for stat in f:
                    key, _, value = stat.partition(" ")
                    if key == names[2]:
                        inactive = int(value)
        except (OSError, ValueError):
            pass
        return max(limit - usage + inactive, 0)
    return None


def host_memory_available() -> int | None:
    """Bytes of host memory this process can still use, or None where that is not known.

    ``MemAvailable`` from /proc/meminfo (else free pages x page size), capped by what the process's
    memory cgroup still allows: in a container or a job slot the machine's free memory is not the
    process's. The one CPU answer behind ``summary.available_memory`` and the prepared data's
    choice between holding a split in memory and mapping its shards.
    """
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = None
    headroom = _cgroup_headroom()
    if headroom is None:
        return available
    return headroom if available is None else min(available, headroom)
