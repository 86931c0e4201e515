"""Train-step time and peak memory of the lifted-encoder U-Net against the same model as a plain nn.Module.

Command (CPU, ~4 min):  python -m benchmarks.bench_pretrained_step --threads 2
Command (CPU, quick):   python -m benchmarks.bench_pretrained_step --threads 2 --quick

Rows, same architecture and maths (``unet(encoder="efficientnet_lite0")``: timm's ``features_only``
EfficientNet-Lite0 and SMP's U-Net decoder, decoder channels 256..16), same initial weights, same
fixed uint8 batch normalised by the same ``Preprocess``, CE, AdamW lr 1e-3, weight decay 1e-2:

  a'  the library: ``make_train_step(..., compile=False)`` + ``make_optimizer(name="adamw")``; the
      encoder lifted with ``functional_call`` (``models.base.LiftedModule``)
  b   ``benchmarks.reference_modules.EncoderUNet`` (the timm module + an nn.Module decoder) +
      ``torch.optim.AdamW`` (forward, CE, zero_grad, backward, step)

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
import torch.nn.functional as F

EXPERIMENT = "bench_pretrained_step"
MARK = "BENCH_PRETRAINED_RESULT "
ROWS = ("a_eager", "b")
LABELS = {"a_eager": "a': library, lifted encoder, eager + AdamW",
          "b": "b: nn.Module (timm encoder) + torch.optim.AdamW"}
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
    p.add_argument("--donate", action="store_true",
                   help="a': make_train_step(donate=True), the old train state's tensors reused for the new one")
    p.add_argument("--child", default=None, help=_hidden())
    R.add_malloc_option(p)
    args = C.finish_args(p.parse_args(argv), quick_size=64, quick_batch=8)
    args.widths, args.model = None, "unet"  # read by write_report (its setting line is ours)
    return args


def _hidden():
    import argparse

    return argparse.SUPPRESS


def build(row: str, args, data):
    """``step()`` for ``row`` on the fixed batch; both rows start from the library's init of key(seed)."""
    from benchmarks.reference_modules import build_reference, load_pure
    from functional_seg.core import random as jr
    from functional_seg.data.preprocess import Preprocess
    from functional_seg.losses import get_loss
    from functional_seg.models import create_model
    from functional_seg.train import init_train_state, make_optimizer, make_train_step

    device = args.device
    images, masks = data
    model = create_model("unet", encoder=args.encoder)
    pre = Preprocess()
    if row == "a_eager":
        optimizer = (make_optimizer(name="adamw", lr=LR, weight_decay=WEIGHT_DECAY) if args.optimizer == "adamw"
                     else make_optimizer(name="sgd", lr=LR, momentum=0.0))
        train_step = make_train_step(model, get_loss("ce"), optimizer, preprocess=pre, donate=args.donate)
        holder = [init_train_state(model, optimizer, jr.key(args.seed), device=device)]

        def step():
            holder[0], metrics = train_step(holder[0], (images, masks))
            return metrics["loss"]

        return step
    params, state = model.init(jr.key(args.seed))
    module = load_pure(build_reference("unet", model.cfg), params, state).to(device).train()
    opt = (torch.optim.AdamW(module.parameters(), lr=LR, weight_decay=WEIGHT_DECAY) if args.optimizer == "adamw"
           else torch.optim.SGD(module.parameters(), lr=LR, momentum=0.0))

    def step():
        loss = F.cross_entropy(module(pre.model_input(images)), masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _times(args, data) -> dict:
    from experiments import harness as C

    steps = {row: build(row, args, data) for row in ROWS}
    for row in ROWS:
        for _ in range(args.warmup):
            steps[row]()
        C.sync(args.device)
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    cpu: dict[str, list[float]] = {row: [] for row in ROWS}
    for i in range(args.steps):
        for row in ROWS if i % 2 == 0 else ROWS[::-1]:  # ABBA: neither row always runs right after the other
            t0, c0 = time.perf_counter(), time.process_time()
            steps[row]()
            C.sync(args.device)
            times[row].append(time.perf_counter() - t0)
            cpu[row].append(time.process_time() - c0)
    medians = {row: statistics.median(t) for row, t in times.items()}
    cpu_medians = {row: statistics.median(t) for row, t in cpu.items()}
    # process CPU time: what the step computed, less sensitive than wall time to other jobs on a shared box
    return {row: {"median_s": medians[row], "min_s": min(times[row]), "max_s": max(times[row]),
                  "time_x_b": medians[row] / medians["b"], "cpu_s": cpu_medians[row],
                  "cpu_x_b": cpu_medians[row] / cpu_medians["b"]} for row in ROWS}


def child(args) -> dict:
    """One row in this process: baseline after the imports, then build + steps, peak above it."""
    import functional_seg.train  # noqa: F401 - everything the rows import, before the baseline
    from benchmarks import _rows as R
    from benchmarks import reference_modules  # noqa: F401
    from benchmarks.bench_memory import _rss_mb
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
        base = _rss_mb("VmRSS")
    data = R.batch(args.batch_size, args.size, 3, args.device, args.seed)
    step = build(args.child, args, data)
    for _ in range(args.mem_steps):
        loss = step()
        C.sync(args.device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb("VmHWM")
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
        for row in ROWS:
            r, _ = R.run_row_process("benchmarks.bench_pretrained_step", [*argv, "--child", row], MARK)
            results[row]["peak_above_baseline_mb"] = r.get("peak_above_baseline_mb")
            results[row]["status"] = r.get("status", "ok")
        ref = results["b"]["peak_above_baseline_mb"]
        for r in results.values():
            if ref and r["peak_above_baseline_mb"] is not None:
                r["memory_x_b"] = r["peak_above_baseline_mb"] / ref
    R.write_report(args, prov, stem, EXPERIMENT, f"Pretrained-encoder U-Net ({args.encoder}) train step", results,
                   [("median_s", "median step s"), ("time_x_b", "time x b"), ("cpu_s", "median CPU s"),
                    ("cpu_x_b", "CPU x b"), ("peak_above_baseline_mb", "peak MB"), ("memory_x_b", "memory x b"),
                    ("min_s", "min s"), ("max_s", "max s")],
                   notes=["a' donates the old train state (make_train_step(donate=True))" if args.donate
                          else "a' keeps the train state it is given (pure step)",
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
