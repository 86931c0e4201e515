"""The experiments report what the library measures: a table's test figures are ``fseg eval``'s.

Runs the smallest config of ``experiments.augmentation`` (one tiny SegNet without augmentation,
one epoch of two steps on a synthetic dataset) and checks that the test mean IoU, pixel accuracy,
series IoU, custom IoU and per-class IoU it writes are exactly what ``fseg eval --json`` prints for
the checkpoint it selected, and that its train seconds are the run's ``metrics.jsonl`` times.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from functional_seg import cli
from functional_seg.data import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def augmentation(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # the experiments are run from the repository root
    return importlib.import_module("experiments.augmentation")


def test_experiment_test_figures_equal_fseg_eval(augmentation, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = make_synthetic_dataset(tmp_path / "data", n_trainval=20, n_test=8, size=(32, 40), seed=0)
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--quick", "--data", str(root), "--variants", "none", "--size", "32", "--epochs", "1",
            "--batch-size", "8", "--device", "cpu", "--out", str(out), "--runs", str(runs), "--no-figures"]
    assert augmentation.main(argv) == 0
    row = json.loads((out / "augmentation_cpu_quick.json").read_text())["results"]["none"]
    assert row["status"] == "ok", row["status"]
    checkpoint = Path(row["checkpoint"])
    assert checkpoint.name == "best.safetensors" and checkpoint.is_relative_to(runs)
    capsys.readouterr()

    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--data", str(root), "--split", "test",
                     "--batch-size", "8", "--device", "cpu", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["summary"]
    for key in ("mean_iou", "pixel_accuracy", "series_iou", "iou"):
        assert row[key] == printed[key], key
    assert row["custom_iou"] == printed["series_custom_iou"]
    assert [row["iou_pet"], row["iou_background"], row["iou_border"]] == printed["iou"]

    records = [json.loads(line) for line in (checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    assert row["train_s"] == sum(r["train_time_s"] for r in records)
    assert row["val_mean_iou"] == max(r["val"]["mean_iou"] for r in records)
