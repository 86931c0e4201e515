"""Peak memory of ``predict_files`` on big photos: the package before the bounded-memory path and now.

Command (CPU, ~6 min on 2 busy cores; the "before" rows need ~9 GB free):
    python -m benchmarks.bench_predict_memory --threads 2
Command (a quick check, ~1 min):
    python -m benchmarks.bench_predict_memory --quick --image 2000x1500 --rows after

Rows: {before, after} x {3, 21 classes} x {whole image, --tile 512}, plus the whole image with
two photos in one batch (3 classes). "before" runs the package as it was at ``--before`` (the
commit this work started from, extracted with ``git archive`` into a temporary folder), "after"
this checkout's; both call the same API: ``load_checkpoint(member="auto")``,
``Predictor.from_checkpoint(..., tile, batch_size)``, ``predict_files(predictor, photos, out)``
(mask and overlay PNGs written, as ``fseg predict`` does).

The photo is synthetic (smooth colour waves and noise, a JPEG of ``--image`` W x H, 8000x6000 by
default); the model a small SegNet (widths 8,16) at 128 px with 3 or 21 classes: its activations
are small next to the full-size buffers this measures. Each row runs in its own process, which
records its baseline RSS after the imports and resets the kernel's high-water mark (VmHWM,
``/proc/self/clear_refs`` 5); reported: peak RSS above that baseline, and wall time. Linux only.
Writes ``<out>/bench_predict_memory_cpu[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXPERIMENT = "bench_predict_memory"
MARK = "BENCH_PREDICT_MEMORY_RESULT "
BEFORE = "a283046f3db73730633e0daf7d52afaf291aff6b"  # before issue 23 items 4, 8, 10 (the bounded path)
REPO = Path(__file__).resolve().parents[1]
# (label, classes, tile, photos)
CASES = (("3 classes, whole", 3, None, 1), ("3 classes, --tile 512", 3, 512, 1), ("21 classes, whole", 21, None, 1),
         ("21 classes, --tile 512", 21, 512, 1), ("3 classes, whole, 2 photos in a batch", 3, None, 2))
VERSIONS = ("before", "after")


def parse_args(argv=None):
    from experiments import harness as C

    p = C.base_parser(__doc__.split("\n")[0], epochs=1, size=128, batch_size=8)
    p.add_argument("--image", default="8000x6000", help="W x H of the synthetic photo")
    p.add_argument("--rows", default=",".join(VERSIONS), help="before, after or both")
    p.add_argument("--cases", default=None, help="indices into the cases (default: all), e.g. 0,2")
    p.add_argument("--before", default=BEFORE, help="git revision of the package for the 'before' rows")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = C.finish_args(p.parse_args(argv))
    args.device = __import__("torch").device("cpu")  # peak RSS: a CPU measurement
    return args


def child(spec: dict) -> dict:
    """One row in this process: import the package from ``spec["package"]`` (nothing of it is imported
    before), reset the high-water mark, predict, report the peak above the post-import baseline."""
    from benchmarks import _rows as R  # torch only, and before the package's folder joins the path

    sys.path.insert(0, spec["package"])
    import torch

    import functional_seg
    from functional_seg.models import load_checkpoint
    from functional_seg.predict import Predictor, predict_files
    from functional_seg.runtime import resolve_runtime

    assert Path(functional_seg.__file__).resolve().is_relative_to(Path(spec["package"]).resolve())
    torch.set_num_threads(spec["threads"])
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    base = R.rss_mb("VmRSS")
    t0 = time.perf_counter()
    loaded = load_checkpoint(spec["checkpoint"], device="cpu", member="auto")
    predictor = Predictor.from_checkpoint(loaded, resolve_runtime("cpu", "fp32"), tile=spec["tile"],
                                          batch_size=spec["batch_size"])
    done = predict_files(predictor, spec["photos"], spec["out"])
    results = getattr(done, "results", done)  # "before" returned a list
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(errors[0])
    return {"baseline_mb": base, "peak_mb": R.rss_mb("VmHWM"), "peak_above_baseline_mb": R.rss_mb("VmHWM") - base,
            "seconds": time.perf_counter() - t0}


def _photos(folder: Path, size: tuple[int, int], n: int) -> list[str]:
    """n synthetic JPEGs of size (W, H), written band by band (no full-size float arrays)."""
    import numpy as np
    from PIL import Image

    w, h = size
    out = []
    for i in range(n):
        pixels = np.empty((h, w, 3), np.uint8)
        rng = np.random.default_rng(i)
        x = np.arange(w)[None, :, None] / 97.0
        for top in range(0, h, 512):
            y = np.arange(top, min(top + 512, h))[:, None, None] / 61.0
            wave = 127 + 90 * np.sin(x + i + np.array([0, 2, 4])) * np.cos(y + np.array([1, 3, 5]))
            pixels[top:top + 512] = np.clip(wave + rng.normal(0, 12, wave.shape), 0, 255)
        path = folder / f"photo{i}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        out.append(str(path))
    return out


def _checkpoint(path: Path, classes: int, size: int) -> str:
    from functional_seg import checkpoint
    from functional_seg.core import random as jr
    from functional_seg.data.preprocess import Preprocess
    from functional_seg.models import create_model
    from functional_seg.models.saved import model_metadata
    from functional_seg.train import init_train_state, make_optimizer

    model = create_model("segnet", num_classes=classes, widths=(8, 16), convs_per_stage=(1, 1))
    ts = init_train_state(model, make_optimizer(), jr.key(0))
    pre = Preprocess(size=size, class_names=tuple(f"class_{i}" for i in range(classes)))
    checkpoint.save(path, ts, {**model_metadata(model), "args": {"size": size}, "ensemble": 0,
                               "preprocess": pre.to_dict()})
    return str(path)


def _before_package(folder: Path, rev: str) -> str:
    """The package at ``rev`` under ``folder`` (``git archive``), for the "before" rows."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "functional_seg"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return str(folder)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--child" in argv:  # before parse_args: the harness imports functional_seg, and the row picks which
        print(MARK + json.dumps(child(json.loads(argv[argv.index("--child") + 1]))), flush=True)
        return 0
    args = parse_args(argv)
    from benchmarks import _rows as R
    from experiments import harness as C

    w, h = (int(v) for v in args.image.lower().split("x"))
    versions = [v.strip() for v in args.rows.split(",") if v.strip()]
    cases = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else list(CASES)
    budget, prov, stem = C.start(args, EXPERIMENT, f", a {w}x{h} photo, segnet 8,16 at {args.size} px")
    threads = args.threads or __import__("torch").get_num_threads()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_predict_memory_") as tmp:
        tmp = Path(tmp)
        photos = _photos(tmp, (w, h), max(n for *_, n in cases))
        packages = {"after": str(REPO)}
        if "before" in versions:
            (tmp / "before").mkdir()
            packages["before"] = _before_package(tmp / "before", args.before)
        for label, classes, tile, n in cases:
            ck = _checkpoint(tmp / f"segnet{classes}.safetensors", classes, args.size)
            for version in versions:
                key = f"{version}: {label}"
                if budget.over(reserve=30):
                    results[key] = {"status": "skipped: time budget"}
                    continue
                spec = {"package": packages[version], "checkpoint": ck, "tile": tile, "photos": photos[:n],
                        "batch_size": args.batch_size, "out": str(tmp / "out" / version), "threads": threads}
                results[key], _ = R.run_row_process("benchmarks.bench_predict_memory",
                                                    [*argv, "--child", json.dumps(spec)], MARK)
                r = results[key]
                r.update(version=version, case=label)
                shown = f"{r['peak_above_baseline_mb']:.0f} MB, {r['seconds']:.1f} s" if "peak_mb" in r else r["status"]
                print(f"  {key}: {shown}", flush=True)
    for label, *_ in cases:
        old, new = results.get(f"before: {label}", {}), results.get(f"after: {label}", {})
        if "peak_mb" in old and "peak_mb" in new:
            new["before_over_after"] = old["peak_above_baseline_mb"] / new["peak_above_baseline_mb"]
    table = [{"row": key, **r} for key, r in results.items()]
    notes = [f"one synthetic {w}x{h} JPEG (two for the batch row); SegNet widths 8,16, {args.size} px, "
             f"batch size {args.batch_size}, {threads} threads; mask + overlay PNGs written",
             f"before = the package at {args.before[:12]} (git archive); after = this checkout",
             "peak = VmHWM above the post-import RSS, each row in its own process"]
    md = C.md_header(f"Peak memory of predict_files on a {w}x{h} photo", prov, notes=notes)
    md += "\n" + C.md_table(table, [("row", "row"), ("peak_above_baseline_mb", "peak MB above baseline"),
                                    ("before_over_after", "before / after"), ("seconds", "s"),
                                    ("status", "status")]) + "\n"
    C.write_results(args.out, stem, C.payload(EXPERIMENT, prov, args, results), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
