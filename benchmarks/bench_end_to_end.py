"""End to end: wall time of the real CLI, ``fseg train``, for 20 epochs of SegNet at 128x128 on a full-size split.

Command (GPU, ~3 min):      python -m benchmarks.bench_end_to_end   (a cold run, then a warm one)
Command (CPU, ~1-2 min):    python -m benchmarks.bench_end_to_end --quick --caches cold
                            (1 epoch, 64 px, 256 images, tiny widths; CPU does not compile by default)

Runs ``python -m functional_seg.cli train ...`` as a subprocess (what ``fseg train`` runs) with
its defaults for the protocol: ``--val-split carve`` (10% of the training split, seeded, evaluated
after every epoch to select best.safetensors) and ``--test-split test`` (the official test split,
evaluated once at the end with the selected weights, RUN_DIR/test.json). The training split is
the official trainval cycled to 3,680 images (the full dataset's trainval size) when the data
holds fewer: the CLI has no option to cycle data, so a cycled copy of the dataset is built as a
folder of symbolic links (trainval names ``<name>_rep<k>`` pointing at the original files, the
test split unchanged) and its caches are prepared before the clock starts (the decode time is
reported beside). On cycled data the carved validation images are copies of training images, so
the validation figure measures nothing but the timing of the evaluation; the test figure is
clean. The wall time covers what a user waits for on a rerun: interpreter start, cache load,
compilation, training, evaluation every epoch, the final test evaluation and checkpoints.
Per-epoch times come from the run's ``metrics.jsonl``.

``--caches cold,warm`` (the default) runs the command twice with one compile-cache folder
(``TORCHINDUCTOR_CACHE_DIR``): the first from an empty folder (cold), the second finding what the
first compiled (warm: a second run of the same model and shapes on the same machine).

Writes ``<out>/bench_end_to_end_<device-kind>.{json,md}``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from experiments import harness as C

EXPERIMENT = "bench_end_to_end"
FULL_TRAINVAL = 3680


def parse_args(argv=None):
    p = C.base_parser(__doc__.split("\n")[0], epochs=20, size=128, batch_size=64)
    p.add_argument("--model", default="segnet")
    p.add_argument("--model-cfg", default=None, help="CLI --model-cfg string (quick: widths=8,16,32,32)")
    p.add_argument("--repeat-to", type=int, default=None, help=f"training images (default {FULL_TRAINVAL}; quick 256)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds for all the runs together; a run still going then is killed (default: none)")
    p.add_argument("--val-split", default="carve", help="fseg train --val-split (carve, a split name or none)")
    p.add_argument("--test-split", default="test", help="fseg train --test-split (a split name or none)")
    p.add_argument("--extra", default="", help="extra CLI arguments, passed through verbatim")
    p.add_argument("--caches", default="cold,warm",
                   help="runs, in order: cold (an empty compile cache) and/or warm (what the cold run left)")
    args = C.finish_args(p.parse_args(argv), quick_epochs=1, quick_batch=16, quick_train=None, quick_test=None)
    if args.repeat_to is None:
        args.repeat_to = 256 if args.quick else FULL_TRAINVAL
    if args.model_cfg is None and args.quick:
        args.model_cfg = "widths=8,16,32,32"
    return args


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(C.REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cycled_root(src: Path, n_total: int, dest: Path) -> tuple[Path, int]:
    """A dataset folder whose trainval split lists ``n_total`` images, cycling ``src``'s by symbolic links.

    Returns (root, number of trainval images in ``src``); ``src``'s own layout when it already
    has ``n_total`` or more.
    """
    from functional_seg.data.oxford_pets import find_root, image_path, read_split, trimap_path

    layout = find_root(src)
    names = read_split(layout, "trainval")
    if len(names) >= n_total:
        return layout, len(names)
    (dest / "images").mkdir(parents=True)
    (dest / "annotations" / "trimaps").mkdir(parents=True)

    def link(name: str, new: str) -> None:
        img = image_path(layout, name).resolve()
        (dest / "images" / f"{new}{img.suffix}").symlink_to(img)
        (dest / "annotations" / "trimaps" / f"{new}.png").symlink_to(trimap_path(layout, name).resolve())

    lines = []
    for i in range(n_total):
        name = names[i % len(names)]
        new = name if i < len(names) else f"{name}_rep{i // len(names)}"
        link(name, new)
        lines.append(f"{new} 1 1 1")
    (dest / "annotations" / "trainval.txt").write_text("\n".join(lines) + "\n")
    test_names = read_split(layout, "test")
    for name in test_names:
        link(name, name)
    (dest / "annotations" / "test.txt").write_text("".join(f"{n} 1 1 1\n" for n in test_names))
    return dest, len(names)


def cli_command(args, run_dir: Path, data_root: Path, n_source: int) -> list[str]:
    """The ``fseg train`` argv for this benchmark."""
    cmd = [sys.executable, "-m", "functional_seg.cli", "train",
           "--data", str(data_root), "--model", args.model, "--epochs", str(args.epochs),
           "--size", str(args.size), "--batch-size", str(args.batch_size), "--device", str(args.device),
           "--out", str(run_dir), "--augment", "flip_jitter", "--loss", "ce", "--seed", str(args.seed),
           "--val-split", args.val_split, "--test-split", args.test_split, "--no-progress"]
    if args.model_cfg:
        cmd += ["--model-cfg", *args.model_cfg.split()]
    if n_source > args.repeat_to:
        cmd += ["--limit", str(args.repeat_to)]
    return cmd + args.extra.split()


def epoch_records(run_dir: Path) -> list[dict]:
    """Per-epoch {epoch, train_s, eval_s, images_per_s, val_mean_iou} from the run's metrics.jsonl, if any."""
    out: list[dict] = []
    for path in sorted(run_dir.rglob("metrics.jsonl")):
        try:
            records = [json.loads(x) for x in path.read_text().splitlines() if x.strip().startswith("{")]
        except (OSError, ValueError):
            continue
        for r in records:
            val = r.get("val") if isinstance(r.get("val"), dict) else {}
            out.append({"epoch": r.get("epoch"), "train_s": r.get("train_time_s"), "eval_s": r.get("eval_time_s"),
                        "images_per_s": r.get("images_per_s"), "val_mean_iou": val.get("mean_iou"),
                        "val_pixel_accuracy": val.get("pixel_accuracy")})
        if out:
            break
    return out


