"""Augmentation ablation: none vs flip vs flip + colour jitter (the series) vs + random resized crop.

Command (GPU, ~40-60 s on an H100/H200):  python experiments/augmentation.py
Command (CPU, ~1-2 min, tiny widths):      python experiments/augmentation.py --quick

Same model, init, data order and optimizer for every variant (SegNet, 128 px, 20 epochs, batch
64, CE, Adam 1e-3 + StepLR(7, 0.7), eager, bf16 autocast on CUDA); only the augmentation inside
the train step changes. Scores are on the clean official test split. With 300 training images
(the sample) augmentation matters more than on the full 3,680.

Variants:
  none               no augmentation
  flip               horizontal flip p = 0.5
  flip_jitter        flip + contrast jitter 0.3 (the series' recipe)
  flip_jitter_crop   the series' recipe + random resized crop (scale 0.5-1, ratio 3/4-4/3)
  full_crop          the library preset "flip_jitter_crop": flip, brightness / contrast /
                     saturation 0.3, hue 0.05, random resized crop

Writes ``<out>/augmentation_<device-kind>.{json,md}``, ``..._curves.png`` and ``..._predictions.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

EXPERIMENT = "augmentation"
QUICK_CFG = {"widths": (8, 16, 32, 32)}
VARIANTS = {
    "none": "none",
    "flip": "flip",
    "flip_jitter": "flip + contrast 0.3 (series)",
    "flip_jitter_crop": "series + random resized crop",
    "full_crop": "flip + full jitter + crop (preset)",
}
COLUMNS = [
    ("variant", "augmentation"), ("pixel_accuracy", "pixel acc"), ("mean_iou", "mean IoU"), ("iou_pet", "IoU pet"),
    ("iou_background", "IoU bg"), ("iou_border", "IoU border"), ("series_iou", "series IoU"),
    ("custom_iou", "custom IoU"), ("final_train_loss", "final train loss"), ("train_s", "train s"),
]


def parse_args(argv=None):
    p = C.base_parser(__doc__.split("\n")[0], epochs=20, size=128, batch_size=64)
    p.add_argument("--model", default="segnet", help="registry name (quick: tiny widths)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    return C.finish_args(p.parse_args(argv), quick_epochs=2, quick_batch=16)


def augment_cfg(name: str):
    from functional_seg.data import AugmentConfig, augment_preset

    if name == "flip_jitter_crop":
        return AugmentConfig(hflip=0.5, contrast=0.3, crop_scale=(0.5, 1.0))
    if name == "full_crop":
        return augment_preset("flip_jitter_crop")
    return augment_preset(name)


def run_variant(name: str, args, train, test) -> dict:
    from functional_seg.losses import get_loss
    from functional_seg.models import create_model

    model = create_model(args.model, **(QUICK_CFG if args.quick and args.model.startswith("segnet") else {}))
    cfg = augment_cfg(name)
    res = C.train_and_evaluate(
        model, train=train, test=test, device=args.device, epochs=args.epochs, batch_size=args.batch_size,
        loss_fn=get_loss("ce"), augment=cfg, optimizer_cfg=C.step_schedule(1e-3, 7, 0.7), seed=args.seed,
        label=name, latency=False,
    )
    res["augment_cfg"] = repr(cfg)
    res["final_train_loss"] = res["history"][-1]["train_loss"] if res["history"] else None
    return res


def render(args, prov, results: dict, n_train: int, n_test: int) -> tuple[dict, str]:
    rows = [{"variant": VARIANTS.get(n, n), **r} for n, r in results.items()]
    md = C.md_header(
        f"Augmentation ablation: {args.model} at {args.size}x{args.size}, {args.epochs} epochs", prov,
        notes=[
            f"data: `{args.data}`: {n_train} trainval / {n_test} test (official split); clean test metrics",
            f"model cfg: {QUICK_CFG if args.quick else 'series defaults'}; batch {args.batch_size}; CE; Adam 1e-3 "
            "+ StepLR(7, 0.7); same seed for every variant; eager, "
            + ("bf16 autocast" if args.device.type == "cuda" else "fp32"),
            "final train loss is measured on augmented batches (harder augmentation, higher loss)",
        ],
    )
    md += "\n" + C.md_table(rows, COLUMNS) + "\n"
    return C.payload(EXPERIMENT, prov, args, results), md


def main(argv=None) -> int:
    args = parse_args(argv)
    budget, prov, stem = C.start(args, EXPERIMENT, f", model {args.model}")
    train, test = C.load_splits(args.data, args.size, train_limit=args.train_limit, test_limit=args.test_limit)
    results: dict[str, dict] = {}
    for name in [n.strip() for n in args.variants.split(",") if n.strip()]:
        if name not in VARIANTS:
            results[name] = {"status": f"failed: unknown variant {name!r}"}
            continue
        results[name] = C.run_budgeted(name, lambda name=name: run_variant(name, args, train, test), budget)
        C.write_results(args.out, stem, *render(args, prov, results, len(train), len(test)))
    C.write_results(args.out, stem, *render(args, prov, results, len(train), len(test)))
    if not args.no_figures:
        ok = {VARIANTS[n]: r for n, r in results.items() if r.get("status") == "ok"}
        C.write_figures(ok, ok, test, args.out, stem, loss_label="train loss (augmented)",
                        title=f"augmentation, {args.model} {args.size}px, {prov['device_name']}")
    print(C.md_table([{"variant": n, **r} for n, r in results.items()], COLUMNS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
