"""Faults a user meets, each answered by one line, a non-zero exit and no lost file.

Real faults where this machine allows them (a read-only tmpfs, a tmpfs too small for the next
checkpoint: both need root to mount, else the test is skipped), real files otherwise (a file
where the run folder should be, results without a checkpoint, a live run holding the lock).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fault_checks import files, one_line

from functional_seg.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "segnet", "--model-cfg", "widths=8,16", "convs_per_stage=1,1"]


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    from functional_seg.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "pets", n_trainval=16, n_test=8, size=40)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    # Every split here is read from its shards at each batch (the path of splits larger than memory),
    # however small: the faults must be answered the same way on it.
    monkeypatch.setattr("functional_seg.data.store.RESIDENT_MAX_BYTES", 0)


def _train(pets, out, *extra) -> list[str]:
    return ["train", "--data", str(pets), *TINY, "--size", "32", "--epochs", "1", "--batch-size", "4",
            "--out", str(out), "--no-progress", "--device", "cpu", "--test-split", "none", *extra]


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_out_naming_a_file(pets, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(_train(pets, target)) == 2
    one_line(capsys, str(target), "is a file")
    assert target.read_text() == "mine"


def test_out_on_a_read_only_file_system(pets, tmp_path, capsys):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        assert main(_train(pets, ro / "run")) == 2
        one_line(capsys, str(ro / "run"), "read-only")


def test_disk_full_while_checkpointing_keeps_the_last_good_checkpoint(pets, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(_train(pets, first)) == 0
    capsys.readouterr()
    used = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    pages = used // 4096 + len(list(first.iterdir())) + 3  # the files, with a little room for metrics
    with _tmpfs(tmp_path / "small", f"size={pages * 4096}") as small:
        run = small / "run"
        shutil.copytree(first, run)
        before = files(run, ignore=(".lock",))
        assert main([*_train(pets, run, "--resume"), "--epochs", "2"]) == 2
        one_line(capsys, f"cannot write {run}", ".safetensors: no space left on the device")
        after = files(run, ignore=(".lock",))
        for name in ("last.safetensors", "best.safetensors"):
            assert after[name] == before[name], name  # the old checkpoints are whole
        assert not [name for name in after if name.endswith(".tmp")]  # no half-written temporary left


@pytest.mark.parametrize("cfg, named", [
    ("widths=a,b", "widths"), ("widths=0,16", "widths"), ("widths=-4,16", "widths"), ("num_classes=0", "num_classes"),
])
def test_bad_model_cfgs_stop_before_anything_is_written(pets, tmp_path, capsys, cfg, named):
    argv = _train(pets, tmp_path / "run")
    argv[argv.index("convs_per_stage=1,1")] = cfg if "widths" in cfg else "convs_per_stage=1,1"
    if "widths" not in cfg:
        argv.insert(argv.index("--size"), cfg)
    assert main(argv) == 2
    one_line(capsys, named)
    assert not (tmp_path / "run").exists()


def test_results_without_a_checkpoint_are_kept(pets, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"epoch": 1, "step": 4}\n')
    (run / "best.safetensors").write_bytes(b"the user's best model")
    before = files(run, ignore=(".lock",))
    assert main(_train(pets, run)) == 2
    one_line(capsys, "already holds a run", "--resume")
    assert main(_train(pets, run, "--resume")) == 2
    one_line(capsys, "no last.safetensors", "move those files away")
    assert files(run, ignore=(".lock",)) == before


def test_resume_with_another_lr_is_refused_and_the_record_stays_true(pets, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train(pets, run)) == 0
    before = files(run, ignore=(".lock",))
    capsys.readouterr()
    assert main([*_train(pets, run, "--resume", "--lr", "0.5"), "--epochs", "2"]) == 2
    one_line(capsys, "optimizer.lr was 0.001", "this run has 0.5")
    assert files(run, ignore=(".lock",)) == before


def test_a_second_live_run_is_refused(pets, tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from functional_seg.train import RunDir; "
                               "r = RunDir(sys.argv[1]).__enter__(); print('locked', flush=True); time.sleep(60)",
                               str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_train(pets, run)) == 2
        one_line(capsys, f"another run (pid {holder.pid}) is writing to {run}")
    finally:
        holder.kill()
        holder.wait()
    assert main(_train(pets, run)) == 0  # the lock went with its holder


def test_training_on_images_the_test_split_also_holds_warns(pets, tmp_path):
    argv = _train(pets, tmp_path / "run", "--train-split", "train")
    argv[argv.index("--test-split") + 1] = "test"  # the seeded 80% of all images holds test images too
    with pytest.warns(UserWarning, match=r"\d+ of the 8 test images are also training images"):
        assert main(argv) == 0


def test_help_shows_defaults_and_imports_no_torch():
    code = ("import sys, contextlib, io; from functional_seg import cli\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit): cli.main(['train', '--help'])\n"
            "print('torch' in sys.modules); print(buf.getvalue())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    first, text = proc.stdout.split("\n", 1)
    text = " ".join(text.split())
    assert first == "False", "fseg train --help imported torch"
    assert "learning rate (default: 0.001)" in text and "(default: carve)" in text


def test_metrics_file_is_strict_json_even_when_a_value_is_nan(tmp_path):
    from functional_seg.core.files import append_jsonl

    append_jsonl(tmp_path / "m.jsonl", {"mean_iou": float("nan"), "iou": [0.5, float("inf")]})
    record = json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert record == {"mean_iou": None, "iou": [0.5, None]}
