"""The experiments' protocol over ``fit``: one ``FitConfig`` per variant, trained in its own run
directory, the checkpoint selected on validation and the official test split scored once, then
tables and figures (the shared harness, arguments and results files, is ``harness.py``).

An experiment is a list of ``FitConfig`` s (see ``fit_config``); :func:`run_config` trains each
with ``functional_seg.train.fit`` on ``Splits`` from ``data.splits.split_data`` (validation
carved from trainval, as ``fseg train`` does). ``fit`` itself scores the test split once with the
selected checkpoint through ``train.evaluate_checkpoint``, the same call ``fseg eval`` makes, with
the one weight policy of ``models.load_checkpoint`` (each member's raw or EMA weights, whichever
validated higher). Device, precision, layout and compilation are resolved by
``functional_seg.runtime`` inside ``fit``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .harness import REPO, base_parser, command_line, median_ms

DEFAULT_RUNS = REPO / "runs" / "experiments"


def experiment_parser(description: str, *, epochs: int, size: int, batch_size: int) -> argparse.ArgumentParser:
    """``base_parser`` plus what a run through ``fit`` needs: validation carve, run folders, compile."""
    p = base_parser(description, epochs=epochs, size=size, batch_size=batch_size)
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of trainval carved (seeded by --seed) as the validation split that selects the "
                        "checkpoint; the official test split is evaluated once at the end")
    p.add_argument("--runs", type=Path, default=DEFAULT_RUNS,
                   help="parent of the run directories (checkpoints, metrics.jsonl); each run's folder is replaced")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="compile the steps (auto: on for CUDA, as fseg train)")
    p.add_argument("--max-steps", type=int, default=None, help="stop every run after N steps (smoke tests)")
    return p


def experiment_splits(args: argparse.Namespace):
    """trainval (first ``--train-limit``) carved into train / val by ``--val-fraction`` and ``--seed``,
    and the official test split (first ``--test-limit``): ``data.splits.split_data``, as ``fseg train``."""
    from functional_seg.data.splits import DataConfig, split_data

    t0 = time.perf_counter()
    cfg = DataConfig(size=args.size, val_fraction=args.val_fraction, limit=args.train_limit,
                     test_limit=args.test_limit)
    splits = split_data(args.data, cfg, seed=args.seed)
    note = (f"data `{args.data}`: train {len(splits.train)} + val {len(splits.val)} (carved from trainval, fraction "
            f"{args.val_fraction}, seed {args.seed}) / test {len(splits.test)} (official test split)")
    print(f"{note} at {args.size} px ({time.perf_counter() - t0:.1f} s)", flush=True)
    return splits, note


PROTOCOL_NOTE = ("protocol: the checkpoint is selected on the validation split (best val mean IoU over the "
                 "epochs: column `val mIoU`); every other figure is the official **test** split, evaluated once "
                 "with that checkpoint by `train.evaluate` (what `fseg eval` prints), without augmentation")
METRICS_NOTE = ("mean IoU = macro over the 3 classes; series IoU = micro Jaccard with BACKGROUND ignored; "
                "custom IoU = the series' per-image soft IoU (+0.001); all from `metrics.summarize` via `evaluate`")


# ----------------------------------------------------------------------------------------------
# One config through fit


def fit_config(args: argparse.Namespace, **fields):
    """A ``FitConfig`` with the script's epochs, batch, seed, device and compile, and ``fields``."""
    from functional_seg.train import FitConfig

    compile_ = {"auto": "auto", "on": True, "off": False}[getattr(args, "compile", "auto")]
    base = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "device": str(args.device),
            "compile": compile_, "log_every": 50, "max_steps": getattr(args, "max_steps", None)}
    return FitConfig(**{**base, **fields})


def step_schedule(lr: float, step_size: int, gamma: float):
    """Adam + StepLR(step_size epochs, gamma), as the series ran it."""
    from functional_seg.train import OptimizerConfig

    return OptimizerConfig(name="adam", lr=lr, schedule="step", step_size=step_size, gamma=gamma)


class _EpochLines:
    """A ``fit`` hook: one line per epoch, prefixed with the variant's label."""

    def __init__(self, label: str):
        self.label = label

    def on_epoch_end(self, record: dict, epochs: int) -> None:
        from functional_seg.train.log import epoch_line

        print(f"[{self.label}] {epoch_line(record, epochs)}", flush=True)


def _shown(path: str | Path) -> str:
    """``path`` relative to the repository when inside it (tables stay machine-independent)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _fresh_run_dir(path: Path) -> Path:
    """``path`` emptied of an earlier run of the same variant (never a folder that is not a run)."""
    if path.exists():
        if any(path.iterdir()) and not (path / "config.json").exists():
            raise SystemExit(f"{path} exists and holds no run (no config.json); choose another --runs")
        shutil.rmtree(path)
    return path


def metrics_row(summary: dict, class_names: Sequence[str]) -> dict:
    """The table's figures of one ``evaluate`` summary (all from ``metrics.summarize``)."""
    row = {k: summary.get(k) for k in ("pixel_accuracy", "mean_iou", "series_iou", "mean_dice", "iou",
                                       "mean_boundary_iou", "ece")}
    row["custom_iou"] = summary.get("series_custom_iou")
    for name, value in zip(class_names, summary["iou"]):
        row[f"iou_{name}"] = value
    return row


