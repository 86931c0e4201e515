"""Step time of the eager functional step against the nn.Module it replaces, interleaved in one process.

Command (CPU, ~2 min):  python -m benchmarks.bench_eager_step --threads 2 --batch-size 32
Command (CPU, quick):   python -m benchmarks.bench_eager_step --quick
Command (CPU, glibc's allocator instead of fseg's setting):  add --malloc system

Rows (``benchmarks/_rows.py``, one fixed uint8 batch on the device, no augmentation, CE, Adam
lr 1e-3): a' the library's step uncompiled (``_rows.library_steps``, what ``fseg train`` runs on
CPU) and b the series' ``nn.Module`` + ``torch.optim.Adam``. Both are built and warmed up, then
their steps alternate in ABBA order (a', b, b, a', a', b, ...) so that both see the same machine load and
neither always follows the other (the heap and caches one step leaves favour the next); the table gives
each row's median and the ratio a'/b of the medians (target on CPU: <= 1.0). Peak memory is
``bench_memory.py``'s job (it needs one process per row). Writes
``<out>/bench_eager_step_<device-kind>.{json,md}``.
"""

from __future__ import annotations

import statistics
import sys
import time

from benchmarks import _rows as R
from experiments import harness as C

EXPERIMENT = "bench_eager_step"
ROWS = ("a_eager", "b")


def parse_args(argv=None):
    p = C.base_parser(__doc__.split("\n")[0], epochs=1, size=64, batch_size=32)
    p.add_argument("--model", default="segnet")
    p.add_argument("--widths", default=None, help="encoder widths, e.g. 16,32,64,64 (default: the series')")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row, interleaved")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    R.add_malloc_option(p)
    args = C.finish_args(p.parse_args(argv), quick_batch=8)
    if args.quick and args.widths is None:
        args.widths = "8,16,32,32"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    C.set_threads(args)
    allocator = R.apply_malloc(args)
    budget, prov, stem = C.start(args, EXPERIMENT, f", batch {args.batch_size}, {args.size} px, model {args.model}")
    device = args.device
    data = R.batch(args.batch_size, args.size, 3, device, args.seed)
    steps = {row: R.build(row, model=args.model, cfg=R.model_cfg(args.widths), device=device, data=data,
                          seed=args.seed) for row in ROWS}
    for row in ROWS:
        for _ in range(args.warmup):
            steps[row]()
        C.sync(device)
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    for i in range(args.steps):
        for row in ROWS if i % 2 == 0 else ROWS[::-1]:  # ABBA: neither row always runs right after the other
            t0 = time.perf_counter()
            steps[row]()
            C.sync(device)
            times[row].append(time.perf_counter() - t0)
    medians = {row: statistics.median(t) for row, t in times.items()}
    results = {row: {"median_s": medians[row], "min_s": min(times[row]), "max_s": max(times[row]),
                     "ratio_to_b": medians[row] / medians["b"]} for row in ROWS}
    R.write_report(args, prov, stem, EXPERIMENT, "Eager step time", results,
                   [("median_s", "median step s"), ("ratio_to_b", "x b"), ("min_s", "min s"), ("max_s", "max s")],
                   notes=[f"{args.warmup} warm-up steps each, then {args.steps} steps per row, interleaved ABBA",
                          allocator])
    return 0


if __name__ == "__main__":
    sys.exit(main())
