"""Augmentation ablation: none vs flip vs flip + colour jitter (the series) vs + random resized crop.

Command (GPU, ~1 min on an H100/H200):  python -m experiments.augmentation
Command (CPU, ~2-3 min, tiny widths):    python -m experiments.augmentation --quick

One ``FitConfig`` per variant, equal but for ``augment``: same model, init, data order and
optimizer (SegNet, 128 px, 20 epochs, batch 64, CE, Adam 1e-3 + StepLR(7, 0.7)), run by ``fit``
as ``fseg train`` runs it. The checkpoint is selected on the validation split carved from
trainval; scores are on the official test split, without augmentation. With 300 training
images (the sample) augmentation matters more than on the full 3,680.

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

from . import _common as C
from . import harness as H
from .figures import write_figures

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
    ("variant", "augmentation"), ("val_mean_iou", "val mIoU"), ("best_epoch", "best epoch"),
    ("pixel_accuracy", "test pixel acc"), ("mean_iou", "test mIoU"), ("iou_pet", "IoU pet"),
    ("iou_background", "IoU bg"), ("iou_border", "IoU border"), ("series_iou", "series IoU"),
    ("custom_iou", "custom IoU"), ("final_train_loss", "final train loss"), ("train_s", "train s"),
]


def parse_args(argv=None):
    p = C.experiment_parser(__doc__.split("\n")[0], epochs=20, size=128, batch_size=64)
    p.add_argument("--model", default="segnet", help="registry name (quick: tiny widths)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    return H.finish_args(p.parse_args(argv), quick_epochs=2, quick_batch=16)


def augment_cfg(name: str):
    from functional_seg.data import AugmentConfig, augment_preset

    if name == "flip_jitter_crop":
        return AugmentConfig(hflip=0.5, contrast=0.3, crop_scale=(0.5, 1.0))
    if name == "full_crop":
        return augment_preset("flip_jitter_crop")
    return augment_preset(name)


def run_variant(name: str, args, splits, stem: str) -> dict:
    from functional_seg.models import create_model

    model = create_model(args.model, **(QUICK_CFG if args.quick and args.model.startswith("segnet") else {}))
    aug = augment_cfg(name)
    config = C.fit_config(args, loss="ce", augment=aug, optimizer=C.step_schedule(1e-3, 7, 0.7))
    res = C.run_config(name, model, config, splits, args, stem)
    res["augment_cfg"] = aug
    res["final_train_loss"] = res["history"][-1]["train_loss"] if res["history"] else None
    return res


def render(args, prov, results: dict, data_note) -> tuple[dict, str]:
    rows = [{"variant": VARIANTS.get(n, n), **r} for n, r in results.items()]
    md = H.md_header(
        f"Augmentation ablation: {args.model} at {args.size}x{args.size}, {args.epochs} epochs", prov,
        notes=[
            data_note, C.PROTOCOL_NOTE,
            f"model cfg: {QUICK_CFG if args.quick else 'series defaults'}; batch {args.batch_size}; CE; Adam 1e-3 "
            f"+ StepLR(7, 0.7); same seed for every variant; run by `fit` (--compile {args.compile})",
            C.METRICS_NOTE,
            "final train loss is measured on augmented batches (harder augmentation, higher loss)",
        ],
    )
    md += "\n" + H.md_table(rows, COLUMNS) + "\n"
    return H.payload(EXPERIMENT, prov, args, results), md


def main(argv=None) -> int:
    args = parse_args(argv)
    budget, prov, stem = H.start(args, EXPERIMENT, f", model {args.model}")
    splits, data_note = C.experiment_splits(args)
    results: dict[str, dict] = {}
    for name in H.names(args.variants, VARIANTS):
        results[name] = H.run_budgeted(name, lambda name=name: run_variant(name, args, splits, stem), budget)
        H.write_results(args.out, stem, *render(args, prov, results, data_note))
    if not args.no_figures:
        ok = {VARIANTS[n]: r for n, r in results.items() if r.get("status") == "ok"}
        write_figures(ok, ok, splits.test, args.out, stem, loss_label="train loss (augmented)",
                        title=f"augmentation, {args.model} {args.size}px, {prov['device_name']}")
    print(H.md_table([{"variant": n, **r} for n, r in results.items()], COLUMNS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
