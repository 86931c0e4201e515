"""One model, seven losses: cross-entropy, soft IoU (1 - M), soft IoU (-log M), Dice, Tversky, focal and
CE + Dice; plus one vmapped sweep that trains CE + w * Dice for several w in a single step.

Command (GPU, ~1.5-2 min on an H100/H200):  python -m experiments.loss_comparison
Command (CPU, ~3 min, tiny widths):          python -m experiments.loss_comparison --quick

One ``FitConfig`` per loss, equal but for ``loss``: same init, data order and augmentation draws
(same seed), the series' recipe otherwise (128 px, 20 epochs, batch 64, flip + contrast jitter,
Adam 1e-3 + StepLR(7, 0.7)), run by ``fit`` as ``fseg train`` runs it. The sweep is one more
config, ``FitConfig(loss="ce_dice", sweep={"loss_weight": (w1, ..., wK)})``: ``fit`` stacks K
train states and trains them with one ``torch.func.vmap``ped step (one shared batch); the
weight reaches the loss as a tensor hyperparameter. Each member draws its own init (``fit``
splits the init key K ways), so members w = 0 and w = 1 repeat the CE and CE + Dice runs only up
to the spread between inits. Every checkpoint is selected on the validation split carved from
trainval (the sweep's members together, on their mean); scores are on the official test split.

Writes ``<out>/loss_comparison_<device-kind>.{json,md}``, ``..._curves.png`` and ``..._predictions.png``.
"""

from __future__ import annotations

import sys

from . import _common as C
from . import harness as H
from .figures import write_figures

EXPERIMENT = "loss_comparison"
LOSSES = {
    "ce": "cross-entropy",
    "soft_iou": "soft IoU (1 - M)",
    "soft_iou_log": "soft IoU (-log M)",
    "dice": "Dice",
    "tversky": "Tversky (0.3 / 0.7)",
    "focal": "focal (gamma 2)",
    "ce_dice": "CE + Dice",
}
QUICK_CFG = {"widths": (8, 16, 32, 32)}
SWEEP_WEIGHTS = (0.0, 0.5, 1.0, 2.0)
COLUMNS = [
    ("loss", "loss"), ("val_mean_iou", "val mIoU"), ("best_epoch", "best epoch"),
    ("pixel_accuracy", "test pixel acc"), ("mean_iou", "test mIoU"), ("iou_pet", "IoU pet"),
    ("iou_background", "IoU bg"), ("iou_border", "IoU border"), ("series_iou", "series IoU"),
    ("custom_iou", "custom IoU"), ("train_s", "train s"),
]


def parse_args(argv=None):
    p = C.experiment_parser(__doc__.split("\n")[0], epochs=20, size=128, batch_size=64)
    p.add_argument("--model", default="segnet", help="registry name (quick: tiny widths)")
    p.add_argument("--losses", default=",".join(LOSSES), help="comma-separated subset of " + ", ".join(LOSSES))
    p.add_argument("--sweep", default=",".join(map(str, SWEEP_WEIGHTS)),
                   help="dice weights of the vmapped CE + w * Dice sweep ('' to skip)")
    return H.finish_args(p.parse_args(argv), quick_epochs=2, quick_batch=16)


def make_model(args):
    from functional_seg.models import create_model

    return create_model(args.model, **(QUICK_CFG if args.quick and args.model.startswith("segnet") else {}))


def config(args, **fields):
    from functional_seg.data import augment_preset

    return C.fit_config(args, augment=augment_preset("flip_jitter"), optimizer=C.step_schedule(1e-3, 7, 0.7),
                        **fields)


def run_loss(name: str, args, splits, stem: str) -> dict:
    return C.run_config(name, make_model(args), config(args, loss=name), splits, args, stem)


def run_sweep(weights: list[float], args, splits, stem: str) -> dict:
    cfg = config(args, loss="ce_dice", sweep={"loss_weight": tuple(weights)})
    return C.run_config("sweep", make_model(args), cfg, splits, args, stem)


