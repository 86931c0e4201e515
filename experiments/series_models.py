"""The series' models side by side: SegNet (Part 2), depthwise-separable SegNet (Part 3), the ViT (Part 4),
SegFormer (MiT-B0) and U-Net, trained with the series' recipe through ``fit``.

Command (GPU, ~2-4 min on an H100/H200):  python -m experiments.series_models
Command (CPU, ~2-3 min, tiny widths):      python -m experiments.series_models --quick
Full dataset:                             python -m experiments.series_models --data /path/to/oxford-iiit-pet

Recipe (one ``FitConfig`` per model): 128x128, 20 epochs, batch 64, cross-entropy, random
horizontal flip + colour jitter (contrast 0.3) inside the train step, Adam with StepLR (CNNs: lr
1e-3, step 7 epochs, gamma 0.7 as Part 2; ViT and SegFormer: lr 4e-4, step 12, gamma 0.8 as
Part 4). Device, precision, layout and compilation as ``fseg train`` resolves them (on CUDA:
bf16 autocast, channels-last, compiled steps; on CPU: fp32, NCHW, eager). The checkpoint is
selected on the validation split carved from trainval, then scored once on the official test
split without augmentation: pixel accuracy, macro mean IoU, per-class IoU, the series' IoU
(micro, BACKGROUND ignored) and custom IoU; params and mult-adds from ``functional_seg.summary``;
inference latency = median ms of one eval forward of a batch of 64.

Writes ``<out>/series_models_<device-kind>.{json,md}``, ``series_models_<device-kind>_curves.png``
(per-epoch curves) and ``series_models_<device-kind>_predictions.png`` (image / truth / each model).
"""

from __future__ import annotations

import sys

from . import _common as C
from . import harness as H
from .figures import write_figures

EXPERIMENT = "series_models"
CNN = (1e-3, 7, 0.7)
TRANSFORMER = (4e-4, 12, 0.8)

# name -> (registry name, cfg, (lr, StepLR step, gamma)); the full sizes are the library's defaults (the series').
FULL = {
    "segnet": ("segnet", {}, CNN),
    "segnet_dsc": ("segnet_dsc", {}, CNN),
    "vit": ("vit", {}, TRANSFORMER),
    "segformer": ("segformer", {}, TRANSFORMER),
    "unet": ("unet", {}, CNN),
}
QUICK = {
    "segnet": ("segnet", {"widths": (8, 16, 32, 32)}, CNN),
    "segnet_dsc": ("segnet_dsc", {"widths": (8, 16, 32, 32)}, CNN),
    "vit": ("vit", {"patch_size": 8, "dim": 64, "depth": 2, "num_heads": 4, "mlp_dim": 128}, TRANSFORMER),
    "segformer": ("segformer", {"dims": (16, 32, 64, 96), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4),
                                "decoder_dim": 64}, TRANSFORMER),
    "unet": ("unet", {"base_width": 8, "depth": 3}, CNN),
}

COLUMNS = [
    ("model", "model"), ("params", "params"), ("gmacs", "GMACs/img"), ("val_mean_iou", "val mIoU"),
    ("best_epoch", "best epoch"), ("pixel_accuracy", "test pixel acc"), ("mean_iou", "test mIoU"),
    ("iou_pet", "IoU pet"), ("iou_background", "IoU bg"), ("iou_border", "IoU border"),
    ("series_iou", "series IoU"), ("custom_iou", "custom IoU"), ("train_s", "train s"),
    ("latency_ms", "latency ms (b64)"),
]


def parse_args(argv=None):
    p = C.experiment_parser(__doc__.split("\n")[0], epochs=20, size=128, batch_size=64)
    p.add_argument("--models", default=",".join(FULL), help="comma-separated subset of " + ", ".join(FULL))
    return H.finish_args(p.parse_args(argv), quick_epochs=2, quick_batch=16)


def config(name: str, args):
    """The series' ``FitConfig`` for model ``name`` (CE, flip + contrast jitter, Adam + StepLR)."""
    from functional_seg.data import augment_preset

    lr, step, gamma = (QUICK if args.quick else FULL)[name][2]
    return C.fit_config(args, loss="ce", augment=augment_preset("flip_jitter"),
                        optimizer=C.step_schedule(lr, step, gamma))


def run_one(name: str, args, splits, stem: str) -> dict:
    from functional_seg.models import create_model

    registry_name, cfg, _ = (QUICK if args.quick else FULL)[name]
    if registry_name == "vit":
        cfg = {**cfg, "image_size": args.size}
    model = create_model(registry_name, **cfg)
    cost = C.model_cost(model, args.size)
    fit_cfg = config(name, args)
    res = C.run_config(name, model, fit_cfg, splits, args, stem, latency=True)
    return {**res, **cost, "cfg": cfg, "optimizer": fit_cfg.optimizer}


def render(args, prov, results: dict, data_note) -> tuple[dict, str]:
    rows = [{"model": name, **r} for name, r in results.items()]
    md = H.md_header(
        f"Series models at {args.size}x{args.size}, {args.epochs} epochs", prov,
        notes=[
            data_note, C.PROTOCOL_NOTE,
            f"recipe: batch {args.batch_size}, CE, flip + contrast jitter 0.3 in the step, Adam + StepLR "
            "(CNNs 1e-3 / 7 / 0.7; ViT, SegFormer 4e-4 / 12 / 0.8); `fit` resolves device, precision, layout "
            f"and compile (--compile {args.compile}); train s = the epochs' training time from metrics.jsonl",
            C.METRICS_NOTE,
            "quick run: tiny widths (see JSON cfg), not the series' models" if args.quick
            else "models at the library's defaults (the series' sizes; SegFormer MiT-B0, U-Net base 64)",
        ],
    )
    md += "\n" + H.md_table(rows, COLUMNS) + "\n"
    return H.payload(EXPERIMENT, prov, args, results), md


def main(argv=None) -> int:
    args = parse_args(argv)
    budget, prov, stem = H.start(args, EXPERIMENT)
    splits, data_note = C.experiment_splits(args)
    results: dict[str, dict] = {}
    for name in H.names(args.models, FULL):
        results[name] = H.run_budgeted(name, lambda name=name: run_one(name, args, splits, stem), budget)
        H.write_results(args.out, stem, *render(args, prov, results, data_note))
    if not args.no_figures:
        ok = {n: r for n, r in results.items() if r.get("status") == "ok"}
        write_figures(ok, ok, splits.test, args.out, stem, loss_label="train loss (CE)",
                        title=f"series models, {args.size}px, {prov['device_name']}")
    print(H.md_table([{"model": n, **r} for n, r in results.items()], COLUMNS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
