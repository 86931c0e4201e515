"""Train-step throughput (images/s): this library's compiled functional step against the stateful baselines.

Command (GPU, ~2 min with compiles):   python -m benchmarks.bench_train_step
Command (CPU, ~1 min):                 python -m benchmarks.bench_train_step --quick

Rows, all on the same prepared uint8 data (the sample's trainval, repeated so no epoch boundary
falls inside the timed window), the same architecture and loss (cross-entropy), Adam lr 1e-3:

  a   this library: the step ``fseg train`` runs (``_rows.library_steps``: ``build_steps`` over a
      ``FitConfig`` under the device's resolved ``Runtime``: bf16 autocast and channels-last on
      CUDA), compiled, augmentation (flip + contrast jitter) inside the one compiled step, batches
      gathered on the device from resident uint8 tensors.
  a'  the same step in eager mode.
  b   the articles' way: the reference ``torch.nn.Module`` SegNet, ``torch.optim.Adam``, eager,
      fp32, fed by a ``DataLoader`` whose workers run ``transforms.v2`` (RandomHorizontalFlip +
      ColorJitter(contrast=0.3) on a paired ``tv_tensors.Image`` / ``tv_tensors.Mask``).
  b16 as b under the library's precision (bf16 autocast; CUDA only): separates precision from the rest.
  bin b's input pipeline alone (DataLoader iteration + copy to the device, no model).
  c   ``torch.compile(module)`` + ``torch.optim.Adam(fused=True)`` (fused on CUDA only) under a's
      runtime (precision, layout) and ``Preprocess``, with a's on-device augmentation (compiled
      separately) and resident data.

cuDNN autotuning (``torch.backends.cudnn.benchmark``) is on for a, a' and c (``fit`` turns it
on for CUDA runs) and left at torch's default (off) for b and b16, the articles' loop.

Each row warms up (compiles) first, then times ``--steps`` steps between CUDA synchronisations.
Prints images/s and the ratios a/b and a/c (targets on a GPU: a/b >= 3.5, a/c >= 1.15; on CPU:
a/b >= 1.0). On CUDA each row also gets its MFU: model FLOPs per second over the GPU's dense bf16
peak, the model FLOPs of a training step being 3 x the forward's (2 FLOPs a multiply-add, the
forward's count from ``functional_seg.summary``; the backward taken as twice the forward, the
usual convention). The peak comes from a table of data-sheet figures by device name, or from
``--peak-tflops``. On CUDA each row also reports its peak memory: ``max_memory_allocated`` over the
timed steps above what was allocated before the row was built (its parameters, optimizer state,
activations and, for a, a' and c, the resident data; the ratio "mem a/c", target <= 1).
``--profile`` adds a torch.profiler table of the top ops of a, b and c. ``--backend aot_eager``
captures a and c without code generation (a quick CPU run of the script).
Writes ``<out>/bench_train_step_<device-kind>.{json,md}``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import torch

from benchmarks import _rows as R
from experiments import harness as C

EXPERIMENT = "bench_train_step"
QUICK_WIDTHS = (8, 16, 32, 32)


def parse_args(argv=None):
    p = C.base_parser(__doc__.split("\n")[0], epochs=1, size=128, batch_size=64)
    p.add_argument("--model", default="segnet", help="registry name; the baseline module must exist for it")
    p.add_argument("--widths", default=None, help="encoder widths, e.g. 16,32,64,64 (default: the series')")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 30; quick 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per row (default 3; quick 2)")
    p.add_argument("--rows", default="b,b_input,b16,a_eager,a,c", help="which rows to run, comma separated")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers for b (default min(8, cpus))")
    p.add_argument("--profile", action="store_true", help="also profile a few steps of a, b and c")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak for the MFU column (default: looked up by device name)")
    p.add_argument("--backend", choices=("inductor", "aot_eager"), default="inductor",
                   help="torch.compile backend of a and c (aot_eager: dynamo + AOTAutograd, no code generation)")
    p.add_argument("--compile-report-steps", type=int, default=None,
                   help="steps for compile_report on a (default 100 on CUDA, 0 on CPU)")
    args = C.finish_args(p.parse_args(argv), quick_batch=8)
    if args.steps is None:
        args.steps = 10 if args.quick else 30
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    if args.widths is None and args.quick:
        args.widths = ",".join(map(str, QUICK_WIDTHS))
    if args.compile_report_steps is None:
        args.compile_report_steps = 100 if args.device.type == "cuda" and not args.quick else 0
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1)
    return args


def model_cfg(args) -> dict:
    return {"widths": tuple(int(w) for w in args.widths.split(","))} if args.widths else {}


# ----------------------------------------------------------------------------------------------
# (b) the articles' input pipeline: transforms.v2 on paired Image / Mask in DataLoader workers


class PairedDataset(torch.utils.data.Dataset):
    """uint8 images [N, 3, S, S] and masks [N, S, S] -> (float image [3, S, S], int64 mask [S, S])."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor):
        from torchvision.transforms import v2

        self.images, self.masks = images, masks
        self.transform = v2.Compose([
            v2.RandomHorizontalFlip(p=0.5),
            v2.ToDtype({"others": None, **_image_dtype()}, scale=True),
            v2.ColorJitter(contrast=0.3),
        ])

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        from torchvision import tv_tensors

        image, mask = self.transform(tv_tensors.Image(self.images[i]), tv_tensors.Mask(self.masks[i]))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).to(torch.int64)


