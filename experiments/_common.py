"""What the experiments share on top of the library: arguments, provenance, splits, one config
run through ``fit``, results tables and figures.

An experiment is a list of ``FitConfig`` s (see ``fit_config``); :func:`run_config` trains each
with ``functional_seg.train.fit`` in its own run directory (``--runs``), selects the checkpoint on
the validation split carved from trainval (``PreparedData.carve``, as ``fseg train`` does), then
evaluates that checkpoint once on the official test split with ``train.evaluate``, exactly as
``fseg eval`` would (same loader, preprocessing contract and ``metrics.summarize``). Device,
precision, layout and compilation are resolved by ``functional_seg.runtime`` inside ``fit``;
files are written by ``functional_seg.core.files``.

Every script takes the same core flags (``--data``, ``--device``, ``--quick``, ``--out``, ...),
records the device name, torch version and the exact command line in each table, and writes
``<experiment>_<device-kind>.{json,md}`` where the device kind is ``cuda``, ``cpu`` or either with
``_quick``. One failing variant is recorded as ``failed: <message>`` and the run goes on
(``guarded``). The figures are drawn by ``figures.py``.

The benchmarks in ``benchmarks/`` import this file too (as ``_common``, with ``experiments/`` on
their path): ``load_splits``, ``sync``, ``median_ms``, ``autocast`` and ``reference_module`` are
kept for them.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from functional_seg.core.files import write_atomic, write_json
from functional_seg.runtime import autocast as _runtime_autocast
from functional_seg.runtime import resolve_device, resolve_precision

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared/data/oxford-pets-sample"
DEFAULT_OUT = REPO / "experiments" / "results"
DEFAULT_RUNS = REPO / "runs" / "experiments"


# ----------------------------------------------------------------------------------------------
# Arguments, device, provenance


def base_parser(description: str, *, epochs: int, size: int, batch_size: int) -> argparse.ArgumentParser:
    """The flags every script shares; ``--quick`` shrinks sizes for a CPU run (see ``finish_args``)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("FSEG_DATA") or DEFAULT_DATA),
                   help="Oxford-IIIT Pet root (official layout); env FSEG_DATA overrides the default")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--quick", action="store_true", help="CPU sizes: 64 px, 2-3 epochs, small widths, few models")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for results JSON / Markdown / PNG")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {epochs}; quick: 2)")
    p.add_argument("--size", type=int, default=None, help=f"image side in pixels (default {size}; quick: 64)")
    p.add_argument("--batch-size", type=int, default=None, help=f"training batch (default {batch_size}; quick: 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; env FSEG_THREADS)")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training images (quick: 128)")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N test images (quick: 96)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds; variants not started by then are recorded as skipped (results stay valid)")
    p.set_defaults(_defaults={"epochs": epochs, "size": size, "batch_size": batch_size})
    return p


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


def finish_args(args: argparse.Namespace, *, quick_epochs: int = 2, quick_size: int = 64,
                quick_batch: int = 16, quick_train: int | None = 128, quick_test: int | None = 96
                ) -> argparse.Namespace:
    """Fill epochs / size / batch_size / limits from the full or the quick defaults unless given,
    and resolve ``--device`` through ``functional_seg.runtime``."""
    d = args._defaults
    if args.quick:
        args.train_limit = quick_train if args.train_limit is None else args.train_limit
        args.test_limit = quick_test if args.test_limit is None else args.test_limit
    if args.epochs is None:
        args.epochs = quick_epochs if args.quick else d["epochs"]
    if args.size is None:
        args.size = quick_size if args.quick else d["size"]
    if args.batch_size is None:
        args.batch_size = quick_batch if args.quick else d["batch_size"]
    try:
        args.device = resolve_device(args.device)
    except ValueError as err:
        raise SystemExit(f"--device: {err}") from None
    return args


def device_kind(device: torch.device, quick: bool) -> str:
    return f"{device.type}{'_quick' if quick else ''}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def command_line() -> str:
    """The command as typed: ``python -m experiments.<name> ...`` for a module run."""
    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        argv[0:1] = ["-m", spec.name]
    else:
        with contextlib.suppress(ValueError):
            argv[0] = str(Path(argv[0]).resolve().relative_to(REPO))
    return "python " + " ".join(shlex.quote(a) for a in argv)


