"""vmap ensemble: K small SegNets trained in one vmapped step against K sequential calls of the single step.

Command (GPU, ~40 s eager; --compile adds ~1-2 min):  python -m benchmarks.bench_ensemble
Command (CPU, ~1 min):                                python -m benchmarks.bench_ensemble --quick

K = 8 members of SegNet with widths (16, 32, 64, 64) (quick: (8, 16, 16, 16)), each with its
own init and train key, all seeing the same batch. Both sides are the library's steps as ``fseg
train`` builds them (``_rows.library_steps``: flip + jitter inside the step, CE, Adam lr 1e-3, the
runtime's precision and layout: bf16 and channels-last on CUDA) with the same compile setting;
"sequential" calls the single step K times per ensemble step, "vmapped" calls the ensemble step
(``FitConfig(ensemble=K)``: the members vmapped inside the one step)
once on the stacked states. Time per ensemble step after
warm-up, and the speed-up sequential / vmapped (target on a GPU: >= 3x; on CPU: >= 1x).

Writes ``<out>/bench_ensemble_<device-kind>.{json,md}``.
"""

from __future__ import annotations

import sys
import time

import torch

from experiments import harness as C

EXPERIMENT = "bench_ensemble"
WIDTHS = (16, 32, 64, 64)
QUICK_WIDTHS = (8, 16, 16, 16)


def parse_args(argv=None):
    p = C.base_parser(__doc__.split("\n")[0], epochs=1, size=128, batch_size=64)
    p.add_argument("--members", "-k", type=int, default=8)
    p.add_argument("--model", default="segnet")
    p.add_argument("--widths", default=None, help=f"encoder widths (default {WIDTHS}; quick {QUICK_WIDTHS})")
    p.add_argument("--steps", type=int, default=None, help="timed ensemble steps (default 20; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up ensemble steps (default 2; quick 1)")
    p.add_argument("--compile", choices=("none", "also", "only"), default="none",
                   help="eager only, eager and compiled, or compiled only")
    args = C.finish_args(p.parse_args(argv), quick_batch=8)
    widths = args.widths.split(",") if args.widths else (QUICK_WIDTHS if args.quick else WIDTHS)
    args.widths = tuple(int(w) for w in widths)
    if args.steps is None:
        args.steps = 2 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    return args


def build(args, data, *, compile: bool):
    """The library's single step and its K-member ensemble step (``FitConfig(ensemble=K)``, as
    ``fseg train --ensemble K`` runs it), K single states from ``split(key, K)`` and the stacked state.

    Returns (single step, ensemble step, single states, stacked state, whether the single states
    stacked equal the ensemble's own init).
    """
    from benchmarks import _rows as R
    from functional_seg.core import random as jr
    from functional_seg.core.tree import stack
    from functional_seg.models import create_model

    model = create_model(args.model, widths=args.widths)
    common = {"size": args.size, "compile": compile, "augment": "flip_jitter", "data": data}
    single = R.library_steps(model, args.device, **common)
    ensemble = R.library_steps(model, args.device, ensemble=args.members, **common)
    key = jr.key(args.seed)
    singles = [single.init(k) for k in jr.split(key, args.members)]
    stacked = ensemble.init(key)
    same = all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(stacked.params),
                                                   torch.utils._pytree.tree_leaves(stack(singles).params)))
    return single.steps.train_step, ensemble.steps.train_step, singles, stacked, same


def time_pair(args, data, *, compile: bool) -> dict:
    device = args.device
    single, vmapped, singles, stacked, same_init = build(args, data, compile=compile)
    batches = _batches(args, data)

    def seq_step(batch):
        for i in range(len(singles)):
            singles[i], _ = single(singles[i], batch)

    holder = [stacked]

    def vmap_step(batch):
        holder[0], _ = vmapped(holder[0], batch)

    out = {"compiled": compile, "init_matches_init_ensemble": same_init}
    for name, fn in (("sequential", seq_step), ("vmapped", vmap_step)):
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            fn(next(batches))
        C.sync(device)
        out[f"{name}_warmup_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn(next(batches))
        C.sync(device)
        dt = (time.perf_counter() - t0) / args.steps
        out[f"{name}_ms"] = dt * 1e3
        out[f"{name}_images_per_s"] = args.members * args.batch_size / dt
        print(f"  {'compiled' if compile else 'eager'} {name}: {dt * 1e3:.1f} ms per ensemble step "
              f"(warm-up {out[f'{name}_warmup_s']:.1f} s)", flush=True)
    out["speedup"] = out["sequential_ms"] / out["vmapped_ms"]
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _batches(args, data):
    from functional_seg.core import random as jr
    from functional_seg.data import Loader

    loader = Loader(data, args.batch_size, device=args.device, shuffle=True, drop_last=True,
                    resident=args.device.type == "cuda")
    epoch = 0
    while True:
        yield from loader.epoch(jr.fold_in(jr.key(args.seed + 1), epoch))
        epoch += 1


def _runtime_note(device) -> str:
    from functional_seg.runtime import resolve_runtime

    rt = resolve_runtime(device)
    return f"{rt.precision}{', channels-last' if rt.channels_last else ''}"


COLUMNS = [("mode", "mode"), ("sequential_ms", "K sequential steps, ms"), ("vmapped_ms", "one vmapped step, ms"),
           ("speedup", "speed-up"), ("vmapped_images_per_s", "vmapped images/s (all members)"),
           ("sequential_warmup_s", "seq warm-up s"), ("vmapped_warmup_s", "vmap warm-up s")]


def render(args, prov, results, target) -> tuple[dict, str]:
    rows = [{"mode": k, **v} for k, v in results.items()]
    md = C.md_header(
        f"vmap ensemble: K = {args.members} {args.model} {args.widths} at {args.size}x{args.size}, "
        f"batch {args.batch_size}", prov,
        notes=[f"{args.warmup} warm-up + {args.steps} timed ensemble steps; every member sees the same batch; "
               "CE, Adam, flip + jitter inside the step; the library's steps as fseg train builds them "
               f"(runtime: {_runtime_note(args.device)})",
               f"target speed-up: >= {target}x"],
    )
    md += "\n" + C.md_table(rows, COLUMNS) + "\n"
    for k, v in results.items():
        if "speedup" in v:
            verdict = "met" if v["speedup"] >= target else "MISSED"
            md += f"\n{k}: speed-up {v['speedup']:.2f}x (target >= {target}: {verdict})"
    md += "\n"
    return C.payload(EXPERIMENT, prov, args, results, target=target), md


def main(argv=None) -> int:
    args = parse_args(argv)
    budget, prov, stem = C.start(args, EXPERIMENT, f", K={args.members}, widths {args.widths}")
    target = 3.0 if args.device.type == "cuda" else 1.0
    train, _ = C.load_splits(args.data, args.size, test_split=None, train_limit=args.train_limit)
    modes = {"none": [False], "also": [False, True], "only": [True]}[args.compile]
    results: dict[str, dict] = {}
    for compile in modes:
        name = "compiled" if compile else "eager"
        if budget.over(reserve=10):
            results[name] = {"status": "skipped: time budget"}
            continue
        results[name] = C.guarded(name, lambda compile=compile: time_pair(args, train, compile=compile))
        if "speedup" in results[name]:
            print(f"  {name}: speed-up {results[name]['speedup']:.2f}x (target >= {target})", flush=True)
        C.write_results(args.out, stem, *render(args, prov, results, target))
    C.write_results(args.out, stem, *render(args, prov, results, target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
