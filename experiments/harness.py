"""The harness every experiment and benchmark shares: arguments, provenance, time budgets, results
tables and files, and timing. It knows no model and no training protocol (``_common.py`` holds the
experiments' protocol over ``fit``); ``benchmarks/`` import this module, and nothing here imports
``benchmarks/``.

Every script takes the same core flags (``--data``, ``--device``, ``--quick``, ``--out``, ...),
records the device name, torch version and the exact command line in each table, and writes
``<name>_<device-kind>.{json,md}`` where the device kind is ``cuda``, ``cpu`` or either with
``_quick``. One failing variant is recorded as ``failed: <message>`` and the run goes on
(``guarded``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from functional_seg.core.files import write_atomic, write_json
from functional_seg.runtime import resolve_device

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared/data/oxford-pets-sample"
DEFAULT_OUT = REPO / "experiments" / "results"


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
# Data for the benchmarks


def load_splits(root: Path, size: int, *, train_split: str = "trainval", test_split: str | None = "test",
                repeat_to: int | None = None, train_limit: int | None = None, test_limit: int | None = None):
    """Prepared (train, test) at ``size`` for the benchmarks (test None if ``test_split`` is None);
    ``*_limit`` keep the first N samples; ``repeat_to`` then cycles train to that length."""
    from functional_seg.data import prepare

    def head(data, n):
        return data if n is None or n >= len(data) else data.subset(range(n))

    train = head(prepare(root, train_split, size), train_limit)
    test = head(prepare(root, test_split, size), test_limit) if test_split else None
    if repeat_to is not None and repeat_to != len(train):
        train = train.repeat(repeat_to)
    return train, test


# ----------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, iters: int = 10) -> tuple[float, Any]:
    """Median wall time of ``fn()`` in seconds over ``iters`` calls after ``warmup`` calls, CUDA
    synchronised around each, and the last call's result."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def median_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, iters: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds (:func:`timed`)."""
    return timed(fn, device, warmup=warmup, iters=iters)[0] * 1e3