def _curve(history: list[dict], member: int | None) -> list[dict]:
    pick = (lambda v: v) if member is None else (lambda v: v[member] if isinstance(v, list) else v)
    out = []
    for r in history:
        val = pick(r.get("val")) or {}
        out.append({"epoch": r["epoch"], "train_loss": pick(r["train_loss"]), "lr": pick(r.get("lr")),
                    "val_pixel_accuracy": val.get("pixel_accuracy"), "val_mean_iou": val.get("mean_iou"),
                    "train_s": r.get("train_time_s"), "eval_s": r.get("eval_time_s")})
    return out


def inference_latency(loaded, device: torch.device, *, batch: int = 64, iters: int = 10) -> float:
    """Median ms of one eval forward of ``batch`` images as the checkpoint's ``Preprocess`` feeds them
    under the device's runtime (``runtime.resolve_runtime``: precision and layout)."""
    from functional_seg.runtime import resolve_runtime

    runtime = resolve_runtime(device)
    pre = loaded.preprocess
    images = torch.randint(0, 256, (batch, 3, pre.size, pre.size), dtype=torch.uint8, device=device)
    x = pre.model_input(images)

    def forward():
        with torch.no_grad(), runtime.autocast():
            return loaded.model.apply(loaded.params, loaded.state, x, train=False)[0]

    return median_ms(forward, device, warmup=2, iters=iters)


def predict_labels(loaded, device: torch.device, images_u8: torch.Tensor) -> torch.Tensor:
    """Label maps int64 [N, S, S] for uint8 [N, 3, S, S] through the library's ``Predictor``."""
    from functional_seg.predict import Predictor
    from functional_seg.runtime import resolve_runtime

    predictor = Predictor.from_checkpoint(loaded, resolve_runtime(device), batch_size=len(images_u8))
    logits = predictor.logits([im.permute(1, 2, 0).numpy() for im in images_u8])
    return torch.stack([one.argmax(dim=0) for one in logits])


def run_config(label: str, model, config, splits, args: argparse.Namespace, stem: str, *,
               latency: bool = False, best_member: bool = False, n_show: int = 4) -> dict:
    """Train ``model`` with ``fit(config)`` on ``splits``; ``fit`` scores the test split once with the
    selected checkpoint (``best.safetensors``, selected on validation only) and its validated weights.

    Returns:
        For one model (or ``best_member``: the member that validated best), its row: test metrics
        (``metrics_row``), ``best_epoch``, ``weights``, ``train_s`` (sum of the epochs' training time
        from ``metrics.jsonl``, evaluation excluded), ``first_epoch_s``, ``checkpoint``, ``history``
        (per-epoch curve) and ``_preds`` (labels of the first test images, for the figure). For an
        ensemble otherwise, ``{"members": [row, ...], "train_s": ..., ...}``.
    """
    from functional_seg.models import load_checkpoint
    from functional_seg.train import fit

    run_dir = _fresh_run_dir(args.runs / stem / label)
    record = {"experiment": stem, "variant": label, "command": command_line()}
    result = fit(model, splits, config, out_dir=run_dir, hooks=[_EpochLines(label)], args=record)
    chosen, test = result.selected_checkpoint, result.test
    train_times = [r.get("train_time_s") or 0.0 for r in result.history]
    shared = {"train_s": sum(train_times), "first_epoch_s": train_times[0] if train_times else None,
              "best_epoch": result.best_epoch, "val_mean_iou": result.best_mean_iou, "checkpoint": _shown(chosen),
              "steps": result.step}
    device = torch.device(config.device) if config.device != "auto" else result.train_state.step.device
    members = [None] if not config.members else (
        [load_checkpoint(chosen, member="auto").member] if best_member else list(range(config.members)))
    rows = []
    for i in members:
        loaded = load_checkpoint(chosen, device=device, member=0 if i is None else i)
        summary = test["summary"] if i is None else test["summary"][i]
        row = metrics_row(summary, loaded.preprocess.class_names)
        row.update(shared, member=i, weights=loaded.weights[0], history=_curve(result.history, i))
        row["_preds"] = predict_labels(loaded, device, splits.test.gather(range(n_show))[0])
        if latency and not rows:
            row["latency_ms"] = inference_latency(loaded, device, iters=10 if device.type == "cuda" else 3)
        rows.append(row)
    return rows[0] if not config.members or best_member else {"members": rows, **shared}


def model_cost(model, size: int) -> dict:
    """Parameters and mult-adds per image from ``functional_seg.summary``."""
    from functional_seg.summary import summarize

    totals = summarize(model, input_size=(size, size), batch_size=1).totals()
    return {"params": int(totals["total_params"]), "mult_adds": int(totals["total_mult_adds"]),
            "gmacs": int(totals["total_mult_adds"]) / 1e9}
