"""The benchmarks run: each one's smallest setting on the CPU writes its table with real figures.

Not a timing test (figures are only checked to be there and positive): it keeps the scripts that
the GPU suite runs unattended from rotting when the library's API moves.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from sample_data import SAMPLE

REPO = Path(__file__).resolve().parents[1]
TINY = ["--quick", "--device", "cpu", "--size", "32", "--batch-size", "4", "--widths", "4,4,8,8"]


def _bench(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def _results(out: Path, stem: str) -> dict:
    return json.loads((out / f"{stem}_cpu_quick.json").read_text())


def test_eager_step_times_both_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert _bench("bench_eager_step").main([*TINY, "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]) == 0
    results = _results(tmp_path, "bench_eager_step")["results"]
    assert set(results) == {"a_eager", "b"} and all(r["median_s"] > 0 for r in results.values())
    assert results["b"]["ratio_to_b"] == 1.0


def test_memory_measures_each_row_in_its_own_process(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert _bench("bench_memory").main([*TINY, "--rows", "a_eager,b", "--steps", "1", "--out", str(tmp_path)]) == 0
    results = _results(tmp_path, "bench_memory")["results"]
    for row in ("a_eager", "b"):
        assert results[row]["peak_above_baseline_mb"] > 0, results[row]
    assert results["b"]["ratio_to_b"] == 1.0


def test_train_step_reports_images_per_second_and_mfu(tmp_path, monkeypatch):
    if not (SAMPLE / "annotations" / "trainval.txt").exists():
        pytest.skip(f"the Oxford pets sample is not at {SAMPLE} (set FSEG_SAMPLE_DATA)")
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    argv = [*TINY, "--data", str(SAMPLE), "--rows", "a_eager,b", "--steps", "1", "--warmup", "1", "--workers", "0",
            "--peak-tflops", "1", "--out", str(tmp_path)]
    assert _bench("bench_train_step").main(argv) == 0
    rows = _results(tmp_path, "bench_train_step")["rows"]
    for row in ("a_eager", "b"):
        assert rows[row]["images_per_s"] > 0 and 0 < rows[row]["mfu"] < 1, rows[row]


def test_compile_cache_runs_its_eager_row(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert _bench("bench_compile_cache").main([*TINY, "--rows", "eager", "--steps", "2", "--out", str(tmp_path)]) == 0
    eager = _results(tmp_path, "bench_compile_cache")["results"]["eager"]
    assert eager["step_s"] > 0 and eager["first_train_s"] > 0 and eager["x_eager_step"] == 1.0


def test_predict_memory_measures_a_row_in_its_own_process(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["--quick", "--image", "160x120", "--rows", "after", "--cases", "0", "--size", "32", "--out", str(tmp_path)]
    assert _bench("bench_predict_memory").main(argv) == 0
    (row,) = _results(tmp_path, "bench_predict_memory")["results"].values()
    assert row["peak_above_baseline_mb"] > 0 and row["seconds"] > 0 and row["version"] == "after", row
