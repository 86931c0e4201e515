"""Micro-benchmark: ``confusion_matrix`` + ``mean_iou`` against torchmetrics' MulticlassJaccardIndex.

Times one evaluation batch, logits float32 [64, 3, 128, 128] and target int64 [64, 128, 128]
(the series' batch), from logits to a 0-d mean IoU, with a device sync inside every timed call.
torchmetrics is timed as a streaming metric (update + compute + reset, its usual use) and as
its functional form with and without argument validation. Prints the median of each and the
ratio torchmetrics / ours (> 1 means ours is faster). Not a test.

    .venv/bin/python -m benchmarks.bench_metrics                 # cuda if available, else cpu
    .venv/bin/python -m benchmarks.bench_metrics --device cpu --repeat 30 --compile

Runtime: a few seconds on a GPU, ~10-30 s on a small CPU.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable

import torch
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.functional.classification import multiclass_jaccard_index

from functional_seg.metrics import confusion_matrix, mean_iou


def _time(fn: Callable[[], torch.Tensor], device: torch.device, repeat: int, warmup: int) -> tuple[float, torch.Tensor]:
    """Median wall time in milliseconds over ``repeat`` synced calls, and the last result."""
    from experiments.harness import timed

    seconds, out = timed(fn, device, warmup=warmup, iters=repeat)
    return 1e3 * seconds, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    c = args.classes
    logits = torch.randn(args.batch, c, args.size, args.size, generator=g).to(device)
    target = torch.randint(0, c, (args.batch, args.size, args.size), generator=g).to(device)

    def ours() -> torch.Tensor:
        return mean_iou(confusion_matrix(logits, target, c))

    metric = MulticlassJaccardIndex(num_classes=c, average="macro").to(device)

    def tm_module() -> torch.Tensor:
        metric.update(logits, target)
        value = metric.compute()
        metric.reset()
        return value

    def tm_functional() -> torch.Tensor:
        return multiclass_jaccard_index(logits, target, c, average="macro")

    def tm_functional_fast() -> torch.Tensor:
        return multiclass_jaccard_index(logits, target, c, average="macro", validate_args=False)

    runs = {
        "ours (confusion_matrix + mean_iou)": ours,
        "torchmetrics MulticlassJaccardIndex (update+compute+reset)": tm_module,
        "torchmetrics multiclass_jaccard_index (validate_args=True)": tm_functional,
        "torchmetrics multiclass_jaccard_index (validate_args=False)": tm_functional_fast,
    }
    if args.compile:
        compiled = torch.compile(ours, fullgraph=True)
        runs["ours, torch.compile(fullgraph=True)"] = compiled

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"command: python -m benchmarks.bench_metrics {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(f"batch [{args.batch}, {c}, {args.size}, {args.size}] on {device} ({name}), torch {torch.__version__}")
    results = {label: _time(fn, device, args.repeat, args.warmup) for label, fn in runs.items()}
    reference = results["ours (confusion_matrix + mean_iou)"]
    width = max(len(label) for label in results)
    for label, (ms, value) in results.items():
        agree = abs(value.double().item() - reference[1].item()) < 1e-6
        print(f"{label:<{width}}  {ms:9.3f} ms  mIoU {value.item():.6f}{'' if agree else '  (DIFFERS)'}")
    ratio = results["torchmetrics MulticlassJaccardIndex (update+compute+reset)"][0] / reference[0]
    print(f"ratio torchmetrics MulticlassJaccardIndex / ours: {ratio:.2f}x")


if __name__ == "__main__":
    main()
