"""Train-step time and peak memory of the lifted-encoder U-Net against the same model as a plain nn.Module.

Command (CPU, ~4 min):  python -m benchmarks.bench_pretrained_step --threads 2
Command (CPU, quick):   python -m benchmarks.bench_pretrained_step --threads 2 --quick

Command (GPU, issue 24):  python -m benchmarks.bench_pretrained_step --device cuda --rows a,c --skip-memory

Rows, same architecture and maths (``unet(encoder="efficientnet_lite0")``: timm's ``features_only``
EfficientNet-Lite0 and SMP's U-Net decoder, decoder channels 256..16), same initial weights, same
fixed uint8 batch normalised by the same ``Preprocess``, precision and layout from the same
``Runtime`` (bf16 autocast and channels-last on CUDA), CE, AdamW lr 1e-3, weight decay 1e-2:

  a   the library's step as ``fseg train`` builds it (``_rows.library_steps``: ``build_steps``),
      compiled (inductor); the encoder lifted with ``functional_call`` (``models.base.LiftedModule``)
  a'  the same, eager (it donates the old state, as ``fit``'s eager step does)
  b   ``benchmarks.reference_modules.EncoderUNet`` (the timm module + an nn.Module decoder) +
      ``torch.optim.AdamW`` (forward, CE, zero_grad, backward, step), eager
  c   ``torch.compile(EncoderUNet)`` + ``torch.optim.AdamW(fused=True)`` (fused on CUDA)

Time: both rows are built and warmed up in this process, then their steps alternate ABBA; the
table gives medians of wall time and of process CPU time (steadier on a shared machine) and
a'/b (target <= 1.05). Memory: each row then runs ``--mem-steps`` steps in
its own fresh process (``_rows.run_row_process``); CPU peak RSS above the post-import baseline
(VmHWM reset after the imports), CUDA ``max_memory_allocated`` (target a'/b <= 1.05). Writes
``<out>/bench_pretrained_step_<device-kind>.{json,md}``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

EXPERIMENT = "bench_pretrained_step"
MARK = "BENCH_PRETRAINED_RESULT "
ROWS = ("a", "a_eager", "b", "c")
LABELS = {"a": "a: library, lifted encoder, compiled + AdamW",
          "a_eager": "a': library, lifted encoder, eager + AdamW",
          "b": "b: nn.Module (timm encoder) + torch.optim.AdamW",
          "c": "c: torch.compile(nn.Module) + fused AdamW"}
LR, WEIGHT_DECAY = 1e-3, 1e-2


def parse_args(argv=None):
    from benchmarks import _rows as R
    from experiments import harness as C

    p = C.base_parser(__doc__.split("\n")[0], epochs=1, size=128, batch_size=16)
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="sgd: plain SGD without momentum (no optimizer state), to split the memory of the update")
    p.add_argument("--steps", type=int, default=12, help="timed steps per row, interleaved ABBA")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    p.add_argument("--mem-steps", type=int, default=3, help="steps per row in its own process (memory)")
    p.add_argument("--skip-memory", action="store_true", help="time only")
    p.add_argument("--rows", default=None, help="comma-separated rows (default: a_eager,b on the CPU, a,c on CUDA)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of rows a and c")
    p.add_argument("--child", default=None, help=_hidden())
    R.add_malloc_option(p)
    args = C.finish_args(p.parse_args(argv), quick_size=64, quick_batch=8)
    args.widths, args.model = None, "unet"  # read by write_report (its setting line is ours)
    default = ("a", "c") if args.device.type == "cuda" else ("a_eager", "b")
    args.rows = tuple(r.strip() for r in args.rows.split(",")) if args.rows else default
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {', '.join(unknown)}; expected some of {', '.join(ROWS)}")
    return args


def _hidden():
    import argparse

    return argparse.SUPPRESS


def build(row: str, args, data):
    """``step()`` for ``row`` on the fixed batch; every row starts from the library's init of key(seed)."""
    from benchmarks import _rows as R
    from benchmarks.reference_modules import build_reference, load_pure
    from functional_seg.core import random as jr
    from functional_seg.models import create_model
    from functional_seg.train import OptimizerConfig

    images, masks = data
    model = create_model("unet", encoder=args.encoder)
    opt_cfg = (OptimizerConfig(name="adamw", lr=LR, weight_decay=WEIGHT_DECAY) if args.optimizer == "adamw"
               else OptimizerConfig(name="sgd", lr=LR, momentum=0.0))
    lib = R.library_steps(model, args.device, size=args.size, compile=row == "a", optimizer=opt_cfg,
                          backend=args.backend)
    if row in ("a", "a_eager"):
        holder = [lib.init(jr.key(args.seed))]

        def step():
            holder[0], metrics = lib.steps.train_step(holder[0], (images, masks))
            return metrics["loss"]

        return step
    params, state = model.init(jr.key(args.seed))
    module = load_pure(build_reference("unet", model.cfg), params, state).to(args.device).train()
    if lib.runtime.channels_last:
        module = module.to(memory_format=torch.channels_last)
    fused = {"fused": True} if row == "c" and args.device.type == "cuda" else {}
    opt = (torch.optim.AdamW(module.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, **fused)
           if args.optimizer == "adamw" else torch.optim.SGD(module.parameters(), lr=LR, momentum=0.0))
    forward = torch.compile(module, backend=args.backend) if row == "c" else module
    module_step = R.module_step(forward, opt, lib.runtime)
    x = lib.preprocess.model_input(images)
    return lambda: module_step(x, masks)


