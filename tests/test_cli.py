"""The ``fseg`` command line: train on the real sample, eval, predict, prepare, models, summary, one-line
errors, and a SIGKILLed run resumed to bit-identical parameters.

The sample run trains a 2-stage SegNet (8/16 channels) at 64 px on the 300 trainval images of
``../shared/data/oxford-pets-sample`` (override with FSEG_SAMPLE_DATA) for 2 epochs, about 20 s
on two CPU cores. The kill-and-resume test runs three ``fseg train`` processes on 32 px
synthetic data with one thread each (so the float reductions run in the same order).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sample_data import SAMPLE

from functional_seg import checkpoint as ckpt
from functional_seg.cli import main
from functional_seg.core.settings import parse_value

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "segnet", "--model-cfg", "widths=8,16", "convs_per_stage=1,1"]


def _fseg(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "functional_seg.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=kw.get("cwd", REPO))


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """One training run on the real sample, made here so that every test using it can run alone."""
    if not (SAMPLE / "annotations" / "trainval.txt").exists():
        pytest.skip(f"the Oxford pets sample is not at {SAMPLE} (set FSEG_SAMPLE_DATA)")
    out = tmp_path_factory.mktemp("sample_run")
    cache = tmp_path_factory.mktemp("cache")
    argv = ["train", "--data", str(SAMPLE), *TINY, "--size", "64", "--epochs", "2", "--batch-size", "32",
            "--cache-dir", str(cache), "--out", str(out / "run"), "--no-progress", "--device", "cpu"]
    proc = _fseg(*argv)
    assert proc.returncode == 0, proc.stderr
    return argv, out / "run", cache, proc


def test_train_on_the_sample_writes_metrics_and_a_loadable_checkpoint(sample_run):
    from functional_seg.models import load_checkpoint

    _, run, _, proc = sample_run
    printed = proc.stdout
    assert "mean IoU (macro)" in printed and "pixel accuracy" in printed and "series custom IoU" in printed
    assert "\nvalidation\n" in printed and "\ntest (test, " in printed  # selection and the final test apart
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    carved = round(0.1 * 300)
    assert records[-1]["step"] == 2 * ((300 - carved) // 32)
    assert sum(map(sum, records[-1]["val"]["confusion"])) == carved * 64 * 64  # validation: the carved 10%
    test = json.loads((run / "test.json").read_text())
    assert test["split"] == "test" and sum(map(sum, test["summary"]["confusion"])) == 298 * 64 * 64
    loaded = load_checkpoint(run / "last.safetensors")
    model, params, state, meta = loaded.model, loaded.params, loaded.state, loaded.meta
    assert model.name == "segnet" and model.cfg.widths == (8, 16)
    assert meta["preprocess"]["size"] == 64 and meta["args"]["data"] == str(SAMPLE)
    logits, _ = model.apply(params, state, torch.zeros(1, 3, 64, 64), train=False)
    assert logits.shape == (1, 3, 64, 64)
    for name in ("best.safetensors", "config.json", "curves.png"):
        assert (run / name).exists(), name
    assert "\r" not in proc.stderr  # not a terminal: plain lines
    assert [line.split("  ")[0] for line in proc.stderr.splitlines() if line.startswith("epoch ")] == \
        ["epoch 1/2", "epoch 2/2"]  # --no-progress keeps the per-epoch lines


def test_eval_prints_the_table_and_json_equal_to_the_final_test(sample_run, capsys):
    _, run, cache, _ = sample_run
    common = ["eval", "--checkpoint", str(run / "best.safetensors"), "--data", str(SAMPLE), "--split", "test",
              "--cache-dir", str(cache), "--device", "cpu"]
    assert main(common) == 0
    text = capsys.readouterr().out
    assert "on test, 298 images at 64x64 (resize), the prepared images and masks (fp32)" in text
    assert "mean IoU (macro)" in text
    assert main([*common, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"pixel_accuracy", "mean_iou", "iou", "series_iou", "series_custom_iou"} <= set(result["summary"])
    assert result["summary"] == json.loads((run / "test.json").read_text())["summary"]


def test_member_of_a_single_model_is_refused(sample_run, capsys):
    _, run, cache, _ = sample_run
    assert main(["eval", "--checkpoint", str(run / "best.safetensors"), "--data", str(SAMPLE), "--member", "1",
                 "--cache-dir", str(cache), "--device", "cpu"]) == 2
    assert "holds one model, not an ensemble" in capsys.readouterr().err


def test_training_writes_nothing_inside_the_data_folder(tmp_path, monkeypatch):
    from functional_seg.data import make_synthetic_dataset

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = make_synthetic_dataset(tmp_path / "pets", n_trainval=16, n_test=8, size=40)

    def listing():
        return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))

    before = listing()
    assert main(["train", "--data", str(root), *TINY, "--size", "32", "--epochs", "1", "--batch-size", "4",
                 "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]) == 0
    assert listing() == before
    assert any((tmp_path / "cache").rglob("*.safetensors"))


def test_audit_command_scores_with_the_views_asked_for(tmp_path, capsys, monkeypatch):
    from functional_seg.data import make_synthetic_dataset

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = make_synthetic_dataset(tmp_path / "pets", n_trainval=12, n_test=2, size=40)
    base = ["audit", "--data", str(root), *TINY, "--folds", "2", "--size", "32", "--epochs", "1", "--batch-size",
            "4", "--top", "2", "--no-progress", "--device", "cpu"]
    assert main([*base, "--tta", "none", "--out", str(tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert saved["tta"] == "none" and len(saved["images"]) == 12
    ranked = [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]]
    assert ranked == [row["name"] for row in saved["images"]]
    with pytest.raises(SystemExit):
        main([*base, "--tta", "sideways", "--out", str(tmp_path / "other")])
    assert "invalid choice: 'sideways'" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_prepare_and_models(tmp_path, capsys):
    from functional_seg.data import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "syn", n_trainval=4, n_test=2, size=32)
    assert main(["prepare", "--data", str(root), "--split", "test", "--size", "16", "--cache-dir",
                 str(tmp_path / "c"), "--workers", "1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 2 and info["size"] == 16 and Path(info["cache"]).exists()
    assert main(["models"]) == 0
    assert "segnet" in capsys.readouterr().out.split()


def test_summary_command(capsys):
    """A 2-stage SegNet (8/16 channels, one conv per stage) at 32 px, worked by hand."""
    from functional_seg.core import random as jr
    from functional_seg.core.tree import tree_leaves
    from functional_seg.models import create_model

    assert main(["summary", "--model", "segnet", "--model-cfg", "widths=8,16", "convs_per_stage=1,1", "--size",
                 "32", "--json"]) == 0
    totals = json.loads(capsys.readouterr().out)
    # 3x3 bias-free convs (C_in, C_out, side): encoder 3->8 @32, 8->16 @16; decoder 16->8 @16, 8->3 @32
    convs = [(3, 8, 32), (8, 16, 16), (16, 8, 16), (8, 3, 32)]
    bn_channels = [3, 8, 16, 8, 3]  # the input BN, then one per conv
    params = sum(9 * c_in * c_out for c_in, c_out, _ in convs) + 2 * sum(bn_channels)
    init_params, _ = create_model("segnet", widths=(8, 16), convs_per_stage=(1, 1)).init(jr.key(0))
    assert totals["total_params"] == params == sum(t.numel() for t in tree_leaves(init_params)) == 2_812
    assert totals["total_mult_adds"] == sum(9 * c_in * c_out * side**2 for c_in, c_out, side in convs) == 1_032_192
    assert totals["input_shape"] == [1, 3, 32, 32] and totals["input_bytes"] == 3 * 32 * 32 * 4
    assert totals["param_bytes"] == 4 * 2_812
    assert main(["summary", "--model", "segnet", "--model-cfg", "widths=8,16", "convs_per_stage=1,1", "--size",
                 "32"]) == 0
    assert "Total params: 2,812" in capsys.readouterr().out


def test_summary_of_a_model_too_big_for_memory_is_one_line(capsys):
    start = time.monotonic()
    assert main(["summary", "--model", "segnet", "--model-cfg", "widths=100000,100000,100000,100000"]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert err.startswith("fseg: error: segnet: input [1, 3, 128, 128] needs an estimated ") and err.count("\n") == 1
    assert "GB is available" in err


@pytest.mark.parametrize("cfg, message", [
    (["widths=a,b,c,d"], "segnet: widths must be a non-empty tuple of positive integers (e.g. 8,16), "
                         "got ('a', 'b', 'c', 'd')"),
    (["widths=0,8,8,8"], "segnet: widths must be a non-empty tuple of positive integers (e.g. 8,16), got (0, 8, 8, 8)"),
    (["widths=-4,8,8,8"], "segnet: widths must be"),
    (["num_classes=0"], "segnet: num_classes must be a positive integer, got 0"),
    (["widths=8,16"], "segnet: convs_per_stage must be of length 2"),
    (["kernel_size=4"], "segnet: kernel_size must be a positive odd integer, got 4"),
    (["bogus=1"], "segnet: unknown field(s) ['bogus']; valid: num_classes, in_channels, widths, convs_per_stage, "
                  "kernel_size, separable, input_bn, final_relu"),
])
def test_bad_model_cfg_is_one_line_before_anything_is_written(cfg, message, tmp_path, capsys):
    argv = ["train", "--model", "segnet", "--model-cfg", *cfg, "--synthetic", str(tmp_path / "syn"), "--out",
            str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fseg: error: {message}")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no dataset, cache or run directory


def test_torch_s_own_deprecations_are_not_shown_but_ours_are(monkeypatch):
    import warnings

    from functional_seg import cli

    def noisy(args):
        # what inductor does while it compiles, then a warning of ours
        warnings.warn_explicit("`torch._prims_common.check` is deprecated", FutureWarning, "lowering.py", 1,
                               module="torch._inductor.lowering")
        warnings.warn_explicit("12 images were skipped", UserWarning, "reader.py", 1, module="functional_seg.data")
        return 0

    monkeypatch.setattr(cli, "cmd_summary", noisy)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")  # below main's own filters, which go first
        assert main(["summary", "--model", "segnet"]) == 0
    assert [str(w.message) for w in shown] == ["12 images were skipped"]


def test_a_damaged_compile_cache_is_one_line_before_anything_is_written(tmp_path, capsys):
    bad = tmp_path / "compiled.bin"
    bad.write_bytes(b"\x00 not a cache")
    argv = ["train", *TINY, "--synthetic", str(tmp_path / "syn"), "--out", str(tmp_path / "run"), "--cache-dir",
            str(tmp_path / "cache"), "--device", "cpu", "--compile", "on", "--compile-cache", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fseg: error: --compile-cache: compile cache {bad}: not a compile-cache file")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compiled.bin"] and bad.read_bytes() == b"\x00 not a cache"


def test_a_compile_cache_without_compilation_is_a_warning_and_writes_nothing(tmp_path):
    file = tmp_path / "compiled.bin"
    argv = ["train", *TINY, "--synthetic", str(tmp_path / "syn"), "--out", str(tmp_path / "run"), "--cache-dir",
            str(tmp_path / "cache"), "--device", "cpu", "--epochs", "1", "--max-steps", "1", "--batch-size", "4",
            "--size", "32", "--no-progress", "--compile-cache", str(file)]
    with pytest.warns(RuntimeWarning, match=f"--compile-cache {file} is unused: this run does not compile"):
        assert main(argv) == 0
    assert not file.exists() and (tmp_path / "run" / "last.safetensors").exists()


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "nosuch"], "unknown model 'nosuch'"),
    (["train", "--model-cfg", "depth"], "--model-cfg expects key=value"),
    (["train", "--model-cfg", "bogus=1"], "unknown field"),
    (["train", "--epochs", "0"], "--epochs: must be a positive integer, got 0"),
    (["train", "--lr=-1e-3"], "--lr: must be a positive number"),
    (["train", "--loss-cfg", "gamma=2"], "takes keywords"),
    (["train", "--data", "/nonexistent/pets"], "/nonexistent/pets"),
    (["train", "--sweep", "lr=fast"], "--sweep: values must be numbers"),
    (["train", "--size", "30", *TINY], "divisible by the model's stride"),
    (["train", "--device", "cuda:0"] if not torch.cuda.is_available() else ["train", "--device", "tpu"], "device"),
    (["eval", "--checkpoint", "/nonexistent.safetensors", "--data", "."], "does not exist"),
    (["eval", "--checkpoint", __file__, "--data", "."], "expected a safetensors checkpoint"),
])
def test_bad_arguments_give_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fseg: error: ") and err.count("\n") == 1 and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["train", "--loss", "nope"], ["train", "--optimizer", "lion"], ["frobnicate"],
                                  ["train", "--augment", "wild"], ["eval", "--data", "."]])
def test_argparse_errors_are_one_line_too(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fseg: error: ") and err.count("\n") == 1


def test_entry_point_reports_errors_without_traceback():
    proc = _fseg("train", "--model", "nosuch", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["fseg: error: unknown model 'nosuch'; available: "
                                                + proc.stderr.split("available: ")[1].strip()]


def test_parse_value():
    assert parse_value("8,16,32") == (8, 16, 32)
    assert parse_value("0.5") == 0.5 and parse_value("true") is True and parse_value("none") is None
    assert parse_value("relu") == "relu" and parse_value("3") == 3


# ----------------------------------------------------------------------------------------------
# Kill -9 and resume


def _step_in(path: Path) -> int:
    try:
        return int(ckpt.read(path)[0]["step"])
    except ckpt.CheckpointError:  # not written yet
        return -1


def test_sigkilled_run_resumes_to_bit_identical_params(tmp_path):
    syn = tmp_path / "syn"
    common = ["train", "--synthetic", str(syn), *TINY, "--size", "32", "--limit", "16", "--batch-size", "4",
              "--epochs", "3", "--val-split", "none", "--test-split", "none", "--device", "cpu", "--no-progress",
              "--checkpoint-every", "1",
              "--cache-dir", str(tmp_path / "cache"), "--seed", "7", "--optimizer", "sgd", "--lr", "0.05"]
    one_go = _fseg(*common, "--out", str(tmp_path / "one_go"))
    assert one_go.returncode == 0, one_go.stderr

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "functional_seg.cli", *common, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO)
    last = out / "last.safetensors"
    deadline = time.monotonic() + 120
    # Kill it in epoch 2, once a checkpoint past the first epoch's end exists.
    while _step_in(last) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    tensors, _ = ckpt.read(last)  # whatever the moment of the kill, the file is whole
    stopped_at = int(tensors["step"])
    assert 5 <= stopped_at < 12

    resumed = _fseg(*common, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, _ = ckpt.read(tmp_path / "one_go" / "last.safetensors")
    b, _ = ckpt.read(last)
    assert int(a["step"]) == int(b["step"]) == 12
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"resumed from step {stopped_at}; differing tensors: {different[:5]}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]


@pytest.mark.parametrize("layout", ["generic", "voc"])
def test_own_data_trains_and_evaluates_with_its_class_names(tmp_path, layout):
    """A generic 5-class folder and a small VOC tree: fseg train takes C from the data, and fseg
    eval prints the per-class table under the data's own names; a broken image is refused by name."""
    from functional_seg.data import make_generic_dataset, make_voc_dataset

    if layout == "generic":
        root, c, names = make_generic_dataset(tmp_path / "mine", n=20, num_classes=5, seed=1), 5, ["shape_4"]
        image = sorted((tmp_path / "mine" / "images").glob("*.jpg"))[0]
    else:
        root, c, names = make_voc_dataset(tmp_path / "voc", n=12, seed=2), 21, ["aeroplane", "tvmonitor"]
        image = sorted((tmp_path / "voc" / "JPEGImages").glob("*.jpg"))[0]
    common, val = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"], "val"
    run = tmp_path / "run"
    proc = _fseg("train", "--data", str(root), *TINY, "--size", "32", "--epochs", "1", "--batch-size", "4",
                 "--val-split", val, "--test-split", "none", "--out", str(run), "--no-progress", *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, meta = ckpt.load(run / "last.safetensors")
    assert len(meta["preprocess"]["class_names"]) == c
    proc = _fseg("eval", "--checkpoint", str(run / "last.safetensors"), "--data", str(root), "--split", val, *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(name in proc.stdout for name in names), proc.stdout
    image.write_bytes(b"not an image")
    proc = _fseg("train", "--data", str(root), *TINY, "--size", "32", "--epochs", "1", "--out", str(tmp_path / "r2"),
                 "--cache-dir", str(tmp_path / "cache2"), "--device", "cpu",
                 *(["--test-split", "none"] if layout == "voc" else []))  # VOC lists no test split
    assert proc.returncode != 0 and image.name in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
