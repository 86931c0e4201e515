"""One model, seven losses: cross-entropy, soft IoU (1 - M), soft IoU (-log M), Dice, Tversky, focal and
CE + Dice; plus one vmapped sweep that trains CE + w * Dice for several w in a single step.

Command (GPU, ~1-1.5 min on an H100/H200):  python experiments/loss_comparison.py
Command (CPU, ~1-2 min, tiny widths):        python experiments/loss_comparison.py --quick

Every run uses the same init, data order and augmentation draws (same seed), the series' recipe
otherwise (128 px, 20 epochs, batch 64, flip + contrast jitter, Adam 1e-3 + StepLR(7, 0.7)),
eager steps, bf16 autocast on CUDA. The sweep stacks K train states with ``init_ensemble(...,
sweep={"dice_weight": [...]}, same_init=True)`` and trains them with ``ensemble_step`` (a
``torch.func.vmap`` of the train step over the stack, one shared batch); the weight reaches the
loss as a tensor hyperparameter, so the members differ only by it. The members with w = 0 and
w = 1 repeat the CE and CE + Dice runs, a check on the vmapped step.

Writes ``<out>/loss_comparison_<device-kind>.{json,md}``, ``..._curves.png`` and ``..._predictions.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

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
    ("loss", "loss"), ("pixel_accuracy", "pixel acc"), ("mean_iou", "mean IoU"), ("iou_pet", "IoU pet"),
    ("iou_background", "IoU bg"), ("iou_border", "IoU border"), ("series_iou", "series IoU"),
    ("custom_iou", "custom IoU"), ("train_s", "train s"),
]


def parse_args(argv=None):
    p = C.base_parser(__doc__.split("\n")[0], epochs=20, size=128, batch_size=64)
    p.add_argument("--model", default="segnet", help="registry name (quick: tiny widths)")
    p.add_argument("--losses", default=",".join(LOSSES), help="comma-separated subset of " + ", ".join(LOSSES))
    p.add_argument("--sweep", default=",".join(map(str, SWEEP_WEIGHTS)),
                   help="dice weights of the vmapped CE + w * Dice sweep ('' to skip)")
    return C.finish_args(p.parse_args(argv), quick_epochs=2, quick_batch=16)


def make_model(args):
    from functional_seg.models import create_model

    return create_model(args.model, **(QUICK_CFG if args.quick and args.model.startswith("segnet") else {}))


def ce_weighted_dice(logits, target, dice_weight):
    """CE + w * Dice with w a (possibly vmapped) 0-d tensor hyperparameter."""
    from functional_seg.losses import get_loss

    return get_loss("ce")(logits, target) + dice_weight * get_loss("dice")(logits, target)


def run_loss(name: str, args, train, test) -> dict:
    from functional_seg.losses import get_loss

    return C.train_and_evaluate(
        make_model(args), train=train, test=test, device=args.device, epochs=args.epochs,
        batch_size=args.batch_size, loss_fn=get_loss(name), augment="flip_jitter",
        optimizer_cfg=C.step_schedule(1e-3, 7, 0.7), seed=args.seed, label=name,
        latency=False,
    )


def run_sweep(weights: list[float], args, train, test) -> dict:
    return C.train_and_evaluate(
        make_model(args), train=train, test=test, device=args.device, epochs=args.epochs,
        batch_size=args.batch_size, loss_fn=ce_weighted_dice, augment="flip_jitter",
        optimizer_cfg=C.step_schedule(1e-3, 7, 0.7), seed=args.seed, label="sweep",
        latency=False, ensemble={"sweep": {"dice_weight": weights}, "same_init": True},
    )


def render(args, prov, results: dict, sweep: dict | None, weights, n_train, n_test) -> tuple[dict, str]:
    ranked = sorted(results, key=lambda n: list(LOSSES).index(n) if n in LOSSES else len(LOSSES))
    rows = [{"loss": LOSSES.get(n, n), **results[n]} for n in ranked]
    md = C.md_header(
        f"Loss comparison: {args.model} at {args.size}x{args.size}, {args.epochs} epochs", prov,
        notes=[
            f"data: `{args.data}`: {n_train} trainval / {n_test} test (official split); clean test metrics",
            f"model cfg: {QUICK_CFG if args.quick else 'series defaults'}; batch {args.batch_size}; flip + contrast "
            "jitter; Adam 1e-3 + StepLR(7, 0.7); same seed for every run; eager, "
            + ("bf16 autocast" if args.device.type == "cuda" else "fp32"),
        ],
    )
    md += "\n" + C.md_table(rows, COLUMNS) + "\n"
    if sweep is not None:
        md += f"\n## vmapped sweep: CE + w * Dice, K = {len(weights)} members in one step\n\n"
        if sweep.get("status", "ok") != "ok":
            md += f"{sweep['status']}\n"
        else:
            srows = []
            for w, m in zip(weights, sweep["members"]):
                twin = {0.0: "ce", 1.0: "ce_dice"}.get(float(w))
                ref = results.get(twin, {}) if twin else {}
                delta = (m["mean_iou"] - ref["mean_iou"]) if ref.get("mean_iou") is not None else None
                srows.append({"loss": f"w = {w}", **m, "delta": delta})
            md += C.md_table(srows, COLUMNS[:-1] + [("delta", "mean IoU - single run")]) + "\n"
            singles = sum(r.get("train_s", 0) for n, r in results.items() if n in ("ce", "ce_dice"))
            md += (f"\nsweep train time {sweep['train_s']:.1f} s for {len(weights)} members "
                   f"({sweep['train_s'] / len(weights):.1f} s per member; the single CE and CE + Dice runs "
                   f"took {singles:.1f} s together)\n")
    return C.payload(EXPERIMENT, prov, args, results, sweep=C.strip_private(sweep), sweep_weights=weights), md


def main(argv=None) -> int:
    args = parse_args(argv)
    budget, prov, stem = C.start(args, EXPERIMENT, f", model {args.model}")
    train, test = C.load_splits(args.data, args.size, train_limit=args.train_limit, test_limit=args.test_limit)
    weights = [float(w) for w in args.sweep.split(",") if w.strip()]
    results: dict[str, dict] = {}
    sweep = None

    def save():
        C.write_results(args.out, stem, *render(args, prov, results, sweep, weights, len(train), len(test)))

    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    # CE and CE + Dice first, then the sweep (its members w = 0 and 1 repeat them), then the rest:
    # under a time budget the sweep is not the part that gets skipped.
    first = [n for n in names if n in ("ce", "ce_dice")]
    order = first + ["<sweep>"] + [n for n in names if n not in first]
    for name in order:
        if name == "<sweep>":
            if weights:
                sweep = C.run_budgeted("sweep", lambda: run_sweep(weights, args, train, test), budget)
                save()
            continue
        results[name] = C.run_budgeted(name, lambda name=name: run_loss(name, args, train, test), budget)
        save()
    save()
    if not args.no_figures:
        ok = {LOSSES.get(n, n): r for n, r in results.items() if r.get("status") == "ok"}
        if sweep and sweep.get("status") == "ok":
            ok.update({f"sweep w={w}": m for w, m in zip(weights, sweep["members"])})
        single_runs = {n: r for n, r in ok.items() if not n.startswith("sweep")}
        C.write_figures(ok, single_runs, test, args.out, stem, loss_label="train loss (own scale)",
                        title=f"losses, {args.model} {args.size}px, {prov['device_name']}")
    print(C.md_table([{"loss": n, **r} for n, r in results.items()], COLUMNS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
