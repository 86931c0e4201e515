"""End to end: wall time of the real CLI, ``fseg train``, for 20 epochs of SegNet at 128x128 on a full-size split.

Command (GPU, ~1.5-2 min):  python benchmarks/bench_end_to_end.py
Command (CPU, ~1-2 min):    python benchmarks/bench_end_to_end.py --quick   (1 epoch, 64 px, 256 images, tiny widths)

Runs ``python -m functional_seg.cli train ...`` as a subprocess (what ``fseg train`` runs; the
module form works without installation, ``PYTHONPATH`` = the repository root) on the official
trainval split, cycled to 3,680 images (the full dataset's trainval size) when the data holds
fewer, with evaluation on the test split every epoch as the CLI does it. The wall time covers
everything the user waits for: interpreter start, data preparation (cached after the first run),
compilation, training, evaluation and checkpoints. Per-epoch times come from the run's own
metrics log when it writes one.

If the CLI has no option to cycle the data, the same run is done through ``functional_seg.train.fit``
in a subprocess (recorded in the table as the mode).

Writes ``<out>/bench_end_to_end_<device-kind>.{json,md}``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import _common as C  # noqa: E402

EXPERIMENT = "bench_end_to_end"
FULL_TRAINVAL = 3680


def parse_args(argv=None):
    p = C.base_parser(__doc__.split("\n")[0], epochs=20, size=128, batch_size=64)
    p.add_argument("--model", default="segnet")
    p.add_argument("--model-cfg", default=None, help="CLI --model-cfg string (quick: widths=8,16,32,32)")
    p.add_argument("--repeat-to", type=int, default=None, help=f"training images (default {FULL_TRAINVAL}; quick 256)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before the run is killed (default: none)")
    p.add_argument("--extra", default="", help="extra CLI arguments, passed through verbatim")
    args = C.finish_args(p.parse_args(argv), quick_epochs=1, quick_batch=16, quick_train=None, quick_test=None)
    if args.repeat_to is None:
        args.repeat_to = 256 if args.quick else FULL_TRAINVAL
    if args.model_cfg is None and args.quick:
        args.model_cfg = "widths=8,16,32,32"
    return args


def cli_help() -> str:
    out = subprocess.run([sys.executable, "-m", "functional_seg.cli", "train", "--help"], cwd=C.REPO,
                         capture_output=True, text=True, env=_env(), timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"fseg train --help failed: {out.stderr.strip()[-300:]}")
    return out.stdout


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(C.REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _has(help_text: str, flag: str) -> bool:
    return re.search(rf"(^|\s){re.escape(flag)}([\s,=]|$)", help_text, re.M) is not None


def cli_command(args, help_text: str, run_dir: Path) -> list[str] | None:
    """The ``fseg train`` argv for this benchmark, or None when the CLI cannot cycle the data."""
    repeat_flag = next((f for f in ("--repeat-to", "--repeat", "--train-repeat") if _has(help_text, f)), None)
    if repeat_flag is None:
        return None
    cmd = [sys.executable, "-m", "functional_seg.cli", "train",
           "--data", str(args.data), "--model", args.model, "--epochs", str(args.epochs),
           "--size", str(args.size), "--batch-size", str(args.batch_size), repeat_flag, str(args.repeat_to)]
    if args.model_cfg:
        cmd += ["--model-cfg", args.model_cfg]
    optional = {
        "--device": str(args.device),
        "--out": str(run_dir), "--out-dir": str(run_dir), "--output": str(run_dir), "--run-dir": str(run_dir),
        "--augment": "flip_jitter", "--loss": "ce", "--seed": str(args.seed),
    }
    used_out = False
    for flag, value in optional.items():
        if flag in ("--out", "--out-dir", "--output", "--run-dir"):
            if used_out or not _has(help_text, flag):
                continue
            used_out = True
        elif not _has(help_text, flag):
            continue
        cmd += [flag, value]
    cmd += args.extra.split()
    return cmd


FIT_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
from functional_seg.data import prepare
from functional_seg.models import create_model
from functional_seg.train import fit
cfg = json.loads(sys.argv[1])
train = prepare(cfg["data"], "trainval", cfg["size"]).repeat(cfg["repeat_to"])
test = prepare(cfg["data"], "test", cfg["size"])
model = create_model(cfg["model"], **cfg["model_cfg"])
result = fit(model, "ce", train, test, epochs=cfg["epochs"], batch_size=cfg["batch_size"],
             optimizer_cfg={"name": "adam", "lr": 1e-3}, augment_cfg="flip_jitter", seed=cfg["seed"],
             device=cfg["device"], out_dir=cfg["out_dir"])
print("FIT_WALL", time.perf_counter() - t0)
"""


