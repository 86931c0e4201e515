"""The cost of the data-parallel train step: plain step vs the step with its collectives, flat bucket vs per leaf.

Run under torchrun (one process per device; gloo on CPU, NCCL on CUDA):

    torchrun --standalone --nproc_per_node=1 -m benchmarks.bench_distributed --device cpu
    torchrun --standalone --nproc_per_node=2 -m benchmarks.bench_distributed --device cpu
    torchrun --standalone --nproc_per_node=1 -m benchmarks.bench_distributed --device cuda --widths 64,128,256,512 \\
        --batch-size 64 --size 128 --compile

Rows (median ms per step over --steps after --warmup, the same per-rank batch each step; every row
is the step ``fseg train`` builds, ``_rows.library_steps``, flip augmentation inside, CE, Adam):

  plain     the library's step with no world (what a single process runs: no collective at all)
  flat      the distributed step, gradients + BN statistics in one flat all-reduce per dtype
  per-leaf  the distributed step, one all-reduce per tensor

With ``--nproc_per_node=1`` the collectives are forced on (a world of one), so ``flat - plain``
is what the distributed machinery itself costs on one device. Rank 0 prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from benchmarks._rows import library_steps
from functional_seg.core import random as jr
from functional_seg.core.tree import tree_bytes
from functional_seg.models import create_model
from functional_seg.train.distributed import World, world_from_env


class _Forced(World):
    """A world whose collectives run even with one process (to time them at world size 1)."""

    @property
    def distributed(self) -> bool:
        return True


def _time(step, ts, batch, warmup: int, steps: int, device) -> float:
    for _ in range(warmup):
        ts, _ = step(ts, batch)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ts, m = step(ts, batch)
        m["loss"].item()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--widths", default="8,16", help="SegNet widths")
    ap.add_argument("--batch-size", type=int, default=8, help="per-process batch")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    if "WORLD_SIZE" not in os.environ:
        sys.exit("run under torchrun (see the module docstring)")
    env_world = world_from_env(args.device)
    if int(os.environ["WORLD_SIZE"]) == 1:  # world_from_env does not join a group for one process
        import torch.distributed as dist

        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    base = World(rank=env_world.rank, size=max(env_world.size, 1), local_rank=env_world.local_rank)
    device = base.device(args.device)
    widths = tuple(int(w) for w in args.widths.split(","))
    model = create_model("segnet", widths=widths, convs_per_stage=(1,) * len(widths))
    g = torch.Generator().manual_seed(base.rank)
    batch = (torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), dtype=torch.uint8,
                           generator=g).to(device),
             torch.randint(0, 3, (args.batch_size, args.size, args.size), generator=g).to(device))
    ts = None
    cls = _Forced if base.size == 1 else World
    rows = {}
    for name, world in (("plain", None), ("flat", cls(base.rank, base.size, base.local_rank, bucket=True)),
                        ("per-leaf", cls(base.rank, base.size, base.local_rank, bucket=False))):
        if name == "plain" and base.size > 1:
            world = None  # each rank alone: the per-device compute without any communication
        lib = library_steps(model, device, size=args.size, compile=args.compile, augment="flip", world=world)
        ts = lib.init(jr.key(0)) if ts is None else ts  # every row starts from the same state
        step = lib.steps.train_step
        rows[name] = round(_time(step, ts, batch, args.warmup, args.steps, device), 3)
    if base.is_main:
        leaves = len(torch.utils._pytree.tree_leaves(ts.params))
        print(json.dumps({"world_size": base.size, "device": str(device), "widths": widths,
                          "batch_per_rank": args.batch_size, "size": args.size, "compile": args.compile,
                          "param_tensors": leaves, "grad_mb": round(tree_bytes(ts.params) / 1e6, 3),
                          "median_ms": rows,
                          "overhead_flat_vs_plain_ms": round(rows["flat"] - rows["plain"], 3)}))


if __name__ == "__main__":
    main()
