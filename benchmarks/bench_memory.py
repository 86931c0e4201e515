"""Peak memory of training steps: the library's functional step against the nn.Module baselines.

Command (CPU, ~3 min):   python -m benchmarks.bench_memory --threads 2 --rows a_eager,b,c
Command (GPU):           python -m benchmarks.bench_memory

Rows (``benchmarks/_rows.py``): (a) the compiled functional step, (a') the eager functional step,
(b) the series' eager ``nn.Module`` + ``torch.optim.Adam``, (c) ``torch.compile(module)`` +
``Adam(fused=True)``; same architecture, loss (CE), batch (one fixed uint8 batch on the device,
no augmentation) and Adam lr 1e-3.

Each row runs in its own subprocess, so no row sees another's allocator caches or compiled
code. The child imports everything, records its baseline, then builds the model, optimizer and
batch and runs ``--steps`` steps (the first one included: torch.optim.Adam allocates its moments
there, the functional Adam at init). Reported:

- CPU: peak RSS above the post-import baseline. The kernel's high-water mark (VmHWM) is reset
  after the imports (``/proc/self/clear_refs`` 5), so the peak covers the build and the steps only.
- CUDA: ``torch.cuda.max_memory_allocated`` above the post-import allocation (nothing), with the
  peak statistics reset after the imports.

The ratio column is each row's peak over b's. Writes
``<out>/bench_memory_<device-kind>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

EXPERIMENT = "bench_memory"
MARK = "BENCH_MEMORY_RESULT "


def parse_args(argv=None):
    from benchmarks import _rows as R
    from experiments import harness as C

    p = C.base_parser(__doc__.split("\n")[0], epochs=1, size=128, batch_size=32)
    p.add_argument("--model", default="segnet")
    p.add_argument("--widths", default=None, help="encoder widths, e.g. 16,32,64,64 (default: the series')")
    p.add_argument("--steps", type=int, default=3, help="steps per row (the first included)")
    p.add_argument("--rows", default=",".join(R.ROWS), help="comma separated, from " + ",".join(R.ROWS))
    R.add_malloc_option(p)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = C.finish_args(p.parse_args(argv), quick_batch=8)
    if args.quick and args.widths is None:
        args.widths = "8,16,32,32"
    return args


def child(args) -> dict:
    """One row in this process: baseline after the imports, then build + steps, peak above it."""
    import torch

    import functional_seg.train  # noqa: F401 - everything the rows import, before the baseline
    from benchmarks import _rows as R
    from benchmarks import reference_modules  # noqa: F401
    from experiments import harness as C

    C.set_threads(args)
    R.apply_malloc(args)
    device = args.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.init()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
        base = R.rss_mb("VmRSS")
    t0 = time.perf_counter()
    data = R.batch(args.batch_size, args.size, 3, device, args.seed)
    step = R.build(args.child, model=args.model, cfg=R.model_cfg(args.widths), device=device, data=data,
                   seed=args.seed)
    times = []
    for _ in range(args.steps):
        t1 = time.perf_counter()
        loss = step()
        C.sync(device)
        times.append(time.perf_counter() - t1)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else R.rss_mb("VmHWM")
    return {"baseline_mb": base, "peak_mb": peak, "peak_above_baseline_mb": peak - base,
            "first_step_s": times[0], "last_step_s": times[-1], "total_s": time.perf_counter() - t0,
            "loss": float(loss)}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        print(MARK + json.dumps(child(args)), flush=True)
        return 0
    from benchmarks import _rows as R
    from experiments import harness as C

    budget, prov, stem = C.start(args, EXPERIMENT, f", batch {args.batch_size}, {args.size} px, model {args.model} "
                                 f"{R.model_cfg(args.widths) or '(series widths)'}")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    results: dict[str, dict] = {}
    what = "max_memory_allocated" if args.device.type == "cuda" else "peak RSS"
    for row in rows:
        if budget.over(reserve=30):
            results[row] = {"status": "skipped: time budget"}
            continue
        results[row], _ = R.run_row_process("benchmarks.bench_memory", [*argv, "--child", row], MARK)
        r = results[row]
        shown = f"{r['peak_above_baseline_mb']:.0f} MB" if "peak_mb" in r else r["status"]
        print(f"  {R.LABELS[row]}: {shown}", flush=True)
    ref = results.get("b", {}).get("peak_above_baseline_mb")
    for r in results.values():
        if ref and "peak_above_baseline_mb" in r:
            r["ratio_to_b"] = r["peak_above_baseline_mb"] / ref
    R.write_report(args, prov, stem, EXPERIMENT, "Peak training-step memory", results,
                   [("peak_above_baseline_mb", "peak MB above baseline"), ("ratio_to_b", "x b"),
                    ("last_step_s", "last step s"), ("first_step_s", "first step s"), ("status", "status")],
                   notes=[f"{args.steps} steps per row, each row in its own process",
                          f"peak = {what} above the post-import baseline (build + steps)",
                          R.malloc_note(args)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