def prepare_data(args, work: Path) -> tuple[Path, int, float]:
    """The cycled dataset and its decoded caches, before any clock: (root, source images, seconds)."""
    from functional_seg.data import prepare

    t0 = time.perf_counter()
    data_root, n_source = cycled_root(args.data, args.repeat_to, work / "data")
    for split in ("trainval", "test"):
        prepare(data_root, split, args.size)  # the CLI then loads this cache
    prepare_s = time.perf_counter() - t0
    print(f"data: {n_source} trainval images, {_how_many(args, n_source)} under {data_root}, "
          f"decoded and cached in {prepare_s:.1f} s (not timed)", flush=True)
    return data_root, n_source, prepare_s


def _how_many(args, n_source: int | None) -> str:
    if n_source is not None and n_source >= args.repeat_to:
        return f"its first {args.repeat_to} images (fseg train --limit)"
    return f"cycled to {args.repeat_to} images (symbolic links)"


def run(args, work: Path, data: tuple[Path, int, float], cache: str, timeout: float | None) -> dict:
    """One ``fseg train`` run with ``work/compile_cache`` as torch's compile cache folder: "cold" empties
    it first, "warm" finds what the cold run left (a second run of the same model and shapes)."""
    data_root, n_source, prepare_s = data
    run_dir = work / f"run_{cache}"
    cache_dir = work / "compile_cache"
    if cache == "cold":
        shutil.rmtree(cache_dir, ignore_errors=True)
    cmd, mode = cli_command(args, run_dir, data_root, n_source), f"fseg train (CLI), {cache} compile cache"
    shown = " ".join(cmd).replace(sys.executable, "python")
    print(f"running ({cache} compile cache): {shown}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=C.REPO, env={**_env(), "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    timed_out = threading.Event()

    def watchdog():
        if timeout and not proc_done.wait(timeout):
            timed_out.set()
            proc.kill()

    proc_done = threading.Event()
    threading.Thread(target=watchdog, daemon=True).start()
    assert proc.stdout is not None
    for line in proc.stdout:
        print("  | " + line.rstrip(), flush=True)
        tail = (tail + [line.rstrip()])[-30:]
    rc = proc.wait()
    proc_done.set()
    wall = time.perf_counter() - t0
    records = epoch_records(run_dir)
    test = _read_json(run_dir / "test.json")
    n_train = (_read_json(run_dir / "config.json").get("data") or {}).get("n_train") or args.repeat_to
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of a 15 M-parameter model add up
    if rc != 0 and not (timed_out.is_set() and records):
        why = f"timed out after {timeout:.0f} s" if timed_out.is_set() else f"exit {rc}"
        raise RuntimeError(f"{why} after {wall:.1f} s: {' / '.join(tail[-3:])}")
    per_epoch = [r["train_s"] for r in records if isinstance(r.get("train_s"), int | float)]  # per epoch
    evals = [r["eval_s"] for r in records if isinstance(r.get("eval_s"), int | float)]
    done = f"{len(per_epoch)} of {args.epochs} epochs before the {timeout:.0f} s timeout" \
        if timed_out.is_set() else "complete"
    epochs_done = len(per_epoch) if timed_out.is_set() else args.epochs
    summary = test.get("summary") or {}
    return {"mode": mode, "command": shown, "completed": done, "wall_s": wall, "epochs": epochs_done,
            "train_images": n_train, "cycled_images": args.repeat_to, "source_images": n_source,
            "prepare_s_untimed": prepare_s,
            "per_epoch_s": per_epoch, "first_epoch_s": per_epoch[0] if per_epoch else None,
            "later_epoch_s": sum(per_epoch[1:]) / len(per_epoch[1:]) if len(per_epoch) > 1 else None,
            "train_s": sum(per_epoch) if per_epoch else None, "eval_s": sum(evals) if evals else None,
            "final_val_mean_iou": records[-1].get("val_mean_iou") if records else None,
            "test_split": test.get("split"), "test_mean_iou": summary.get("mean_iou"),
            "test_pixel_accuracy": summary.get("pixel_accuracy"),
            "test_checkpoint": Path(test["checkpoint"]).name if test.get("checkpoint") else None,
            "epoch_records": records, "wall_per_epoch_s": wall / max(epochs_done, 1),
            "images_per_s": n_train * epochs_done / wall, "run_dir": str(run_dir), "log_tail": tail[-10:]}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def fmt_s(x) -> str:
    return f"{x:.1f} s" if isinstance(x, int | float) else "-"


def main(argv=None) -> int:
    args = parse_args(argv)
    prov = C.provenance(args.device)
    stem = f"{EXPERIMENT}_{C.device_kind(args.device, args.quick)}"
    print(f"{EXPERIMENT}: {prov['device_name']}, torch {prov['torch']}", flush=True)
    caches = [c.strip() for c in args.caches.split(",") if c.strip()]
    if not caches or set(caches) - {"cold", "warm"}:
        raise SystemExit(f"--caches: expected cold and/or warm, got {args.caches!r}")
    work = Path(tempfile.mkdtemp(prefix="fseg_e2e_"))
    try:
        deadline = time.perf_counter() + args.timeout if args.timeout else None
        data = prepare_data(args, work)
        results = []
        for cache in caches:
            left = max(deadline - time.perf_counter(), 1.0) if deadline else None
            results.append(C.guarded(f"end_to_end_{cache}", lambda cache=cache, left=left: run(args, work, data,
                                                                                               cache, left)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = results[0]
    md = C.md_header(
        f"End to end: `fseg train`, {args.model} at {args.size}x{args.size}, {args.epochs} epochs, "
        f"{args.repeat_to} training images", prov,
        notes=[f"data: `{args.data}` trainval, {_how_many(args, result.get('source_images'))}, decoded and "
               f"cached before the clock starts ({fmt_s(result.get('prepare_s_untimed'))}); the CLI's protocol: "
               f"validation `--val-split {args.val_split}` after every epoch (on cycled data the carved images are "
               f"copies of training images: timing only), `--test-split {args.test_split}` once at the end with the "
               "selected checkpoint (clean; the column `test mIoU`)",
               f"run: `{result.get('command', '-')}`" if result.get("status") == "ok" else "run: -",
               "wall time includes interpreter start, data preparation or cache load, compilation, training, "
               "validation every epoch, the test evaluation and checkpoints"],
    )
    md += "\n" + C.md_table([{"what": r.get("mode", "fseg train"), **r} for r in results], [
        ("what", "mode"), ("completed", "run"), ("wall_s", "wall s"), ("train_s", "train s (log)"),
        ("eval_s", "eval s (log)"),
        ("first_epoch_s", "epoch 1 s (compile)"), ("later_epoch_s", "later epochs s"),
        ("images_per_s", "images/s (wall)"), ("final_val_mean_iou", "final val mIoU"),
        ("test_checkpoint", "tested"), ("test_mean_iou", "test mIoU")]) + "\n"
    for cache, r in zip(caches, results):
        if r.get("per_epoch_s"):
            md += f"\nper-epoch s, {cache} (run log): " + ", ".join(f"{t:.2f}" for t in r["per_epoch_s"]) + "\n"
    payload = {"experiment": EXPERIMENT, "provenance": prov,
               "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "result": result,
               "results": dict(zip(caches, results))}
    C.write_results(args.out, stem, payload, md)
    return 0 if all(r.get("status") == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
