"""Shared plumbing for the experiment and benchmark scripts: arguments, device, data, results files.

Every script takes the same core flags (``--data``, ``--device``, ``--quick``, ``--out``,
``--epochs``, ``--size``), records the device name, torch version and the exact command line in
each table it writes, and writes its results JSON and Markdown atomically (temporary file, then
``os.replace``) as ``<experiment>_<device-kind>.{json,md}`` where the device kind is ``cuda``,
``cpu`` or either with ``_quick``. One failing model or variant is caught, recorded as
``failed: <message>`` and the run goes on (``guarded``).

The repository root is put on ``sys.path`` so ``functional_seg`` (and ``tests/reference_modules``)
import without installation, as on the GPU machine (``PYTHONPATH=$PWD``). matplotlib is imported
lazily: without it the figures are skipped and everything else runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/oxford-pets-sample"
DEFAULT_OUT = REPO / "experiments" / "results"
CLASS_NAMES = ("pet", "background", "border")


# ----------------------------------------------------------------------------------------------
# Arguments, device, provenance


def base_parser(description: str, *, epochs: int, size: int, batch_size: int) -> argparse.ArgumentParser:
    """The flags every script shares; ``--quick`` shrinks sizes for a CPU run (see ``apply_quick``)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("FSEG_DATA") or DEFAULT_DATA),
                   help="Oxford-IIIT Pet root (official layout); env FSEG_DATA overrides the default")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
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


def finish_args(args: argparse.Namespace, *, quick_epochs: int = 2, quick_size: int = 64,
                quick_batch: int = 16, quick_train: int | None = 128, quick_test: int | None = 96
                ) -> argparse.Namespace:
    """Fill epochs / size / batch_size / limits from the full or the quick defaults unless given."""
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
    args.device = resolve_device(args.device)
    return args


def resolve_device(name: str | torch.device) -> torch.device:
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return dev


def device_kind(device: torch.device, quick: bool) -> str:
    return f"{device.type}{'_quick' if quick else ''}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def command_line() -> str:
    """The command as typed, relative to the repository root where possible."""
    argv = list(sys.argv)
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


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op context on CPU (bf16 convs are slow there)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(args: argparse.Namespace | None = None) -> None:
    """Leave the thread count alone unless ``--threads`` or FSEG_THREADS says otherwise (shared CPU boxes)."""
    n = getattr(args, "threads", None) or os.environ.get("FSEG_THREADS")
    if n:
        torch.set_num_threads(int(n))


# ----------------------------------------------------------------------------------------------
# Failures


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


# ----------------------------------------------------------------------------------------------
# Results files


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, Path | torch.device | torch.dtype):
        return str(x)
    return x


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def write_text(path: Path, text: str) -> None:
    _atomic_write(path, text)


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
    write_text(mp, markdown)
    print(f"wrote {jp.relative_to(REPO) if jp.is_relative_to(REPO) else jp} and {mp.name}", flush=True)
    return jp, mp


# ----------------------------------------------------------------------------------------------
# Data


def head(data, n: int | None):
    """The first ``n`` samples of a ``PreparedData`` (all of it if n is None)."""
    if n is None or n >= len(data):
        return data
    from functional_seg.data import PreparedData

    return PreparedData(images=data.images[:n].clone(), masks=data.masks[:n].clone(), names=data.names[:n])


def load_splits(root: Path, size: int, *, train_split: str = "trainval", test_split: str | None = "test",
                repeat_to: int | None = None, train_limit: int | None = None, test_limit: int | None = None):
    """Prepared (train, test) ``PreparedData`` at ``size`` (test None if ``test_split`` is None);
    ``*_limit`` keep the first N samples (quick CPU runs); ``repeat_to`` then cycles train to that length."""
    from functional_seg.data import prepare

    t0 = time.perf_counter()
    train = head(prepare(root, train_split, size), train_limit)
    test = head(prepare(root, test_split, size), test_limit) if test_split else None
    if repeat_to is not None and repeat_to != len(train):
        train = train.repeat(repeat_to)
    test_msg = f" + {len(test)} {test_split}" if test is not None else ""
    print(f"data: {len(train)} {train_split}{test_msg} at {size} px from {root} ({time.perf_counter() - t0:.1f} s)",
          flush=True)
    return train, test


