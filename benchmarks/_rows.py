"""What the benchmarks share: the library's row built as ``fseg train`` builds it, the ``nn.Module``
step it is compared with, and the fixed-batch rows of the memory, eager-step and compile benchmarks.

The library's side of every benchmark comes from :func:`library_steps`: ``resolve_runtime`` (device,
precision, channels-last, compile, exactly as ``fit`` resolves them), ``preprocess_for`` and
``build_steps`` over a ``FitConfig``. No benchmark decides bf16 or channels-last itself; the
``nn.Module`` rows take both from a ``Runtime`` too (:func:`module_step`).

The fixed-batch rows (``build``) run the same architecture (the registry model and its ``nn.Module``
twin from ``benchmarks/reference_modules.py``), cross-entropy, Adam lr 1e-3, on one uint8 batch
already on the device, no augmentation and no data loader: they isolate the step itself. On CUDA
every row runs the runtime's bf16 autocast and channels-last layout (the same for all four).

  a   the library's step, compiled (inductor)
  a'  the library's step, eager (what ``fseg train`` runs on the CPU by default)
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

ROWS = ("a", "a_eager", "b", "c")
LABELS = {
    "a": "a: library, compiled (inductor)",
    "a_eager": "a': library, eager",
    "b": "b: nn.Module + torch.optim.Adam, eager",
    "c": "c: torch.compile(module) + Adam(fused)",
}


# ----------------------------------------------------------------------------------------------
# The library's row: what fit builds


@dataclass(frozen=True)
class DataShape:
    """What ``preprocess_for`` reads of a dataset, for rows that train on a synthetic fixed batch."""

    size: int
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class LibraryRow:
    """The library's side of a benchmark, as ``fit`` builds it: the model, the resolved ``Runtime``,
    the ``Preprocess`` contract, the ``FitConfig`` and its ``Steps`` (``train_step``, ``eval_step``)."""

    model: Any
    runtime: Any
    preprocess: Any
    config: Any
    steps: Any

    def init(self, key: torch.Tensor):
        """A fresh ``TrainState`` on the runtime's device from ``key`` (int64 [2]): K stacked members
        (member i from ``split(key, K)[i]``) when the config is an ensemble, else one."""
        from functional_seg.train import init_ensemble, init_train_state

        optimizer, device = self.steps.optimizer, self.runtime.device
        if self.config.members:
            return init_ensemble(self.model, optimizer, key, self.config.members, device=device)
        return init_train_state(self.model, optimizer, key, device=device)


def library_steps(model, device: torch.device | str, *, size: int, compile: bool, augment: str = "none",
                  data=None, world=None, backend: str = "inductor", **fit_config_fields) -> LibraryRow:
    """The train and eval steps ``fseg train`` would run for ``model`` on ``device``.

    Args:
        model: a registry ``Model`` (``create_model(...)``).
        device: where the steps run; precision and channels-last follow it ("auto", as in ``fit``).
        size: the image side S of the batches (the contract's size).
        compile: ``torch.compile`` the steps with ``backend`` ("aot_eager": the same capture without
            code generation, for a quick CPU run of a benchmark).
        augment: the augmentation preset inside the step ("none": the step alone).
        data: the ``PreparedData`` the rows train on (its class names, policy and layout enter the
            contract); None for a synthetic batch of ``model.num_classes`` classes.
        world: a ``distributed.World`` (bench_distributed), else one process.
        **fit_config_fields: any other ``FitConfig`` field (``ensemble=8``, ``optimizer=...``);
            the defaults are ``fseg train``'s: CE, Adam lr 1e-3, constant schedule.

    Returns:
        a :class:`LibraryRow`; ``row.init(key)`` makes its train state.
    """
    from functional_seg.train import FitConfig, build_steps
    from functional_seg.train.distributed import SINGLE

    config = FitConfig(device=str(device), compile=bool(compile), augment=augment, **fit_config_fields)
    runtime, pre = contract(model, config, size=size, data=data)
    steps = build_steps(model, pre, config, runtime, world=world or SINGLE, backend=backend)
    return LibraryRow(model, runtime, pre, config, steps)


def contract(model, config, *, size: int, data=None):
    """``(Runtime, Preprocess)`` as ``fit`` resolves them for ``config`` (a ``FitConfig``: device,
    precision, compile, channels-last) and the data (None: a synthetic one of ``model.num_classes``
    classes at ``size`` px)."""
    from functional_seg.runtime import resolve_runtime
    from functional_seg.train import preprocess_for

    runtime = resolve_runtime(config.device, config.precision, config.compile, config.channels_last)
    if data is None:
        data = DataShape(size, tuple(f"class_{i}" for i in range(model.num_classes)))
    elif data.size != size:
        raise ValueError(f"size {size} but the data is prepared at {data.size} px")
    return runtime, preprocess_for(model, data, runtime)


# ----------------------------------------------------------------------------------------------
# The nn.Module rows


def module_step(module: torch.nn.Module, opt: torch.optim.Optimizer, runtime) -> Callable:
    """``step(x float [B, 3, S, S], masks int64 [B, S, S]) -> loss``, the stateful step as the
    articles write it: forward under the runtime's autocast, CE in fp32, zero_grad, backward,
    ``opt.step()``. ``x`` is already normalised (and in the runtime's layout)."""

    def step(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        with runtime.autocast():
            logits = module(x)
        loss = F.cross_entropy(logits.float(), masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def reference_module(model_name: str, model, runtime, seed: int = 0) -> torch.nn.Module:
    """The ``nn.Module`` twin of the registry ``model`` on the runtime's device and layout, in train mode."""
    from .reference_modules import build_reference

    torch.manual_seed(seed)
    module = build_reference(model_name, model.cfg).to(runtime.device).train()
    return module.to(memory_format=torch.channels_last) if runtime.channels_last else module


# ----------------------------------------------------------------------------------------------
# The fixed-batch rows (bench_memory, bench_eager_step)


def rss_mb(field: str) -> float:
    """A memory field of this process (``VmRSS``, ``VmHWM``, ...) from /proc/self/status, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


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


def build(row: str, *, model: str, cfg: dict, device: torch.device, data, seed: int = 0) -> Callable[[], Any]:
    """``step()`` for ``row`` (one of ROWS) over the fixed batch ``data`` = (images uint8 [B, 3, S, S],
    masks int64 [B, S, S]); each call runs one training step and returns its loss (0-d tensor)."""
    from functional_seg.core import random as jr
    from functional_seg.models import create_model

    if row not in ROWS:
        raise ValueError(f"unknown row {row!r}; expected one of {', '.join(ROWS)}")
    images, masks = data
    m = create_model(model, **cfg)
    lib = library_steps(m, device, size=images.shape[-1], compile=row == "a")
    if row in ("a", "a_eager"):
        train_step, holder = lib.steps.train_step, [lib.init(jr.key(seed))]

        def step():
            holder[0], metrics = train_step(holder[0], (images, masks))
            return metrics["loss"]

        return step
    # b and c run under the library row's runtime: the same precision and layout as a
    module = reference_module(model, m, lib.runtime, seed)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, fused=row == "c")
    update = module_step(module if row == "b" else torch.compile(module), opt, lib.runtime)
    return lambda: update(lib.preprocess.model_input(images), masks)


def write_report(args, prov: dict, stem: str, experiment: str, title: str, results: dict, columns, notes=(),
                 labels: dict | None = None, setting: str | None = None):
    """The row benchmarks' output: ``results`` ({row: figures}) as one table under ``labels`` (default
    ``LABELS``), headed by the rows' common ``setting`` (default: these rows'), written as
    ``<stem>.{json,md}`` and printed."""
    from experiments import harness as C

    table = [{"row": (labels or LABELS)[row], **r} for row, r in results.items()]
    setting = setting or (f"model cfg: {model_cfg(args.widths) or 'series widths'}; CE; Adam lr 1e-3; one fixed "
                          "batch, no augmentation; the library's rows from build_steps (fseg train's step)")
    md = C.md_header(f"{title}: {args.model} at {args.size}x{args.size}, batch {args.batch_size}", prov,
                     notes=[setting, *notes])
    md += "\n" + C.md_table(table, [("row", "row"), *columns]) + "\n"
    C.write_results(args.out, stem, C.payload(experiment, prov, args, results), md)
    print(md)
