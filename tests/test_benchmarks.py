"""Every benchmark runs at its smallest CPU setting and reports figures that hold together.

Not timing tests: no figure is compared with a speed. What is checked can fail: each row's
figures are there, finite and positive; a derived column (a ratio, images/s, a speed-up, MFU)
agrees with the raw figures of the same run, recomputed here; rows from different runs differ;
a wall time measured outside a run covers the times logged inside it; and where an independent
reference exists it agrees (the train step's FLOPs against torch's ``FlopCounterMode`` on the
``nn.Module`` twin, our mean IoU against torchmetrics'). It keeps the scripts that the GPU suite
runs unattended from rotting when the library's API moves.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ["--quick", "--device", "cpu", "--size", "32", "--batch-size", "4", "--widths", "4,4,8,8", "--threads", "1"]


def _bench(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def _results(out: Path, stem: str) -> dict:
    return json.loads((out / f"{stem}_cpu_quick.json").read_text())


def _positive(*values) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values)


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    """A small synthetic dataset in the Oxford-IIIT Pet layout (24 trainval, 8 test images)."""
    from functional_seg.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("bench") / "pets", n_trainval=24, n_test=8, size=(40, 56))


@pytest.fixture
def in_repo(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    return tmp_path


def test_eager_step_interleaves_two_rows(in_repo):
    assert _bench("bench_eager_step").main([*TINY, "--steps", "3", "--warmup", "1", "--out", str(in_repo)]) == 0
    payload = _results(in_repo, "bench_eager_step")
    results = payload["results"]
    assert set(results) == {"a_eager", "b"}
    for r in results.values():
        assert _positive(r["median_s"], r["min_s"], r["max_s"]) and r["min_s"] <= r["median_s"] <= r["max_s"], r
    assert results["a_eager"]["median_s"] != results["b"]["median_s"]  # two rows, two sets of runs
    assert results["a_eager"]["ratio_to_b"] == pytest.approx(results["a_eager"]["median_s"] / results["b"]["median_s"])


def test_memory_measures_each_row_in_its_own_process(in_repo):
    argv = [*TINY, "--rows", "a_eager,b", "--steps", "2", "--out", str(in_repo)]
    assert _bench("bench_memory").main(argv) == 0
    results = _results(in_repo, "bench_memory")["results"]
    for row in ("a_eager", "b"):
        r = results[row]
        assert _positive(r["peak_above_baseline_mb"], r["baseline_mb"], r["loss"], r["first_step_s"]), r
        assert r["peak_mb"] == pytest.approx(r["baseline_mb"] + r["peak_above_baseline_mb"])
        assert r["total_s"] >= r["first_step_s"] + r["last_step_s"]  # the build and both steps
    a, b = results["a_eager"], results["b"]
    assert a["ratio_to_b"] == pytest.approx(a["peak_above_baseline_mb"] / b["peak_above_baseline_mb"])


def test_train_step_figures_and_mfu_against_flop_counter(in_repo, pets):
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.reference_modules import build_reference
    from functional_seg.models import create_model

    argv = [*TINY, "--data", str(pets), "--rows", "a_eager,b,b_input", "--steps", "2", "--warmup", "1",
            "--workers", "0", "--peak-tflops", "1", "--out", str(in_repo)]
    assert _bench("bench_train_step").main(argv) == 0
    rows = _results(in_repo, "bench_train_step")["rows"]
    module = build_reference("segnet", create_model("segnet", widths=(4, 4, 8, 8)).cfg).eval()
    with FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, 3, 32, 32))
    train_flops = 3 * counter.get_total_flops()  # forward + backward (twice the forward) per image
    for name in ("a_eager", "b"):
        r = rows[name]
        assert _positive(r["images_per_s"], r["ms_per_step"], r["mfu"]), r
        assert r["images_per_s"] * r["ms_per_step"] / 1e3 == pytest.approx(4)  # batch 4 a step
        assert r["mfu"] * 1e12 / r["images_per_s"] == pytest.approx(train_flops, rel=1e-6)
        assert r["precision"] == "fp32" and r["layout"] == "NCHW"  # the CPU runtime
    assert _positive(rows["b_input"]["images_per_s"]) and "mfu" not in rows["b_input"]
    assert rows["a_eager"]["ms_per_step"] != rows["b"]["ms_per_step"]


def test_compile_cache_eager_row_in_a_child_process(in_repo):
    argv = [*TINY, "--rows", "eager", "--steps", "2", "--out", str(in_repo)]
    assert _bench("bench_compile_cache").main(argv) == 0
    eager = _results(in_repo, "bench_compile_cache")["results"]["eager"]
    assert _positive(eager["step_s"], eager["first_train_s"], eager["first_eval_s"], eager["process_s"]), eager
    # the parent's clock around the child covers the child's own timings
    assert eager["process_s"] > eager["first_train_s"] + eager["first_eval_s"] + eager["step_s"]


def test_ensemble_vmapped_against_sequential(in_repo, pets):
    argv = [*TINY, "--data", str(pets), "--members", "2", "--steps", "2", "--warmup", "1", "--out", str(in_repo)]
    assert _bench("bench_ensemble").main(argv) == 0
    r = _results(in_repo, "bench_ensemble")["results"]["eager"]
    assert r["init_matches_init_ensemble"] is True  # K single inits stacked == the ensemble's own init
    assert _positive(r["sequential_ms"], r["vmapped_ms"], r["sequential_warmup_s"], r["vmapped_warmup_s"]), r
    assert r["speedup"] == pytest.approx(r["sequential_ms"] / r["vmapped_ms"])
    assert r["vmapped_images_per_s"] == pytest.approx(2 * 4 / (r["vmapped_ms"] / 1e3))
    assert r["sequential_ms"] != r["vmapped_ms"]


def test_end_to_end_runs_the_cli_on_cycled_data(in_repo, pets):
    argv = ["--quick", "--device", "cpu", "--data", str(pets), "--size", "32", "--batch-size", "8", "--epochs", "2",
            "--repeat-to", "40", "--caches", "cold", "--model-cfg", "widths=4,8 convs_per_stage=1,1",
            "--threads", "1", "--out", str(in_repo)]
    assert _bench("bench_end_to_end").main(argv) == 0
    r = _results(in_repo, "bench_end_to_end")["results"]["cold"]
    assert r["status"] == "ok" and r["completed"] == "complete" and r["epochs"] == 2, r
    assert r["source_images"] == 24 and r["cycled_images"] == 40 and 0 < r["train_images"] < 40  # carve took val
    assert len(r["per_epoch_s"]) == 2 and _positive(r["wall_s"], r["train_s"], r["eval_s"], *r["per_epoch_s"])
    assert r["wall_s"] > r["train_s"] + r["eval_s"]  # the process's wall time covers what its log timed
    assert r["images_per_s"] == pytest.approx(r["train_images"] * 2 / r["wall_s"])
    assert 0 <= r["test_mean_iou"] <= 1 and r["test_split"] == "test"


def test_distributed_rows_under_torchrun(in_repo):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "benchmarks.bench_distributed", "--device", "cpu", "--widths", "4,8", "--size", "16",
           "--batch-size", "2", "--steps", "2", "--warmup", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    ms = out["median_ms"]
    assert set(ms) == {"plain", "flat", "per-leaf"} and _positive(*ms.values()), out
    assert out["overhead_flat_vs_plain_ms"] == pytest.approx(ms["flat"] - ms["plain"], abs=2e-3)
    assert out["world_size"] == 1 and out["param_tensors"] > 0 and out["grad_mb"] > 0


def test_latency_pure_and_module_rows(capsys):
    argv = ["--device", "cpu", "--models", "segnet_dsc", "--batch-sizes", "2", "--size", "32", "--quick",
            "--no-compile", "--no-onnx", "--warmup", "1", "--repeats", "2"]
    assert _bench("bench_latency").main(argv) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("segnet_dsc"))
    cells = re.findall(r"([\d.]+) ms\s+([\d.]+)/s", row)
    assert len(cells) == 2, row  # pure eager, nn.Module eager
    for ms, per_s in cells:
        assert _positive(float(ms), float(per_s))
        assert float(per_s) == pytest.approx(2 / (float(ms) / 1e3), rel=0.02)  # batch 2; rounding of the print


def test_metrics_agree_with_torchmetrics(capsys):
    pytest.importorskip("torchmetrics")
    _bench("bench_metrics").main(["--device", "cpu", "--batch", "2", "--size", "16", "--repeat", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    values = re.findall(r"([\d.]+) ms  mIoU ([\d.]+)", out)
    assert len(values) == 4 and "DIFFERS" not in out, out
    assert len({v for _, v in values}) == 1 and 0 < float(values[0][1]) < 1
    assert _positive(float(re.search(r"ours: ([\d.]+)x", out).group(1)))


def test_data_pipelines_report_rates(capsys, pets):
    argv = ["--sample", str(pets), "--skip-prepare", "--batch-size", "4", "--batches", "2", "--repeats", "1",
            "--tv-workers", "0", "--presets", "flip", "--threads", "1"]
    _bench("bench_data").main(argv)
    rows = [line for line in capsys.readouterr().out.splitlines() if re.search(r"\sflip\s+\d+$", line)]
    assert len(rows) == 3, rows  # ours with the Loader, ours augment only, torchvision
    assert all(int(line.split()[-1]) > 0 for line in rows)


def test_suite_report_stamps_the_tables_of_this_run_only(tmp_path):
    from benchmarks import suite_report

    old, new = tmp_path / "old_cuda.md", tmp_path / "new_cuda.md"
    old.write_text("# Old\n\n- command: `python -m old`\n")
    os.utime(old, (1_000_000, 1_000_000))
    new.write_text("# New\n\n- device: x\n- command: `python -m new`\n- a note\n\n| a |\n|---|\n| 1 |\n")
    (tmp_path / "new_cuda.json").write_text(json.dumps({"provenance": {"command": "python -m new"}, "rows": {}}))
    (tmp_path / "flat_cuda.json").write_text(json.dumps({"x": 1}))
    assert suite_report.main(["stamp", str(tmp_path), "--since", "2000000", "--commit", "abc123"]) == 0
    assert suite_report.main(["stamp", str(tmp_path), "--since", "2000000", "--commit", "def456"]) == 0  # again
    lines = new.read_text().splitlines()
    assert lines[3:5] == ["- command: `python -m new`", "- commit: `def456`"] and "abc123" not in new.read_text()
    assert old.read_text() == "# Old\n\n- command: `python -m old`\n"  # written before the run: untouched
    assert json.loads((tmp_path / "new_cuda.json").read_text())["provenance"]["commit"] == "def456"
    assert json.loads((tmp_path / "flat_cuda.json").read_text()) == {"x": 1, "commit": "def456"}
    assert suite_report.brief("# T\n| a |\n\n# Profile\n| p |\n", 10) == "# T\n| a |\n"


def test_pretrained_step_times_both_rows_and_measures_a_row(in_repo):
    """Time rows through main (memory rows skipped: a fresh process each, tens of seconds); the memory row's
    code in this process."""
    bench = _bench("bench_pretrained_step")
    argv = ["--quick", "--device", "cpu", "--size", "32", "--batch-size", "2", "--encoder", "test_efficientnet",
            "--steps", "2", "--warmup", "0", "--mem-steps", "1", "--out", str(in_repo)]
    assert bench.main([*argv, "--skip-memory", "--rows", "a_eager,b,c", "--backend", "aot_eager"]) == 0
    results = _results(in_repo, "bench_pretrained_step")["results"]
    assert set(results) == {"a_eager", "b", "c"} and all(_positive(r["median_s"], r["cpu_s"]) for r in results.values())
    assert results["a_eager"]["time_x_ref"] == pytest.approx(results["a_eager"]["median_s"] / results["b"]["median_s"])
    row = bench.child(bench.parse_args([*argv, "--child", "a_eager"]))  # in this process: the heap may not grow
    assert row["peak_above_baseline_mb"] >= 0 and 0 < row["loss"] < 10


def test_predict_memory_measures_a_row_in_its_own_process(in_repo):
    argv = ["--quick", "--image", "160x120", "--rows", "after", "--cases", "0", "--size", "32", "--out", str(in_repo)]
    assert _bench("bench_predict_memory").main(argv) == 0
    (row,) = _results(in_repo, "bench_predict_memory")["results"].values()
    assert row["peak_above_baseline_mb"] > 0 and row["seconds"] > 0 and row["version"] == "after", row