def reference_module(name: str, **cfg) -> torch.nn.Module:
    """The plain ``torch.nn.Module`` twin of registry model ``name`` (``tests/reference_modules.py``)."""
    import importlib

    from functional_seg.models import create_model

    tests_dir = str(REPO / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    mod = importlib.import_module("reference_modules")
    return mod.build_reference(name, create_model(name, **cfg).cfg)


# ----------------------------------------------------------------------------------------------
# Timing


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


class Stopwatch:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib optional, imported lazily)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: figures skipped (pip install '.[experiments]')", flush=True)
        return None
    return plt


def plot_curves(histories: dict[str, list[dict]], keys: Sequence[tuple[str, str]], path: Path,
                title: str) -> Path | None:
    """One panel per (history key, label); one line per run. ``histories[name]`` is a list of epoch dicts."""
    plt = _pyplot()
    if plt is None or not histories:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for name, hist in histories.items():
            xs = [h.get("epoch", i + 1) for i, h in enumerate(hist) if h.get(key) is not None]
            ys = [h[key] for h in hist if h.get(key) is not None]
            if ys:
                ax.plot(xs, ys, marker="o", markersize=2.5, label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save_fig(fig, plt, path)


_PALETTE = torch.tensor([[230, 80, 60], [40, 40, 40], [250, 220, 80], [255, 255, 255]], dtype=torch.uint8)


def _colour(mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.int64).clamp(0, 3)
    return _PALETTE[m]  # [H, W, 3]


def plot_predictions(images: torch.Tensor, masks: torch.Tensor, preds: dict[str, torch.Tensor], path: Path,
                     title: str) -> Path | None:
    """Grid: one row per image; columns image / truth / one prediction per model.

    images uint8 [N, 3, S, S], masks [N, S, S], preds name -> labels [N, S, S] (all on CPU).
    """
    plt = _pyplot()
    if plt is None:
        return None
    n = images.shape[0]
    cols = ["image", "truth", *preds]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.6 * len(cols), 1.6 * n), squeeze=False)
    for i in range(n):
        panels = [images[i].permute(1, 2, 0), _colour(masks[i])] + [_colour(p[i]) for p in preds.values()]
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(panel.numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=7)
    fig.suptitle(title + "  (red pet, dark background, yellow border)", fontsize=8)
    fig.tight_layout()
    return _save_fig(fig, plt, path)