def parse_model_cfg(text: str | None) -> dict:
    cfg = {}
    for part in re.split(r";|\s(?=\w+=)", text or ""):
        if "=" in part:
            k, v = part.split("=", 1)
            vals = [int(x) if x.strip().lstrip("-").isdigit() else x.strip() for x in v.split(",")]
            cfg[k.strip()] = tuple(vals) if len(vals) > 1 else vals[0]
    return cfg


def fit_command(args, run_dir: Path) -> list[str]:
    cfg = {"data": str(args.data), "size": args.size, "repeat_to": args.repeat_to, "model": args.model,
           "model_cfg": parse_model_cfg(args.model_cfg), "epochs": args.epochs, "batch_size": args.batch_size,
           "seed": args.seed, "device": str(args.device), "out_dir": str(run_dir)}
    return [sys.executable, "-c", FIT_SCRIPT, json.dumps(cfg)]


def epoch_times(run_dir: Path) -> list[float]:
    """Per-epoch seconds from a JSON-lines metrics log in the run folder, if the run wrote one."""
    times: list[float] = []
    for path in sorted(run_dir.rglob("*.jsonl")) + sorted(run_dir.rglob("history*.json")):
        try:
            lines = path.read_text().splitlines()
            records = [json.loads(x) for x in lines if x.strip().startswith("{")] if path.suffix == ".jsonl" \
                else json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(records, dict):
            records = records.get("history", [])
        for r in records if isinstance(records, list) else []:
            if not isinstance(r, dict):
                continue
            for key in ("epoch_s", "epoch_time", "epoch_seconds", "time_s", "train_s", "seconds"):
                if isinstance(r.get(key), int | float):
                    times.append(float(r[key]))
                    break
        if times:
            return times
    return times


def run(args) -> dict:
    help_text = cli_help()
    run_dir = Path(tempfile.mkdtemp(prefix="fseg_e2e_"))
    cmd = cli_command(args, help_text, run_dir)
    mode = "fseg train (CLI)"
    if cmd is None:
        cmd, mode = fit_command(args, run_dir), "functional_seg.train.fit (CLI cannot cycle the data)"
    shown = " ".join(cmd if mode.startswith("fseg") else cmd[:2] + ["<fit script>", cmd[-1]])
    shown = shown.replace(sys.executable, "python")
    print(f"running: {shown}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=C.REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print("  | " + line.rstrip(), flush=True)
        tail = (tail + [line.rstrip()])[-30:]
        if args.timeout and time.perf_counter() - t0 > args.timeout:
            proc.kill()
            break
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"exit {rc} after {wall:.1f} s: {' / '.join(tail[-3:])}")
    per_epoch = epoch_times(run_dir)
    return {"mode": mode, "command": shown, "wall_s": wall, "epochs": args.epochs, "train_images": args.repeat_to,
            "per_epoch_s": per_epoch, "mean_epoch_s": sum(per_epoch) / len(per_epoch) if per_epoch else None,
            "wall_per_epoch_s": wall / max(args.epochs, 1),
            "images_per_s": args.repeat_to * args.epochs / wall, "run_dir": str(run_dir), "log_tail": tail[-10:]}


def main(argv=None) -> int:
    args = parse_args(argv)
    prov = C.provenance(args.device)
    stem = f"{EXPERIMENT}_{C.device_kind(args.device, args.quick)}"
    print(f"{EXPERIMENT}: {prov['device_name']}, torch {prov['torch']}", flush=True)
    result = C.guarded("end_to_end", lambda: run(args))
    md = C.md_header(
        f"End to end: `fseg train`, {args.model} at {args.size}x{args.size}, {args.epochs} epochs, "
        f"{args.repeat_to} training images", prov,
        notes=[f"data: `{args.data}` trainval cycled to {args.repeat_to} images; evaluation on test as the CLI does",
               f"run: `{result.get('command', '-')}`" if result.get("status") == "ok" else "run: -",
               "wall time includes interpreter start, data preparation or cache load, compilation, training, "
               "evaluation and checkpoints"],
    )
    md += "\n" + C.md_table([{"what": result.get("mode", "fseg train"), **result}], [
        ("what", "mode"), ("wall_s", "wall s"), ("wall_per_epoch_s", "wall s / epoch"),
        ("mean_epoch_s", "mean epoch s (run log)"), ("images_per_s", "train images/s (wall)")]) + "\n"
    if result.get("per_epoch_s"):
        md += "\nper-epoch s (run log): " + ", ".join(f"{t:.2f}" for t in result["per_epoch_s"]) + "\n"
    payload = {"experiment": EXPERIMENT, "provenance": prov,
               "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "result": result}
    C.write_results(args.out, stem, payload, md)
    return 0 if result.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