def _image_dtype():
    from torchvision import tv_tensors

    return {tv_tensors.Image: torch.float32}


def _loader_plan(batch_bytes: int, workers: int, prefetch: int = 4) -> tuple[int, int]:
    """Workers and prefetch factor whose in-flight batches fit in half of /dev/shm (containers often have 64 MB)."""
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return workers, prefetch
    while workers > 0 and workers * prefetch * batch_bytes > free // 2:
        if prefetch > 1:
            prefetch -= 1
        else:
            workers -= 1
    return workers, prefetch


def make_dataloader(data, batch_size: int, workers: int, device: torch.device):
    ds = PairedDataset(data.images, data.masks)
    s = data.size
    batch_bytes = batch_size * (3 * s * s * 4 + s * s * 8)  # float32 images + int64 masks
    workers, prefetch = _loader_plan(batch_bytes, workers)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=prefetch if workers > 0 else None,
    )
    return loader, workers, prefetch


def _forever(loader):
    while True:
        yield from loader


def _resident_batches(data, batch_size: int, device: torch.device, seed: int):
    """Endless (uint8 images, int64 masks) batches gathered on the device (the library's Loader)."""
    from functional_seg.core import random as jr
    from functional_seg.data import Loader

    loader = Loader(data, batch_size, device=device, shuffle=True, drop_last=True, resident=True)
    epoch = 0
    while True:
        yield from loader.epoch(jr.fold_in(jr.key(seed), epoch))
        epoch += 1


def _time_steps(step, batches, device, warmup: int, steps: int, batch_size: int, base_bytes: int = 0) -> dict:
    """Run ``warmup`` then ``steps`` calls of ``step(batch)``; images/s over the timed ones, and on CUDA
    the peak allocated over the timed steps above ``base_bytes`` (what was allocated before the row)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(next(batches))
    C.sync(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    C.sync(device)
    dt = time.perf_counter() - t0
    out = {"images_per_s": steps * batch_size / dt, "ms_per_step": dt / steps * 1e3, "warmup_s": warm_s,
           "steps": steps}
    if device.type == "cuda":
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base_bytes) / 2**20
    return out


# ----------------------------------------------------------------------------------------------
# Rows: each builder returns (step, batches, info); step(batch) runs one training step.


def library(args, data, *, compile: bool) -> R.LibraryRow:
    """The library's row for ``args.model``: fseg train's step with flip + jitter inside."""
    from functional_seg.models import create_model

    model = create_model(args.model, **model_cfg(args))
    return R.library_steps(model, args.device, size=args.size, compile=compile, augment="flip_jitter", data=data,
                           backend=args.backend)


def build_b(args, data, *, bf16: bool):
    """The articles' loop: fp32 (b16: the library's precision), NCHW, eager, DataLoader + transforms.v2."""
    from functional_seg.models import create_model
    from functional_seg.runtime import resolve_runtime

    device = args.device
    precision = resolve_runtime(device).precision if bf16 else "fp32"
    runtime = resolve_runtime(device, precision=precision, compile=False, channels_last=False)
    module = R.reference_module(args.model, create_model(args.model, **model_cfg(args)), runtime, args.seed)
    update = R.module_step(module, torch.optim.Adam(module.parameters(), lr=1e-3), runtime)
    loader, workers, prefetch = make_dataloader(data, args.batch_size, args.workers, device)
    batches = _forever(loader)

    def step(batch):
        images, masks = batch
        return update(images.to(device, non_blocking=True), masks.to(device, non_blocking=True))

    return step, batches, {"precision": runtime.precision, "layout": "NCHW", "workers": workers,
                           "prefetch_factor": prefetch}


def build_b_input(args, data):
    """The DataLoader alone: how many images/s the articles' input pipeline can feed."""
    device = args.device
    loader, workers, prefetch = make_dataloader(data, args.batch_size, args.workers, device)
    batches = _forever(loader)

    def step(batch):
        images, masks = batch
        return images.to(device, non_blocking=True), masks.to(device, non_blocking=True)

    return step, batches, {"workers": workers, "prefetch_factor": prefetch, "precision": "-"}


