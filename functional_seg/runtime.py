"""Where and how a computation runs: device, precision, memory layout. Decided here only.

Every entry point (``fit``, ``fseg eval``/``predict``/``export``, the experiments and
benchmarks) resolves these settings through this module, so "auto" means the same everywhere:

    device        "auto" -> cuda if available, else cpu
    precision     "auto" -> bf16 autocast on CUDA, fp32 elsewhere
    channels_last None   -> on for CUDA (cuDNN's fast conv layout), off elsewhere
    compile       "auto" -> on for CUDA, off elsewhere
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "resolve_device", "resolve_precision", "resolve_channels_last", "resolve_compile",
           "autocast"]

PRECISIONS = ("fp32", "bf16")


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


def autocast(precision: str, device_type: str):
    """bf16 autocast for "bf16", a no-op for "fp32" (``precision`` already resolved)."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