def provenance(device: torch.device) -> dict[str, Any]:
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "command": command_line(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def set_threads(args: argparse.Namespace | None = None) -> None:
    """Leave the thread count alone unless ``--threads`` or FSEG_THREADS says otherwise (shared CPU boxes)."""
    n = getattr(args, "threads", None) or os.environ.get("FSEG_THREADS")
    if n:
        torch.set_num_threads(int(n))


def names(text: str, known: Iterable[str]) -> list[str]:
    """A comma-separated ``--models``/``--variants`` list; unknown names raise SystemExit."""
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise SystemExit(f"unknown name(s) {', '.join(unknown)}; expected some of {', '.join(known)}")
    return chosen


# ----------------------------------------------------------------------------------------------
# Failures and budgets


def short_error(err: BaseException, limit: int = 160) -> str:
    msg = f"{type(err).__name__}: {err}".replace("\n", " ").replace("|", "/")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def guarded(label: str, fn: Callable[[], dict], failures: list[str] | None = None) -> dict:
    """Run ``fn``; on any exception print the traceback and return ``{"status": "failed: ..."}``."""
    t0 = time.perf_counter()
    try:
        out = fn()
        out.setdefault("status", "ok")
        return out
    except Exception as err:  # noqa: BLE001 - one variant failing must not stop the others
        traceback.print_exc()
        msg = f"failed: {short_error(err)}"
        print(f"[{label}] {msg} (after {time.perf_counter() - t0:.1f} s)", flush=True)
        if failures is not None:
            failures.append(f"{label}: {msg}")
        return {"status": msg}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class Budget:
    """Wall-clock allowance from process start: ``left()`` seconds, ``over(reserve)`` when exhausted."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def over(self, reserve: float = 0.0) -> bool:
        return self.left() < reserve


def run_budgeted(label: str, fn: Callable[[], dict], budget: Budget, reserve: float = 5.0) -> dict:
    """One variant of an experiment: skipped once the budget is spent, else ``guarded``, timed and reported."""
    if budget.over(reserve=reserve):
        return {"status": "skipped: time budget"}
    t0 = time.perf_counter()
    result = guarded(label, fn)
    print(f"[{label}] done in {time.perf_counter() - t0:.1f} s: {result.get('status')}", flush=True)
    return result


# ----------------------------------------------------------------------------------------------
# Results files


def fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "nan"
        if abs(x) >= 1e4:
            return f"{x:,.0f}"
        if abs(x) < 1:
            return f"{x:.{digits}f}"
        return f"{x:.2f}" if abs(x) < 100 else f"{x:.1f}"
    return str(x)


def md_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table; ``columns`` are (key, header); a failed row shows its status once."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        status = row.get("status", "ok")
        if status != "ok":
            cells = [fmt(row.get(columns[0][0]))] + [status] + ["-"] * (len(columns) - 2)
        else:
            cells = [fmt(row.get(k)) for k, _ in columns]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def md_header(title: str, prov: dict, notes: Iterable[str] = ()) -> str:
    lines = [
        f"# {title}",
        "",
        f"- device: **{prov['device_name']}** (`{prov['device']}`), torch {prov['torch']}"
        + (f", CUDA {prov['cuda']}" if prov.get("cuda") and prov["device"].startswith("cuda") else ""),
        f"- python {prov['python']}, {prov['cpu_count']} CPUs, {prov['date']}",
        f"- command: `{prov['command']}`",
    ]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, stem: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    jp, mp = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_json(jp, payload)
    write_atomic(mp, markdown)
    print(f"wrote {jp.relative_to(REPO) if jp.is_relative_to(REPO) else jp} and {mp.name}", flush=True)
    return jp, mp


def strip_private(d: Any) -> Any:
    """Drop keys starting with ``_`` (tensors kept for figures) before writing JSON."""
    if isinstance(d, dict):
        return {k: strip_private(v) for k, v in d.items() if not str(k).startswith("_")}
    if isinstance(d, list):
        return [strip_private(v) for v in d]
    return d


def start(args: argparse.Namespace, experiment: str, headline: str = "", device: torch.device | None = None
          ) -> tuple[Budget, dict[str, Any], str]:
    """What every script does first: threads, time budget, provenance, the results' file stem."""
    device = device if device is not None else args.device
    set_threads(args)
    budget = Budget(args.budget)
    prov = provenance(device)
    print(f"{experiment}: {prov['device_name']}, torch {prov['torch']}{headline}", flush=True)
    return budget, prov, f"{experiment}_{device_kind(device, args.quick)}"


def payload(experiment: str, prov: dict[str, Any], args: argparse.Namespace, results: Any, **extra: Any
            ) -> dict[str, Any]:
    """The results JSON: experiment, provenance, the public arguments, results, then any extras."""
    return {"experiment": experiment, "provenance": prov,
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "results": strip_private(results), **extra}


# ----------------------------------------------------------------------------------------------
# Data: train / validation (carved) / test


def _head(data, n: int | None):
    return data if n is None or n >= len(data) else data.subset(range(n))


def load_splits(root: Path, size: int, *, train_split: str = "trainval", test_split: str | None = "test",
                repeat_to: int | None = None, train_limit: int | None = None, test_limit: int | None = None):
    """Prepared (train, test) at ``size`` for the benchmarks (test None if ``test_split`` is None);
    ``*_limit`` keep the first N samples; ``repeat_to`` then cycles train to that length."""
    from functional_seg.data import prepare

    train = _head(prepare(root, train_split, size), train_limit)
    test = _head(prepare(root, test_split, size), test_limit) if test_split else None
    if repeat_to is not None and repeat_to != len(train):
        train = train.repeat(repeat_to)
    return train, test


@dataclass(frozen=True)
class Splits:
    """The series' protocol: train on ``train``, select the checkpoint on ``val`` (carved from
    trainval), report ``test`` (the official test split) once with the selected checkpoint."""

    train: Any
    val: Any
    test: Any
    note: str


def experiment_splits(args: argparse.Namespace) -> Splits:
    """trainval (first ``--train-limit``) carved into train / val by ``--val-fraction`` and
    ``--seed``, as ``fseg train --val-split carve`` does; the official test split (first ``--test-limit``)."""
    from functional_seg.data import prepare

    t0 = time.perf_counter()
    train, val = _head(prepare(args.data, "trainval", args.size), args.train_limit).carve(args.val_fraction,
                                                                                          args.seed)
    test = _head(prepare(args.data, "test", args.size), args.test_limit)
    note = (f"data `{args.data}`: train {len(train)} + val {len(val)} (carved from trainval, fraction "
            f"{args.val_fraction}, seed {args.seed}) / test {len(test)} (official test split)")
    print(f"{note} at {args.size} px ({time.perf_counter() - t0:.1f} s)", flush=True)
    return Splits(train, val, test, note)


PROTOCOL_NOTE = ("protocol: the checkpoint is selected on the validation split (best val mean IoU over the "
                 "epochs: column `val mIoU`); every other figure is the official **test** split, evaluated once "
                 "with that checkpoint by `train.evaluate` (what `fseg eval` prints), without augmentation")
METRICS_NOTE = ("mean IoU = macro over the 3 classes; series IoU = micro Jaccard with BACKGROUND ignored; "
                "custom IoU = the series' per-image soft IoU (+0.001); all from `metrics.summarize` via `evaluate`")


# ----------------------------------------------------------------------------------------------
# One config through fit, then the test split once


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
    row = {k: summary.get(k) for k in ("pixel_accuracy", "mean_iou", "series_iou", "mean_dice", "iou")}
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


def inference_latency(model, params, state, preprocess, device: torch.device, *, batch: int = 64,
                      iters: int = 10) -> float:
    """Median ms of one eval forward of ``batch`` images as the checkpoint's ``Preprocess`` feeds
    them (normalisation, layout) under its precision (``runtime.autocast``)."""
    images = torch.randint(0, 256, (batch, 3, preprocess.size, preprocess.size), dtype=torch.uint8, device=device)
    x = preprocess.model_input(images)

    def forward():
        with torch.no_grad(), _runtime_autocast(preprocess.precision, device.type):
            return model.apply(params, state, x, train=False)[0]

    return median_ms(forward, device, warmup=2, iters=iters)


def predict_labels(model, params, state, preprocess, device: torch.device, images_u8: torch.Tensor) -> torch.Tensor:
    """Label maps int64 [N, S, S] for uint8 [N, 3, S, S] through the library's ``Predictor``."""
    from functional_seg.predict import Predictor

    predictor = Predictor(model, params, state, preprocess, device=device, batch_size=len(images_u8))
    logits = predictor.logits([im.permute(1, 2, 0).numpy() for im in images_u8])
    return torch.stack([one.argmax(dim=0) for one in logits])


def _val_choices(best: dict, k: int | None) -> list[dict]:
    """Per member, the weights ("params" or, with EMA, "ema") with the higher validation mean IoU
    at the selected epoch: ``[{"weights", "val_mean_iou", "val_mean_iou_params", ...}, ...]``."""
    def of(key: str, i: int):
        v = best.get(key)
        v = v[i] if isinstance(v, list) else v
        return v.get("mean_iou") if v else None

    out = []
    for i in range(k or 1):
        scores = {w: of(key, i) for w, key in (("params", "val"), ("ema", "val_ema")) if of(key, i) is not None}
        weights = max(scores, key=scores.get) if scores else "params"
        out.append({"member": i if k else None, "weights": weights, "val_mean_iou": scores.get(weights),
                    **{f"val_mean_iou_{w}": v for w, v in scores.items()},
                    "hparams": {n: v[i] for n, v in (best.get("hparams") or {}).items()}})
    return out


def run_config(label: str, model, config, splits: Splits, args: argparse.Namespace, stem: str, *,
               latency: bool = False, best_member: bool = False, n_show: int = 4) -> dict:
    """Train ``model`` with ``fit(config)``, then score the selected checkpoint once on the test split.

    Selection uses the validation split only: the checkpoint is ``best.safetensors`` (best
    validation mean IoU of the raw params; an ensemble's members are selected together on their
    mean), or ``last.safetensors`` without validation; with ``config.ema`` the raw or the EMA
    weights, whichever scored higher on validation at that epoch; with ``best_member`` only the
    ensemble member with the best validation score. The choice is read back with
    ``predict.load_for_inference`` and evaluated with ``train.evaluate``: the figures are what
    ``fseg eval --checkpoint <it> --split test [--member i] [--weights ema]`` prints.

    Returns:
        For one model (or ``best_member``), its row: test metrics (``metrics_row``),
        ``val_mean_iou`` (at the selected epoch), ``best_epoch``, ``weights``, ``train_s`` (sum of
        the epochs' training time from ``metrics.jsonl``, evaluation excluded), ``first_epoch_s``,
        ``checkpoint``, ``history`` (per-epoch curve) and ``_preds`` (labels of the first test
        images, for the figure); ``validation`` lists every member's validation choice.
        For an ensemble otherwise, ``{"members": [row, ...], "train_s": ..., ...}``.
    """
    from functional_seg.data import Loader
    from functional_seg.predict import load_for_inference
    from functional_seg.train import evaluate, fit

    run_dir = _fresh_run_dir(args.runs / stem / label)
    record = {"experiment": stem, "variant": label, "command": command_line()}
    result = fit(model, splits.train, splits.val, config, out_dir=run_dir, hooks=[_EpochLines(label)], args=record)
    history = result["history"]
    chosen = result["best_checkpoint"] or result["checkpoint"]
    best = next((r for r in history if r["epoch"] == result.get("best_epoch")), history[-1] if history else {})
    choices = _val_choices(best, config.members)
    if best_member:
        choices = [max(choices, key=lambda c: -math.inf if c["val_mean_iou"] is None else c["val_mean_iou"])]
    device = torch.device(config.device)
    loader = Loader(splits.test, config.batch_size, device=device, shuffle=False, drop_last=False)
    train_times = [r.get("train_time_s") or 0.0 for r in history]
    shared = {"train_s": sum(train_times), "first_epoch_s": train_times[0] if train_times else None,
              "best_epoch": result.get("best_epoch"), "checkpoint": _shown(chosen), "steps": result["step"]}
    rows = []
    for choice in choices:
        m_model, params, state, pre, _ = load_for_inference(chosen, device=device, weights=choice["weights"],
                                                            member=choice["member"])
        row = metrics_row(evaluate(m_model, params, state, loader, preprocess=pre), pre.class_names)
        row.update(choice, **shared, history=_curve(history, choice["member"]))
        row["_preds"] = predict_labels(m_model, params, state, pre, device, splits.test.images[:n_show])
        if latency and not rows:
            row["latency_ms"] = inference_latency(m_model, params, state, pre, device,
                                                  iters=10 if device.type == "cuda" else 3)
        rows.append(row)
    if best_member:
        return {**rows[0], "validation": _val_choices(best, config.members)}
    return rows[0] if not config.members else {"members": rows, **shared}


def model_cost(model, size: int) -> dict:
    """Parameters and mult-adds per image from ``functional_seg.summary``."""
    from functional_seg.summary import summarize

    totals = summarize(model, input_size=(size, size), batch_size=1).totals()
    return {"params": int(totals["total_params"]), "mult_adds": int(totals["total_mult_adds"]),
            "gmacs": int(totals["total_mult_adds"]) / 1e9}


# ----------------------------------------------------------------------------------------------
# Timing (also used by benchmarks/)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, iters: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds, synchronising CUDA around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def autocast(device: torch.device, enabled: bool = True):
    """For ``benchmarks/bench_train_step.py``: ``runtime.autocast`` at the device's "auto" precision
    (bf16 on CUDA, fp32 elsewhere), or fp32 when not ``enabled``."""
    return _runtime_autocast(resolve_precision("auto", device) if enabled else "fp32", device.type)


def reference_module(name: str, **cfg) -> torch.nn.Module:
    """For ``benchmarks/bench_train_step.py``: the plain ``nn.Module`` twin of registry model ``name``."""
    from benchmarks.reference_modules import build_reference
    from functional_seg.models import create_model
    return build_reference(name, create_model(name, **cfg).cfg)
