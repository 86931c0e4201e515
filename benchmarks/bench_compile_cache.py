"""Compile time of the train and eval steps, cold and warm, against the eager step: is compiling worth it here?

Command (CPU, ~6 min):   python -m benchmarks.bench_compile_cache --threads 2 --quick
Command (GPU, ~2 min):   python -m benchmarks.bench_compile_cache

Each row is a fresh process with its own inductor cache folder (``TORCHINDUCTOR_CACHE_DIR``), so
what a row finds warm is only what the row before it left there on purpose:

  eager          the library's steps (``_rows.library_steps``: ``build_steps``, what ``fseg train``
                 runs) uncompiled: what CPU runs by default
  cold           an empty cache folder: dynamo, AOTAutograd and inductor build everything; the
                 process then saves its artifacts (``compile_cache.save_artifacts``)
  warm (disk)    a new process on cold's folder: torch's FX-graph and AOTAutograd caches hit
  warm (file)    an empty folder again, pre-loaded from cold's saved file
                 (``compile_cache.load_artifacts``): a fresh machine carrying the file

In every row the train step and the eval step (``Steps.eval_step``) are built and called; "first
call" is the wall time of the first call of each (compilation included), "step" the median of
the next ``--steps`` train steps. The break-even column is how many train steps the compiled
step needs to win back its first-call overhead against eager: (first call - step) / (eager step
- compiled step); "never" where the compiled step is not faster. Writes
``<out>/bench_compile_cache_<device-kind>.{json,md}``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

EXPERIMENT = "bench_compile_cache"
MARK = "BENCH_COMPILE_CACHE_RESULT "
ROWS = ("eager", "cold", "warm_disk", "warm_file")
LABELS = {"eager": "eager (no compilation)", "cold": "cold: empty cache",
          "warm_disk": "warm: same cache folder, new process", "warm_file": "warm: empty folder + artifacts file"}


def parse_args(argv=None):
    import argparse

    from benchmarks import _rows as R
    from experiments import harness as C

    p = C.base_parser(__doc__.split("\n")[0], epochs=1, size=128, batch_size=32)
    p.add_argument("--model", default="segnet")
    p.add_argument("--widths", default=None, help="encoder widths, e.g. 16,32,64,64 (default: the series')")
    p.add_argument("--steps", type=int, default=10, help="timed train steps after the first call")
    p.add_argument("--rows", default=",".join(ROWS), help="comma separated, in order, from " + ",".join(ROWS))
    R.add_malloc_option(p)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--artifacts", default=None, help=argparse.SUPPRESS)
    args = C.finish_args(p.parse_args(argv), quick_batch=8)
    if args.quick and args.widths is None:
        args.widths = "8,16,32,32"
    return args


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def child(args) -> dict:
    """One row in this process (its cache folder is set by the parent)."""
    import torch

    from benchmarks import _rows as R
    from experiments import harness as C
    from functional_seg import compile_cache
    from functional_seg.core import random as jr
    from functional_seg.models import create_model

    C.set_threads(args)
    R.apply_malloc(args)
    device = args.device
    compiled = args.child != "eager"
    loaded = compile_cache.load_artifacts(args.artifacts) if args.child == "warm_file" else None
    model = create_model(args.model, **R.model_cfg(args.widths))
    lib = R.library_steps(model, device, size=args.size, compile=compiled)
    train_step, eval_step = lib.steps.train_step, lib.steps.eval_step
    ts = lib.init(jr.key(args.seed))
    batch = R.batch(args.batch_size, args.size, model.num_classes, device, args.seed)

    def one_step():
        nonlocal ts
        ts, metrics = train_step(ts, batch)
        C.sync(device)
        return metrics

    _, first_train = _timed(one_step)
    with torch.no_grad():
        _, first_eval = _timed(lambda: (eval_step(ts.params, ts.state, *batch), C.sync(device)))
    times = [_timed(one_step)[1] for _ in range(args.steps)]
    saved = compile_cache.save_artifacts(args.artifacts) if args.child == "cold" else None
    return {"first_train_s": first_train, "first_eval_s": first_eval, "step_s": statistics.median(times),
            "artifacts_mb": saved / 2**20 if saved is not None else None, "loaded": loaded}


def _break_even(r: dict, eager: dict) -> str:
    gain = eager["step_s"] - r["step_s"]
    overhead = r["first_train_s"] + r["first_eval_s"] - 2 * r["step_s"]
    return "never" if gain <= 0 else f"{max(overhead, 0.0) / gain:.0f}"


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
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fseg_compile_bench_") as tmp:
        artifacts = os.path.join(tmp, "artifacts.bin")
        folders = {"eager": "eager", "cold": "shared", "warm_disk": "shared", "warm_file": "fresh"}
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        if set(rows) - set(ROWS):
            raise SystemExit(f"--rows: unknown {sorted(set(rows) - set(ROWS))}; expected some of {', '.join(ROWS)}")
        for row in rows:
            if budget.over(reserve=30):
                results[row] = {"status": "skipped: time budget"}
                continue
            r, wall = R.run_row_process("benchmarks.bench_compile_cache",
                                        [*argv, "--child", row, "--artifacts", artifacts], MARK,
                                        env={"TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, folders[row])})
            results[row] = r if "status" in r else {**r, "process_s": wall}
            shown = (f"first train call {r['first_train_s']:.1f} s, step {r['step_s']:.3f} s" if "step_s" in r
                     else r["status"])
            print(f"  {LABELS[row]}: {shown}", flush=True)
    eager = results.get("eager", {})
    for row, r in results.items():
        if "step_s" in r and "step_s" in eager:
            r["x_eager_step"] = r["step_s"] / eager["step_s"]
            r["break_even_steps"] = _break_even(r, eager) if row != "eager" else "-"
    table = [{"row": LABELS[row], **r} for row, r in results.items()]
    md = C.md_header(f"Compile time, cold and warm: {args.model} at {args.size}x{args.size}, batch {args.batch_size}",
                     prov, notes=[f"model cfg: {R.model_cfg(args.widths) or 'series widths'}; CE; Adam lr 1e-3; "
                                  "one fixed batch, no augmentation; each row a fresh process",
                                  R.malloc_note(args)])
    md += "\n" + C.md_table(table, [("row", "row"), ("first_train_s", "first train call s"),
                                    ("first_eval_s", "first eval call s"), ("step_s", "train step s"),
                                    ("x_eager_step", "x eager step"), ("break_even_steps", "break-even steps"),
                                    ("process_s", "process s"), ("artifacts_mb", "artifacts MB"),
                                    ("status", "status")]) + "\n"
    C.write_results(args.out, stem, C.payload(EXPERIMENT, prov, args, results), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