def build_c(args, data):
    """The strongest stateful baseline under a's runtime and contract: compiled module, fused Adam
    (on CUDA), a's augmentation compiled on the device, resident data."""
    from functional_seg.core import random as jr
    from functional_seg.data import augment, augment_preset, to_float

    device = args.device
    lib = library(args, data, compile=True)  # its runtime and Preprocess only: c runs as a does
    pre, runtime = lib.preprocess, lib.runtime
    module = R.reference_module(args.model, lib.model, runtime, args.seed)
    fused = device.type == "cuda"
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, fused=fused)
    update = R.module_step(torch.compile(module, backend=args.backend), opt, runtime)
    aug_cfg = augment_preset("flip_jitter")

    @torch.compile(backend=args.backend)
    def aug(key, images, masks):
        x, masks = augment(key, to_float(images), masks, aug_cfg)
        return pre.model_input(x), masks

    key = jr.key(args.seed).to(device)
    batches = _resident_batches(data, args.batch_size, device, args.seed)
    counter = [0]

    def step(batch):
        images, masks = aug(jr.fold_in(key, counter[0]), *batch)
        counter[0] += 1
        return update(images, masks)

    return step, batches, {"precision": runtime.precision, "layout": _layout(runtime), "fused_adam": fused}


def _layout(runtime) -> str:
    return "channels-last" if runtime.channels_last else "NCHW"


def build_a(args, data, *, compile: bool):
    from functional_seg.core import random as jr

    lib = library(args, data, compile=compile)
    train_step = lib.steps.train_step
    batches = _resident_batches(data, args.batch_size, args.device, args.seed)
    holder = [lib.init(jr.key(args.seed))]
    info = {"precision": lib.runtime.precision, "layout": _layout(lib.runtime), "compiled": compile}
    if compile and args.compile_report_steps > 0:
        # The report's steps double as the warm-up (one compile, not two).
        info["compile_report"] = C.guarded("compile_report", lambda: _compile_report(train_step, holder, batches,
                                                                                   args.compile_report_steps))

    def step(batch):
        holder[0], metrics = train_step(holder[0], batch)
        return metrics

    return step, batches, info


def _compile_report(train_step, holder, batches, n_steps: int) -> dict:
    from functional_seg.train import compile_report

    t0 = time.perf_counter()
    report = dict(compile_report(train_step, holder[0], next(batches), n_steps))
    if "final_state" in report:
        holder[0] = report.pop("final_state")
    out = {**report, "seconds": time.perf_counter() - t0}
    return {k: (v if isinstance(v, int | float | str | bool) or v is None else str(v)) for k, v in out.items()}


def run_row(builder, args, device) -> tuple[dict, tuple | None]:
    """Build, warm up and time one row; returns (result, (step, batches)) for profiling."""
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    step, batches, info = builder()
    build_s = time.perf_counter() - t0
    n = args.steps * 2 if info.get("precision") == "-" else args.steps
    out = _time_steps(step, batches, device, args.warmup, n, args.batch_size, base)
    out["warmup_s"] += build_s
    out.update(info)
    return out, (step, batches)


# ----------------------------------------------------------------------------------------------
# Profile


