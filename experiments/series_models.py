"""The series' models side by side: SegNet (Part 2), depthwise-separable SegNet (Part 3), the ViT (Part 4),
SegFormer (MiT-B0) and U-Net, trained with the series' recipe and scored on the clean official test split.

Command (GPU, ~1.5-3 min on an H100/H200):  python experiments/series_models.py
Command (CPU, ~1-2 min, tiny widths):        python experiments/series_models.py --quick
Full dataset:                               python experiments/series_models.py --data /path/to/oxford-iiit-pet

Recipe: 128x128, 20 epochs, batch 64, cross-entropy, random horizontal flip + colour jitter
(contrast 0.3) inside the train step, Adam with StepLR (CNNs: lr 1e-3, step 7 epochs, gamma 0.7
as Part 2; ViT and SegFormer: lr 4e-4, step 12, gamma 0.8 as Part 4). Eager steps (no compile
time per model) with bf16 autocast on CUDA, fp32 on CPU. Metrics on the official test split
without augmentation: pixel accuracy, macro mean IoU, per-class IoU, the series' IoU (micro,
BACKGROUND ignored) and custom IoU; params and mult-adds from ``functional_seg.summary``;
inference latency = median ms of one eval forward of a batch of 64.

Writes ``<out>/series_models_<device-kind>.{json,md}``, ``series_models_<device-kind>_curves.png``
(per-epoch curves) and ``series_models_<device-kind>_predictions.png`` (image / truth / each model).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

EXPERIMENT = "series_models"
CNN_OPT = C.step_schedule(1e-3, 7, 0.7)
TRANSFORMER_OPT = C.step_schedule(4e-4, 12, 0.8)

# name -> (registry name, cfg, optimizer); the full sizes are the library's defaults (the series').
FULL = {
    "segnet": ("segnet", {}, CNN_OPT),
    "segnet_dsc": ("segnet_dsc", {}, CNN_OPT),
    "vit": ("vit", {}, TRANSFORMER_OPT),
    "segformer": ("segformer", {}, TRANSFORMER_OPT),
    "unet": ("unet", {}, CNN_OPT),
}
QUICK = {
    "segnet": ("segnet", {"widths": (8, 16, 32, 32)}, CNN_OPT),
    "segnet_dsc": ("segnet_dsc", {"widths": (8, 16, 32, 32)}, CNN_OPT),
    "vit": ("vit", {"patch_size": 8, "dim": 64, "depth": 2, "num_heads": 4, "mlp_dim": 128}, TRANSFORMER_OPT),
    "segformer": ("segformer", {"dims": (16, 32, 64, 96), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4),
                                "decoder_dim": 64}, TRANSFORMER_OPT),
    "unet": ("unet", {"base_width": 8, "depth": 3}, CNN_OPT),
}

COLUMNS = [
    ("model", "model"), ("params", "params"), ("gmacs", "GMACs/img"), ("pixel_accuracy", "pixel acc"),
    ("mean_iou", "mean IoU"), ("iou_pet", "IoU pet"), ("iou_background", "IoU bg"), ("iou_border", "IoU border"),
    ("series_iou", "series IoU"), ("custom_iou", "custom IoU"), ("train_s", "train s"),
    ("latency_ms", "latency ms (b64)"),
]


def parse_args(argv=None):
    p = C.base_parser(__doc__.split("\n")[0], epochs=20, size=128, batch_size=64)
    p.add_argument("--models", default=",".join(FULL), help="comma-separated subset of " + ", ".join(FULL))
    p.add_argument("--compile", action="store_true", help="compile the train/eval steps (adds compile time)")
    return C.finish_args(p.parse_args(argv), quick_epochs=2, quick_batch=16)


def run_one(name: str, args, train, test) -> dict:
    from functional_seg.losses import get_loss
    from functional_seg.models import create_model

    registry_name, cfg, opt = (QUICK if args.quick else FULL)[name]
    if registry_name == "vit":
        cfg = {**cfg, "image_size": args.size}
    model = create_model(registry_name, **cfg)
    cost = C.model_cost(model, args.size)
    res = C.train_and_evaluate(
        model, train=train, test=test, device=args.device, epochs=args.epochs, batch_size=args.batch_size,
        loss_fn=get_loss("ce"), augment="flip_jitter", optimizer_cfg=opt, seed=args.seed, compile=args.compile,
        label=name,
    )
    res.update(cost)
    res["gmacs"] = cost["mult_adds"] / 1e9 if cost.get("mult_adds") else None
    res["cfg"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    res["optimizer"] = opt
    return res


def render(args, prov, results: dict, n_train: int, n_test: int) -> tuple[dict, str]:
    rows = [{"model": name, **r} for name, r in results.items()]
    md = C.md_header(
        f"Series models at {args.size}x{args.size}, {args.epochs} epochs", prov,
        notes=[
            f"data: `{args.data}`: {n_train} trainval / {n_test} test (official split); clean test metrics",
            f"recipe: batch {args.batch_size}, CE, flip + contrast jitter 0.3 in the step, Adam + StepLR "
            "(CNNs 1e-3 / 7 / 0.7; ViT, SegFormer 4e-4 / 12 / 0.8), eager steps, "
            + ("bf16 autocast" if args.device.type == "cuda" else "fp32"),
            "mean IoU = macro over the 3 classes; series IoU = micro Jaccard with BACKGROUND ignored; "
            "custom IoU = the series' per-image soft IoU (+0.001)",
            "quick run: tiny widths (see JSON cfg), not the series' models" if args.quick
            else "models at the library's defaults (the series' sizes; SegFormer MiT-B0, U-Net base 64)",
        ],
    )
    md += "\n" + C.md_table(rows, COLUMNS) + "\n"
    return C.payload(EXPERIMENT, prov, args, results), md


def main(argv=None) -> int:
    args = parse_args(argv)
    budget, prov, stem = C.start(args, EXPERIMENT)
    train, test = C.load_splits(args.data, args.size, train_limit=args.train_limit, test_limit=args.test_limit)
    results: dict[str, dict] = {}
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for name in names:
        if name not in FULL:
            results[name] = {"status": f"failed: unknown model {name!r}"}
            continue
        results[name] = C.run_budgeted(name, lambda name=name: run_one(name, args, train, test), budget)
        C.write_results(args.out, stem, *render(args, prov, results, len(train), len(test)))

    C.write_results(args.out, stem, *render(args, prov, results, len(train), len(test)))
    if not args.no_figures:
        ok = {n: r for n, r in results.items() if r.get("status") == "ok"}
        C.write_figures(ok, ok, test, args.out, stem, loss_label="train loss (CE)",
                        title=f"series models, {args.size}px, {prov['device_name']}")
    print(C.md_table([{"model": n, **r} for n, r in results.items()], COLUMNS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
