"""The train-step rows that the memory, eager-step and compile benchmarks share, on one resident batch.

Every row runs the same architecture (the registry model and its ``nn.Module`` twin from
``benchmarks/reference_modules.py``), the same loss (cross-entropy), Adam lr 1e-3, and the same
uint8 batch already on the device, normalised by the same ``Preprocess.model_input``. No
augmentation and no data loader: these rows isolate the step itself.

  a   ``make_train_step(..., compile=True)`` (inductor)
  a'  ``make_train_step(..., compile=False)`` (what ``fseg train`` runs on CPU by default)
  b   the series' eager ``nn.Module`` + ``torch.optim.Adam`` (forward, CE, zero_grad, backward, step)
  c   ``torch.compile(module)`` + ``torch.optim.Adam(fused=True)``

``build(row, ...)`` returns ``step()``: one training step on the fixed batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROWS = ("a", "a_eager", "b", "c")
LABELS = {
    "a": "a: library, compiled (inductor)",
    "a_eager": "a': library, eager",
    "b": "b: nn.Module + torch.optim.Adam, eager",
    "c": "c: torch.compile(module) + Adam(fused)",
}


def add_malloc_option(parser) -> None:
    parser.add_argument("--malloc", choices=("reuse", "system"), default="reuse",
                        help="CPU: 'reuse' keeps freed memory in the heap as fseg does "
                             "(runtime.reuse_freed_cpu_memory); 'system' leaves glibc's default (default: reuse)")


def apply_malloc(args) -> str:
    """Set the CPU allocator as ``--malloc`` says, for every row alike; returns the table's note."""
    if args.device.type == "cpu" and args.malloc == "reuse":
        from functional_seg.runtime import reuse_freed_cpu_memory

        if not reuse_freed_cpu_memory():
            return ("CPU allocator: the system's (--malloc reuse declined: an allocator chosen in the "
                    "environment, or not glibc)")
    return malloc_note(args)


def malloc_note(args) -> str:
    if args.device.type != "cpu":
        return "allocator: the device's"
    if args.malloc == "reuse":
        return "CPU allocator: freed memory kept in the heap for reuse, as fseg does (--malloc reuse)"
    return "CPU allocator: glibc's default, large blocks mapped and unmapped every step (--malloc system)"


def run_row_process(module: str, argv: list[str], mark: str, env: dict | None = None) -> tuple[dict, float]:
    """Run ``python -m module *argv`` (one row in a fresh process); ``(its result, wall seconds)``.

    The child prints its result as one line ``mark + json``; a child that fails, or prints none,
    gives ``{"status": "failed (exit N after S s): <its last three lines>"}``.
    """
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(mark):
            return json.loads(line[len(mark):]), wall
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"status": f"failed (exit {proc.returncode} after {wall:.0f} s): {' / '.join(tail)}"}, wall


def model_cfg(widths: str | None) -> dict:
    return {"widths": tuple(int(w) for w in widths.split(","))} if widths else {}


def batch(batch_size: int, size: int, num_classes: int, device: torch.device, seed: int = 0):
    """uint8 images [B, 3, S, S] and int64 masks [B, S, S], drawn from a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, 3, size, size), generator=g, dtype=torch.uint8)
    masks = torch.randint(0, num_classes, (batch_size, size, size), generator=g)
    return images.to(device), masks.to(device)


def _preprocess(device: torch.device):
    from functional_seg.data.preprocess import Preprocess

    return Preprocess(precision="bf16" if device.type == "cuda" else "fp32", channels_last=device.type == "cuda")


def build(row: str, *, model: str, cfg: dict, device: torch.device, data, seed: int = 0):
    """``step()`` for ``row`` (one of ROWS) over the fixed batch ``data``."""
    pre = _preprocess(device)
    images, masks = data
    if row in ("a", "a_eager"):
        from functional_seg.core import random as jr
        from functional_seg.losses import get_loss
        from functional_seg.models import create_model
        from functional_seg.train import init_train_state, make_optimizer, make_train_step

        m = create_model(model, **cfg)
        optimizer = make_optimizer(name="adam", lr=1e-3)
        train_step = make_train_step(m, get_loss("ce"), optimizer, preprocess=pre, compile=row == "a")
        holder = [init_train_state(m, optimizer, jr.key(seed), device=device)]

        def step():
            holder[0], metrics = train_step(holder[0], (images, masks))
            return metrics["loss"]

        return step
    if row in ("b", "c"):
        from functional_seg.models import create_model

        from .reference_modules import build_reference

        torch.manual_seed(seed)
        module = build_reference(model, create_model(model, **cfg).cfg).to(device).train()
        if pre.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if row == "b":
            opt = torch.optim.Adam(module.parameters(), lr=1e-3)
            forward = module
        else:
            opt = torch.optim.Adam(module.parameters(), lr=1e-3, fused=True)
            forward = torch.compile(module)

        def step():
            x = pre.model_input(images)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=pre.precision == "bf16"):
                logits = forward(x)
            loss = F.cross_entropy(logits.float(), masks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        return step
    raise ValueError(f"unknown row {row!r}; expected one of {', '.join(ROWS)}")


def write_report(args, prov: dict, stem: str, experiment: str, title: str, results: dict, columns, notes=(),
                 labels: dict | None = None, setting: str | None = None):
    """The row benchmarks' output: ``results`` ({row: figures}) as one table under ``labels`` (default
    ``LABELS``), headed by the rows' common ``setting`` (default: these rows'), written as
    ``<stem>.{json,md}`` and printed."""
    from experiments import harness as C

    table = [{"row": (labels or LABELS)[row], **r} for row, r in results.items()]
    setting = setting or (f"model cfg: {model_cfg(args.widths) or 'series widths'}; CE; Adam lr 1e-3; one fixed "
                          "batch, no augmentation")
    md = C.md_header(f"{title}: {args.model} at {args.size}x{args.size}, batch {args.batch_size}", prov,
                     notes=[setting, *notes])
    md += "\n" + C.md_table(table, [("row", "row"), *columns]) + "\n"
    C.write_results(args.out, stem, C.payload(experiment, prov, args, results), md)
    print(md)