def render(args, prov, results: dict, sweep: dict | None, weights, data_note) -> tuple[dict, str]:
    ranked = sorted(results, key=lambda n: list(LOSSES).index(n) if n in LOSSES else len(LOSSES))
    rows = [{"loss": LOSSES.get(n, n), **results[n]} for n in ranked]
    md = H.md_header(
        f"Loss comparison: {args.model} at {args.size}x{args.size}, {args.epochs} epochs", prov,
        notes=[
            data_note, C.PROTOCOL_NOTE,
            f"model cfg: {QUICK_CFG if args.quick else 'series defaults'}; batch {args.batch_size}; flip + contrast "
            f"jitter; Adam 1e-3 + StepLR(7, 0.7); same seed for every run; run by `fit` (--compile {args.compile})",
            C.METRICS_NOTE,
        ],
    )
    md += "\n" + H.md_table(rows, COLUMNS) + "\n"
    if sweep is not None:
        md += (f"\n## vmapped sweep: CE + w * Dice, K = {len(weights)} members in one step "
               "(`sweep={\"loss_weight\": ...}`)\n\n")
        if sweep.get("status", "ok") != "ok":
            md += f"{sweep['status']}\n"
        else:
            srows = []
            for w, m in zip(weights, sweep["members"]):
                twin = {0.0: "ce", 1.0: "ce_dice"}.get(float(w))
                ref = results.get(twin, {}) if twin else {}
                delta = (m["mean_iou"] - ref["mean_iou"]) if ref.get("mean_iou") is not None else None
                srows.append({"loss": f"w = {w}", **m, "delta": delta})
            md += H.md_table(srows, COLUMNS[:-1] + [("delta", "test mIoU - single run")]) + "\n"
            singles = sum(r.get("train_s", 0) for n, r in results.items() if n in ("ce", "ce_dice"))
            md += (f"\nsweep train time {sweep['train_s']:.1f} s for {len(weights)} members "
                   f"({sweep['train_s'] / len(weights):.1f} s per member; the single CE and CE + Dice runs "
                   f"took {singles:.1f} s together). The members' inits differ from the single runs' (fit "
                   "splits the init key K ways), so the delta column is init spread, not an error.\n")
    return H.payload(EXPERIMENT, prov, args, results, sweep=H.strip_private(sweep), sweep_weights=weights), md


def main(argv=None) -> int:
    args = parse_args(argv)
    budget, prov, stem = H.start(args, EXPERIMENT, f", model {args.model}")
    splits, data_note = C.experiment_splits(args)
    weights = [float(w) for w in args.sweep.split(",") if w.strip()]
    results: dict[str, dict] = {}
    sweep = None

    def save():
        H.write_results(args.out, stem, *render(args, prov, results, sweep, weights, data_note))

    chosen = H.names(args.losses, LOSSES)
    # CE and CE + Dice first, then the sweep (its members w = 0 and 1 repeat them), then the rest:
    # under a time budget the sweep is not the part that gets skipped.
    first = [n for n in chosen if n in ("ce", "ce_dice")]
    for name in first + ["<sweep>"] + [n for n in chosen if n not in first]:
        if name == "<sweep>":
            if weights:
                sweep = H.run_budgeted("sweep", lambda: run_sweep(weights, args, splits, stem), budget)
                save()
            continue
        results[name] = H.run_budgeted(name, lambda name=name: run_loss(name, args, splits, stem), budget)
        save()
    if not args.no_figures:
        ok = {LOSSES.get(n, n): r for n, r in results.items() if r.get("status") == "ok"}
        if sweep and sweep.get("status") == "ok":
            ok.update({f"sweep w={w}": m for w, m in zip(weights, sweep["members"])})
        single_runs = {n: r for n, r in ok.items() if not n.startswith("sweep")}
        write_figures(ok, single_runs, splits.test, args.out, stem, loss_label="train loss (own scale)",
                        title=f"losses, {args.model} {args.size}px, {prov['device_name']}")
    print(H.md_table([{"loss": n, **r} for n, r in results.items()], COLUMNS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