def _times(args, data) -> dict:
    from experiments import harness as C

    rows = args.rows
    steps = {row: build(row, args, data) for row in rows}
    for row in rows:
        for _ in range(args.warmup):
            steps[row]()
        C.sync(args.device)
    times: dict[str, list[float]] = {row: [] for row in rows}
    cpu: dict[str, list[float]] = {row: [] for row in rows}
    for i in range(args.steps):
        for row in rows if i % 2 == 0 else rows[::-1]:  # ABBA: neither row always runs right after the other
            t0, c0 = time.perf_counter(), time.process_time()
            steps[row]()
            C.sync(args.device)
            times[row].append(time.perf_counter() - t0)
            cpu[row].append(time.process_time() - c0)
    medians = {row: statistics.median(t) for row, t in times.items()}
    cpu_medians = {row: statistics.median(t) for row, t in cpu.items()}
    # process CPU time: what the step computed, less sensitive than wall time to other jobs on a shared box
    ref = "b" if "b" in rows else rows[-1]  # the nn.Module row the library is compared with
    return {row: {"median_s": medians[row], "min_s": min(times[row]), "max_s": max(times[row]),
                  "time_x_ref": medians[row] / medians[ref], "cpu_s": cpu_medians[row],
                  "cpu_x_ref": cpu_medians[row] / cpu_medians[ref], "ref": ref} for row in rows}


def child(args) -> dict:
    """One row in this process: baseline after the imports, then build + steps, peak above it."""
    import functional_seg.train  # noqa: F401 - everything the rows import, before the baseline
    from benchmarks import _rows as R
    from benchmarks import reference_modules  # noqa: F401
    from experiments import harness as C

    C.set_threads(args)
    R.apply_malloc(args)
    create = __import__("functional_seg.models", fromlist=["create_model"]).create_model
    create("unet", encoder=args.encoder)  # timm imported and the encoder template built before the baseline
    cuda = args.device.type == "cuda"
    if cuda:
        torch.cuda.init()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
        base = R.rss_mb("VmRSS")
    data = R.batch(args.batch_size, args.size, 3, args.device, args.seed)
    step = build(args.child, args, data)
    for _ in range(args.mem_steps):
        loss = step()
        C.sync(args.device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else R.rss_mb("VmHWM")
    return {"peak_above_baseline_mb": peak - base, "loss": float(loss)}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        print(MARK + json.dumps(child(args)), flush=True)
        return 0
    from benchmarks import _rows as R
    from experiments import harness as C

    allocator = R.apply_malloc(args)
    _, prov, stem = C.start(args, EXPERIMENT, f", batch {args.batch_size}, {args.size} px, encoder {args.encoder}")
    data = R.batch(args.batch_size, args.size, 3, args.device, args.seed)
    results = _times(args, data)
    if not args.skip_memory:
        for row in args.rows:
            r, _ = R.run_row_process("benchmarks.bench_pretrained_step", [*argv, "--child", row], MARK)
            results[row]["peak_above_baseline_mb"] = r.get("peak_above_baseline_mb")
            results[row]["status"] = r.get("status", "ok")
        for r in results.values():
            ref = results[r["ref"]].get("peak_above_baseline_mb")
            if ref and r["peak_above_baseline_mb"] is not None:
                r["memory_x_ref"] = r["peak_above_baseline_mb"] / ref
    R.write_report(args, prov, stem, EXPERIMENT, f"Pretrained-encoder U-Net ({args.encoder}) train step", results,
                   [("median_s", "median step s"), ("time_x_ref", "time x ref"), ("cpu_s", "median CPU s"),
                    ("cpu_x_ref", "CPU x ref"), ("peak_above_baseline_mb", "peak MB"),
                    ("memory_x_ref", "memory x ref"), ("ref", "ref row"), ("min_s", "min s"), ("max_s", "max s")],
                   notes=["ref: b (nn.Module eager) when measured, else the last row (c); targets: a'/b <= 1.05 "
                          "(time and memory, CPU), a/c <= 1.0 (GPU, issue 24)",
                          f"{args.warmup} warm-up steps each, then {args.steps} steps per row interleaved ABBA; "
                          f"memory: {args.mem_steps} steps per row, each in its own process",
                          allocator],
                   labels=LABELS,
                   setting=f"unet(encoder={args.encoder!r}), decoder 256..16; CE; "
                           + (f"AdamW lr {LR}, weight decay {WEIGHT_DECAY}" if args.optimizer == "adamw"
                              else f"SGD lr {LR}, no momentum")
                           + "; the same init; one fixed batch, no augmentation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