def _save_fig(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    print(f"wrote {path.name}", flush=True)
    return path


# ----------------------------------------------------------------------------------------------
# Train and evaluate one model with the library's pieces (the experiments' shared loop)


def model_cost(model, size: int) -> dict:
    """Parameters and mult-adds per image from ``functional_seg.summary`` (params alone if that fails)."""
    from functional_seg.core import random as jr
    from functional_seg.core.tree import tree_size

    out: dict[str, Any] = {}
    try:
        from functional_seg.summary import summarize

        totals = summarize(model, input_size=(size, size), batch_size=1).totals()
        out["params"] = int(totals["total_params"])
        out["mult_adds"] = int(totals["total_mult_adds"])
    except Exception as err:  # noqa: BLE001 - the cost column is secondary
        print(f"summary failed for {model.name}: {short_error(err)}", flush=True)
        params, _ = model.init(jr.key(0))
        out["params"] = tree_size(params)
        out["mult_adds"] = None
    return out


def eval_loader(data, device: torch.device, batch_size: int = 64):
    """Ordered batches of all of ``data`` (kept on the device on CUDA)."""
    from functional_seg.data import Loader

    return Loader(data, batch_size, device=device, shuffle=False, drop_last=False, resident=device.type == "cuda")


def evaluate_clean(eval_step, params, state, loader) -> dict:
    """Clean metrics (no augmentation) over a loader's data: ``metrics.summarize`` + the series' custom IoU."""
    from functional_seg.metrics import summarize

    cm = None
    custom, count = 0.0, 0
    with torch.no_grad():
        for images, masks in loader.epoch(None):
            out = eval_step(params, state, images, masks)
            if isinstance(out, torch.Tensor):  # confusion matrix only
                out = {"confusion": out}
            cm = out["confusion"] if cm is None else cm + out["confusion"]
            if "custom_iou" in out:  # per image [B]
                custom = out["custom_iou"].sum() + custom
                count += out["custom_iou"].numel()
            elif "custom_iou_sum" in out:
                custom = out["custom_iou_sum"] + custom
                count += int(out["count"])
    summary = summarize(cm, CLASS_NAMES)
    summary["custom_iou"] = float(custom) / count if count else None
    return summary


def predict(model, params, state, images_u8: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """Label maps int64 [N, S, S] on CPU for uint8 images [N, 3, S, S] (the step's preprocessing)."""
    from functional_seg.data import normalize, to_float

    with torch.no_grad(), autocast(device, precision == "bf16"):
        logits, _ = model.apply(params, state, normalize(to_float(images_u8.to(device))), train=False)
    return logits.float().argmax(dim=1).cpu()


def inference_latency(model, params, state, size: int, device: torch.device, precision: str, *,
                      batch: int = 64, iters: int = 10) -> float:
    """Median ms of one eval-mode forward of a float batch [batch, 3, size, size]."""
    x = torch.randn(batch, 3, size, size, device=device)

    def fwd():
        with torch.no_grad(), autocast(device, precision == "bf16"):
            return model.apply(params, state, x, train=False)[0]

    return median_ms(fwd, device, warmup=2, iters=iters)


def step_schedule(lr: float, step_size: int, gamma: float) -> dict:
    """OptimizerConfig overrides for Adam + StepLR(step_size epochs, gamma) as the series ran it."""
    return {"name": "adam", "lr": lr, "schedule": "step", "step_size": step_size, "gamma": gamma}


def train_and_evaluate(
    model,
    *,
    train,
    test,
    device: torch.device,
    epochs: int,
    batch_size: int,
    loss_fn,
    augment: Any = "flip_jitter",
    optimizer_cfg: dict | None = None,
    seed: int = 0,
    compile: bool = False,
    label: str = "",
    n_show: int = 4,
    latency: bool = True,
    ensemble: dict | None = None,
) -> dict:
    """Train ``model`` on ``train`` with the library's step, evaluating clean on ``test`` after each epoch.

    Args:
        model: a ``functional_seg`` Model.
        train, test: ``PreparedData``.
        loss_fn: ``fn(logits, target, **hparams) -> 0-d``.
        augment: an ``augment_preset`` name or an ``AugmentConfig``, applied inside the step.
        optimizer_cfg: ``make_optimizer`` overrides; ``steps_per_epoch`` is filled in.
        compile: compile the train and eval steps (eager otherwise: no compile time per model).
        ensemble: ``{"sweep": {"hparam": [v1, ..., vK]}, "same_init": bool}`` trains K members in
            one vmapped step (``ensemble_step``); results then hold one entry per member.

    Returns:
        dict with history (per epoch), test metrics, train time, latency and predictions
        (``_preds``, a CPU tensor kept out of the JSON).
    """
    from functional_seg.core import random as jr
    from functional_seg.core.tree import unstack
    from functional_seg.data import Loader, augment_preset
    from functional_seg.train import (
        ensemble_step,
        init_ensemble,
        init_train_state,
        make_eval_step,
        make_optimizer,
        make_train_step,
    )

    precision = "bf16" if device.type == "cuda" else "fp32"
    loader = Loader(train, batch_size, device=device, shuffle=True, drop_last=True, resident=device.type == "cuda")
    cfg = dict(optimizer_cfg or {"name": "adam", "lr": 1e-3})
    if cfg.get("schedule") == "step":
        cfg["steps_per_epoch"] = len(loader)
    optimizer = make_optimizer(**cfg)
    aug_cfg = augment_preset(augment) if isinstance(augment, str) else augment
    step = make_train_step(model, loss_fn, optimizer, augment_cfg=aug_cfg, precision=precision,
                           compile=compile and ensemble is None)
    eval_step = make_eval_step(model, precision=precision, with_logits_metrics=True, compile=compile)
    root_key = jr.key(seed)
    init_key, data_key = jr.split(root_key)
    if ensemble is None:
        train_state = init_train_state(model, optimizer, init_key, device=device)
        k = None
    else:
        sweep = ensemble["sweep"]
        k = len(next(iter(sweep.values())))
        train_state = init_ensemble(model, optimizer, init_key, k, sweep=sweep,
                                    same_init=ensemble.get("same_init", False), device=device)
        step = ensemble_step(step, compile=compile)

    def members(ts):
        return [(ts.params, ts.state)] if k is None else list(zip(unstack(ts.params), unstack(ts.state)))

    test_loader = eval_loader(test, device)
    history: list[dict] = []
    train_s = 0.0
    prefix = f"[{label}] " if label else ""
    for epoch in range(epochs):
        sync(device)
        t0 = time.perf_counter()
        loss_sum, acc_sum, n = None, None, 0
        for batch in loader.epoch(jr.fold_in(data_key, epoch)):
            train_state, metrics = step(train_state, batch)
            loss_sum = metrics["loss"] if loss_sum is None else loss_sum + metrics["loss"]
            acc_sum = metrics["pixel_accuracy"] if acc_sum is None else acc_sum + metrics["pixel_accuracy"]
            n += 1
        sync(device)
        epoch_s = time.perf_counter() - t0
        train_s += epoch_s
        losses = (loss_sum / n).reshape(-1).tolist()
        accs = (acc_sum / n).reshape(-1).tolist()
        t1 = time.perf_counter()
        evals = [evaluate_clean(eval_step, p, s, test_loader) for p, s in members(train_state)]
        eval_s = time.perf_counter() - t1
        for i, ev in enumerate(evals):
            if len(history) <= i:
                history.append([])
            history[i].append({
                "epoch": epoch + 1, "train_loss": losses[i], "train_pixel_accuracy": accs[i],
                "test_pixel_accuracy": ev["pixel_accuracy"], "test_mean_iou": ev["mean_iou"],
                "test_series_iou": ev.get("series_iou"), "test_custom_iou": ev["custom_iou"],
                "train_s": epoch_s, "eval_s": eval_s,
            })
        print(f"{prefix}epoch {epoch + 1}/{epochs}: loss {_join(losses)}, "
              f"test acc {_join(e['pixel_accuracy'] for e in evals)}, "
              f"mIoU {_join(e['mean_iou'] for e in evals)} ({epoch_s:.1f} s + eval {eval_s:.1f} s)",
              flush=True)

    results = []
    show = test.images[:n_show]
    for i, (params, state) in enumerate(members(train_state)):
        final = evals[i]
        res = {
            "pixel_accuracy": final["pixel_accuracy"],
            "mean_iou": final["mean_iou"],
            "iou": final["iou"],
            "series_iou": final.get("series_iou"),
            "custom_iou": final["custom_iou"],
            "mean_dice": final.get("mean_dice"),
            "train_s": train_s,
            "first_epoch_s": history[i][0]["train_s"] if history[i] else None,
            "history": history[i],
            "_preds": predict(model, params, state, show, device, precision),
        }
        for c, name in enumerate(CLASS_NAMES):
            res[f"iou_{name}"] = final["iou"][c]
        if latency and i == 0:
            res["latency_ms"] = inference_latency(model, params, state, train.size, device, precision,
                                                  iters=10 if device.type == "cuda" else 3)
        results.append(res)
    return results[0] if k is None else {"members": results, "train_s": train_s}


def _join(values: Iterable[float]) -> str:
    return ", ".join(f"{v:.4f}" for v in values)


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


def write_figures(curves: dict[str, dict], predictions: dict[str, dict], test, out: Path, stem: str, *,
                  loss_label: str, title: str) -> None:
    """The two figures every experiment writes: per-epoch curves of ``curves``' runs, and the
    image / truth / prediction grid of ``predictions``' runs on the first clean test images."""
    guarded("curves", lambda: {"path": plot_curves(
        {n: r["history"] for n, r in curves.items()},
        [("train_loss", loss_label), ("test_pixel_accuracy", "test pixel accuracy"),
         ("test_mean_iou", "test mean IoU")],
        out / f"{stem}_curves.png", title)})
    guarded("predictions", lambda: {"path": plot_predictions(
        test.images[:4], test.masks[:4], {n: r["_preds"] for n, r in predictions.items()},
        out / f"{stem}_predictions.png", "clean test images")})