def profile_rows(live: dict, device: torch.device) -> str:
    """Top ops by device (or CPU) self time over 3 more steps of each live row."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_keys = ["self_device_time_total", "self_cuda_time_total"] if device.type == "cuda" else ["self_cpu_time_total"]
    sections = []
    for name in ("a", "b", "c"):
        if name not in live:
            continue
        step, batches = live[name]
        torch.backends.cudnn.benchmark = name in AUTOTUNED
        try:
            with profile(activities=activities) as prof:
                for _ in range(3):
                    step(next(batches))
                C.sync(device)
            table = None
            for sort_by in sort_keys:  # the CUDA key was renamed across torch versions
                try:
                    table = prof.key_averages().table(sort_by=sort_by, row_limit=15, max_name_column_width=60)
                    break
                except (AttributeError, KeyError, ValueError):
                    continue
            if table is None:
                table = prof.key_averages().table(row_limit=15, max_name_column_width=60)
            sections.append(f"## {ROW_LABELS[name]}\n\n```\n{table}\n```\n")
        except Exception as err:  # noqa: BLE001
            sections.append(f"## {ROW_LABELS[name]}\n\nfailed: {C.short_error(err)}\n")
    return "\n".join(sections)


# ----------------------------------------------------------------------------------------------


AUTOTUNED = ("a", "a_eager", "c")  # rows run with cudnn.benchmark on (b, b16: torch's default)

ROW_LABELS = {
    "a": "a: library, compiled functional step (aug inside)",
    "a_eager": "a': library, eager functional step",
    "b": "b: nn.Module + Adam, eager, DataLoader + transforms.v2 (articles)",
    "b16": "b16: as b, bf16 autocast",
    "b_input": "b input only: DataLoader + transforms.v2 -> device",
    "c": "c: torch.compile(module) + Adam(fused), on-device aug",
}


# dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; first match wins
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1),
                    ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.2))


def peak_bf16_flops(args) -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from) for this run's GPU; (None, why) off CUDA or for an unknown GPU."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12, f"--peak-tflops {args.peak_tflops:g}"
    if args.device.type != "cuda":
        return None, "no MFU off CUDA"
    name = torch.cuda.get_device_name(args.device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s dense bf16 (data sheet)"
    return None, f"{name}: peak unknown (pass --peak-tflops)"


def train_flops_per_image(args) -> float:
    """3 x the forward's FLOPs for one image (2 FLOPs a multiply-add), from the model summary."""
    from functional_seg.models import create_model
    from functional_seg.summary import summarize

    model = create_model(args.model, **model_cfg(args))
    return 3 * 2 * summarize(model, (args.size, args.size), batch_size=1, device="meta").total_mult_adds


def add_mfu(args, results: dict) -> str:
    """An ``mfu`` figure in every row with images/s, when the peak is known; returns the table note."""
    peak, source = peak_bf16_flops(args)
    if peak is None:
        return source
    per_image = train_flops_per_image(args)
    for name, r in results.items():
        if r.get("images_per_s") and name != "b_input":  # the input-only row trains no model
            r["mfu"] = r["images_per_s"] * per_image / peak
    return (f"MFU = images/s x {per_image / 1e9:.2f} GFLOP/image (3 x forward) / peak; peak: {source}")


THROUGHPUT_PAIRS = (("a", "b"), ("a", "c"), ("a", "a_eager"), ("c", "b"), ("b16", "b"))


def targets_for(device: torch.device) -> dict[str, tuple[str, float]]:
    """Issue 12's targets: {ratio: (">=" or "<=", value)}; "mem" ratios are of peak memory."""
    if device.type == "cuda":
        return {"a/b": (">=", 3.5), "a/c": (">=", 1.15), "mem a/c": ("<=", 1.0)}
    return {"a/b": (">=", 1.0)}


def compute_ratios(results: dict, targets: dict) -> tuple[dict[str, float], dict[str, bool | None]]:
    """Throughput ratios (images/s) and, where measured, memory ratios ("mem a/c": peak MB), with
    each target met (True/False) or not measured (None)."""
    ratios = {}
    for figure, prefix in (("images_per_s", ""), ("peak_mb", "mem ")):
        values = {n: r.get(figure) for n, r in results.items()}
        for num, den in THROUGHPUT_PAIRS:
            if values.get(num) and values.get(den):
                ratios[f"{prefix}{num}/{den}"] = values[num] / values[den]
    met = {k: None if k not in ratios else (ratios[k] >= v if op == ">=" else ratios[k] <= v)
           for k, (op, v) in targets.items()}
    return ratios, met


def _goal(name: str, targets: dict, met: dict) -> str:
    if name not in targets:
        return ""
    op, value = targets[name]
    return f"{op} {value}: {'met' if met[name] else 'MISSED'}"


