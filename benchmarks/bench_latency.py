"""Latency of every registered model: pure ``apply`` vs the same architecture as a plain ``nn.Module``.

For each model (default cfg) and batch size, times five variants on zeros [N, 3, S, S] in eval under
``torch.no_grad()``: the pure model's ``apply(train=False)`` eager and under ``torch.compile``, its
reference ``nn.Module`` (benchmarks/reference_modules.py; torchvision's own module for the lifted
models) eager and under ``torch.compile``, and the model as ``fseg export --format onnx`` writes it
(normalisation inside, dynamic batch) run by onnxruntime's CPU provider with torch's thread count.
Prints the median milliseconds per batch and images per second, then the ratios pure eager / onnx
and pure compiled / onnx from the same run (above 1: onnxruntime is faster), with the device,
torch version and the command line on top. The onnx row is always on the CPU.

    python -m benchmarks.bench_latency                       # all models, batch 1 and 64, 128 px
    python -m benchmarks.bench_latency --device cuda --models segnet vit
    python -m benchmarks.bench_latency --quick               # few repeats; on CPU 3 models, batch 1 and 4
    python -m benchmarks.bench_latency --no-onnx             # without the onnxruntime row

Runtime: on a GPU a few minutes for everything (mostly compilation); on CPU, compilation takes tens
of seconds per model and variant, and the big models at batch 64 take seconds per call, so use
--quick or pick models.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.reference_modules import build_reference
from experiments import harness as C
from functional_seg.core import random as jr
from functional_seg.core.tree import tree_map
from functional_seg.models import create_model, list_models

QUICK_CPU_MODELS = ("segnet", "segnet_dsc", "segformer")


def _init_on(model, device: torch.device):
    try:
        with torch.device(device):
            params, state = model.init(jr.key(0, device=device))
    except NotImplementedError:
        params, state = model.init(jr.key(0))
    return tree_map(lambda t: t.to(device), params), tree_map(lambda t: t.to(device), state)


ONNX_LABEL = "onnxruntime cpu"
RATIOS = (("pure eager", "eager/onnx"), ("pure compiled", "compiled/onnx"))


def onnx_runner(model, params, state, size: int):
    """The model exported as ``fseg export --format onnx`` does, as ``x -> logits`` on onnxruntime's CPU."""
    import onnxruntime as ort

    from benchmarks._rows import contract
    from functional_seg.export import ExportModule, to_onnx_bytes, trace
    from functional_seg.train import FitConfig

    params, state = tree_map(lambda t: t.detach().cpu(), (params, state))
    _, pre = contract(model, FitConfig(device="cpu"), size=size)  # a CPU run's contract: fp32, NCHW
    module = ExportModule(model, params, state, pre).eval()
    program, _, _ = trace(module, size)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(to_onnx_bytes(program), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x.cpu().numpy()})[0]


def _failing(err: Exception):
    def run(x):
        raise RuntimeError(f"{type(err).__name__}: {str(err).splitlines()[0][:60]}")
    return run


def bench_model(name: str, batch_sizes: list[int], size: int, device: torch.device, warmup: int, repeats: int,
                compile_: bool, onnx: bool = False) -> list[dict]:
    model = create_model(name)
    params, state = _init_on(model, device)
    reference = build_reference(name, model.cfg).to(device).eval()
    pure = lambda p, s, x: model.apply(p, s, x, train=False)[0]
    variants = {"pure eager": lambda x: pure(params, state, x), "nn.Module eager": reference}
    if compile_:
        compiled_pure = torch.compile(pure, dynamic=False)
        variants["pure compiled"] = lambda x: compiled_pure(params, state, x)
        variants["nn.Module compiled"] = torch.compile(reference, dynamic=False)
    if onnx:
        try:
            variants[ONNX_LABEL] = onnx_runner(model, params, state, size)
        except Exception as err:  # an export failure is a cell in the table, not the end of the run
            variants[ONNX_LABEL] = _failing(err)
    ratios = [r for base, r in RATIOS if ONNX_LABEL in variants and base in variants]
    rows = []
    for batch in batch_sizes:
        x = torch.zeros(batch, 3, size, size, device=device)
        row = {"model": name, "batch": batch}
        for label, fn in variants.items():
            try:
                with torch.no_grad():
                    # median seconds after the warm-up calls (the first compiled call compiles)
                    row[label] = C.median_ms(lambda fn=fn, x=x: fn(x), device, warmup=warmup, iters=repeats) / 1e3
            except Exception as err:  # report and go on: one failure should not hide the rest
                row[label] = f"{type(err).__name__}: {str(err).splitlines()[0][:60]}"
        for base, ratio in RATIOS:
            if isinstance(row.get(base), float) and isinstance(row.get(ONNX_LABEL), float):
                row[ratio] = row[base] / row[ONNX_LABEL]
        rows.append(row)
        print(format_row(row, list(variants) + ratios), flush=True)
    torch._dynamo.reset()
    return rows


def format_row(row: dict, labels: list[str]) -> str:
    cells = [f"{row['model']:<20}", f"{row['batch']:>5}"]
    for label in labels:
        value = row.get(label)
        if label.endswith("/onnx"):
            cells.append(f"{value:>13.2f}x" if isinstance(value, float) else f"{'-':>14}")
        elif isinstance(value, float):
            cells.append(f"{value * 1e3:>10.2f} ms {row['batch'] / value:>9.1f}/s")
        else:
            cells.append(f"{str(value)[:24]:>24}")
    return "  ".join(cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=None, help=f"default: all ({', '.join(list_models())})")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 1 64 (quick CPU: 1 4)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="2 warm-up calls and 5 timed ones (else 5 and 20)")
    parser.add_argument("--warmup", type=int, default=None, help="override the warm-up calls")
    parser.add_argument("--repeats", type=int, default=None, help="override the timed calls")
    parser.add_argument("--no-compile", action="store_true", help="eager variants only")
    parser.add_argument("--no-onnx", action="store_true", help="without the onnxruntime (CPU) row")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    quick_cpu = args.quick and device.type == "cpu"
    models = args.models or (list(QUICK_CPU_MODELS) if quick_cpu else list_models())
    batch_sizes = args.batch_sizes or ([1, 4] if quick_cpu else [1, 64])
    warmup, repeats = (2, 5) if args.quick else (5, 20)
    warmup, repeats = args.warmup if args.warmup is not None else warmup, args.repeats or repeats
    unknown = sorted(set(models) - set(list_models()))
    if unknown:
        parser.error(f"unknown models {unknown}; available: {', '.join(list_models())}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU, {torch.get_num_threads()} threads"

    print(f"command: python -m benchmarks.bench_latency {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"device: {device_name}; torch {torch.__version__}; input {args.size}x{args.size}, float32, eval, "
          f"no_grad; median of {repeats} after {warmup} warm-up calls")
    labels = ["pure eager", "nn.Module eager"] + ([] if args.no_compile else ["pure compiled", "nn.Module compiled"])
    if not args.no_onnx:
        labels += [ONNX_LABEL] + [ratio for base, ratio in RATIOS if base in labels]
    header = [f"{'model':<20}", f"{'batch':>5}",
              *(f"{label:>14}" if label.endswith("/onnx") else f"{label:>24}" for label in labels)]
    print("  ".join(header), flush=True)
    for name in models:
        bench_model(name, batch_sizes, args.size, device, warmup, repeats, not args.no_compile, not args.no_onnx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