def render(args, prov, train_n, data_n, results, ratios, targets, met, profile_md) -> tuple[dict, str]:
    mfu_note = add_mfu(args, results)
    table_rows = [{"row": ROW_LABELS[n], **r} for n, r in results.items()]
    md = C.md_header(
        f"Train-step throughput: {args.model} at {args.size}x{args.size}, batch {args.batch_size}", prov,
        notes=[f"model cfg: {model_cfg(args) or 'series widths'}; loss CE; Adam lr 1e-3; "
               f"{args.warmup} warm-up + {args.steps} timed steps per row (input-only row: twice as many); "
               f"data: {train_n} trainval images from `{args.data.name}` cycled to {data_n}",
               "a, a', c: the library's runtime for the device (functional_seg.runtime; c takes a's); b: the "
               "articles' fp32 NCHW eager loop; b16: b under the library's precision; cudnn.benchmark on for a, "
               "a', c, off (torch's default) for b, b16; warm-up s includes building the row (and compiling); "
               "peak MB (CUDA): max allocated over the timed steps above what was allocated before the row "
               "(resident data included for a, a', c)", mfu_note],
    )
    md += "\n" + C.md_table(table_rows, [("row", "row"), ("images_per_s", "images/s"), ("ms_per_step", "ms/step"),
                                         ("mfu", "MFU"), ("peak_mb", "peak MB"), ("warmup_s", "warm-up s"),
                                         ("precision", "precision"), ("layout", "layout"),
                                         ("workers", "loader workers")])
    if ratios:
        md += "\n\n| ratio | value | target |\n|---|---|---|\n"
        for k, v in ratios.items():
            md += f"| {k} | {v:.2f} | {_goal(k, targets, met)} |\n"
    cr = results.get("a", {}).get("compile_report")
    if cr:
        md += f"\ncompile_report over {args.compile_report_steps} steps of a: `{cr}`\n"
    if profile_md:
        md += "\n# Profile (top ops by self time over 3 steps after the timed ones)\n\n" + profile_md
    payload = {"experiment": EXPERIMENT, "provenance": prov,
               "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
               "rows": results, "ratios": ratios, "targets": targets, "targets_met": met, "profile": profile_md}
    return payload, md


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    budget, prov, stem = C.start(args, EXPERIMENT, f", batch {args.batch_size}, {args.size} px, "
                                 f"model {args.model} {model_cfg(args) or '(series widths)'}")
    train, _ = C.load_splits(args.data, args.size, test_split=None)
    need = args.batch_size * (args.steps * 2 + args.warmup + 2)
    data = train.repeat(max(need, len(train)))

    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    if device.type != "cuda":  # bf16 autocast is a CUDA row
        rows_wanted = [r for r in rows_wanted if r != "b16"]
    builders = {
        "a": lambda: build_a(args, data, compile=True),
        "a_eager": lambda: build_a(args, data, compile=False),
        "b": lambda: build_b(args, data, bf16=False),
        "b16": lambda: build_b(args, data, bf16=True),
        "b_input": lambda: build_b_input(args, data),
        "c": lambda: build_c(args, data),
    }
    targets = targets_for(device)
    results: dict[str, dict] = {}
    live: dict[str, tuple] = {}
    ratios: dict[str, float] = {}
    met: dict[str, bool | None] = {}

    for name in rows_wanted:
        if budget.over(reserve=10):
            results[name] = {"status": "skipped: time budget"}
            continue
        t0 = time.perf_counter()
        torch.backends.cudnn.benchmark = name in AUTOTUNED

        def one(name=name):
            out, handle = run_row(builders[name], args, device)
            if args.profile and name in ("a", "b", "c"):
                live[name] = handle
            return out

        results[name] = C.guarded(name, one)
        r = results[name]
        shown = f"{r['images_per_s']:.1f} images/s" if "images_per_s" in r else r["status"]
        print(f"  {ROW_LABELS[name]}: {shown} ({time.perf_counter() - t0:.1f} s incl. build and warm-up)", flush=True)
        ratios, met = compute_ratios(results, targets)
        C.write_results(args.out, stem, *render(args, prov, len(train), len(data), results, ratios, targets, met,
                                                None))

    for k, v in ratios.items():
        goal = _goal(k, targets, met)
        print(f"  ratio {k}: {v:.2f}{f' (target {goal})' if goal else ''}", flush=True)
    if args.profile and live:
        profile_md = profile_rows(live, device)
        C.write_results(args.out, stem, *render(args, prov, len(train), len(data), results, ratios, targets, met,
                                                profile_md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
