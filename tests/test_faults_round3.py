"""Fault report round 3 (issue 23): each item a user met, answered by one clear line, the right exit
code and no lost file. Item numbers are the report's; items 4, 6, 8 and 11 (prediction, the
prepared cache) are tested beside their features.

Tiny data (16 images at 32 px, 1 epoch, batch 4, one decoding worker); real processes where the
fault is about them (a rank that cannot reach its rendezvous, a SIGKILL between two checkpoint
writes). The two-process resume of item 13 lives in test_distributed.py beside its helpers.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_checks import files, one_line
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from tiny_models import make_checkpoint

from functional_seg import checkpoint as ckpt
from functional_seg.cli import main
from functional_seg.core.tree import flatten_with_names
from functional_seg.data import DataWarning, make_generic_dataset, make_synthetic_dataset, make_voc_dataset, prepare
from functional_seg.data.label_sets import classes_from_stats, value_stats

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "segnet", "--model-cfg", "widths=4,8", "convs_per_stage=1,1"]


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "pets", n_trainval=16, n_test=8, size=40)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    """A generic layout without classes.txt: 16 masks of 32 x 32 px holding 0, 1, 2 (and 255)."""
    return make_generic_dataset(tmp_path_factory.mktemp("gen") / "g", n=16, num_classes=3, size=32,
                                classes_file=False)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


def _copy(root: Path, tmp_path: Path, name: str = "data") -> Path:
    return Path(shutil.copytree(root, tmp_path / name))


def _remask(root: Path, fn) -> None:
    for p in sorted((root / "masks").glob("*.png")):
        Image.fromarray(fn(np.asarray(Image.open(p)))).save(p)


def _train(data, out, *extra) -> list[str]:
    return ["train", "--data", str(data), *TINY, "--size", "32", "--epochs", "1", "--batch-size", "4",
            "--workers", "1", "--out", str(out), "--no-progress", "--device", "cpu", "--test-split", "none", *extra]


# ------------------------------------------------------------------------------ item 2: 0/255, one class


def test_binary_masks_saved_0_255_are_refused_with_the_flag_named_and_read_with_it(gen, tmp_path, capsys):
    root = _copy(gen, tmp_path)
    _remask(root, lambda m: np.where((m > 0) & (m < 255), 255, 0).astype(np.uint8))
    before = files(root)
    assert main(_train(root, tmp_path / "run")) == 2
    one_line(capsys, str(root / "masks"), "only 0 and 255", "255 means ignore", "--binary-255")
    assert not (tmp_path / "run").exists() and files(root) == before

    data = prepare(root, "train", 32, workers=1, binary_255=True)  # masks are 32 x 32: no resampling
    objects = sum(int((np.asarray(Image.open(root / "masks" / f"{n}.png")) == 255).sum()) for n in data.names)
    assert data.class_names == ("class_0", "class_1") and set(data.masks.unique().tolist()) == {0, 1}
    assert int(data.class_counts()[1]) == objects > 0  # every 255 pixel is class 1, none is ignored
    assert main(_train(root, tmp_path / "run", "--binary-255")) == 0
    assert (tmp_path / "run" / "last.safetensors").exists()


def test_one_class_present_is_refused_before_training(gen, tmp_path, capsys):
    root = _copy(gen, tmp_path)
    _remask(root, lambda m: np.where((m > 0) & (m < 255), 255, 0).astype(np.uint8))
    (root / "classes.txt").write_text("background\nobject\n")  # named, so nothing is inferred
    assert main(_train(root, tmp_path / "run")) == 2
    one_line(capsys, "2 classes (background, object)", "hold only background", "--binary-255")
    (root / "classes.txt").write_text("object\n")
    assert main(_train(root, tmp_path / "run")) == 2
    one_line(capsys, "1 class (object)", "at least 2 classes")
    assert not (tmp_path / "run").exists()


def test_prepared_with_and_without_binary_255_are_cached_apart(gen, tmp_path):
    root = _copy(gen, tmp_path)
    _remask(root, lambda m: np.where((m > 0) & (m < 255), 255, 0).astype(np.uint8))
    (root / "classes.txt").write_text("background\nobject\n")
    ignored = prepare(root, "train", 32, workers=1)
    binary = prepare(root, "train", 32, workers=1, binary_255=True)
    assert ignored.cache_path != binary.cache_path
    assert int(ignored.class_counts()[1]) == 0 < int(binary.class_counts()[1])


# ------------------------------------------------------------------- item 3: implausible inferred classes


def _jpeg(m: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(m).save(buf, format="JPEG", quality=90)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


def test_masks_smeared_by_jpeg_are_refused_naming_files(gen, tmp_path, capsys):
    root = _copy(gen, tmp_path)
    _remask(root, _jpeg)
    assert main(_train(root, tmp_path / "run")) == 2
    line = one_line(capsys, "isolated pixels", "lossy compression (JPEG)", "classes.txt", str(root / "masks" / "img_"))
    assert "C = 255" in line or "C = 25" in line  # the class count it refused to infer
    assert not (tmp_path / "run").exists()


def test_a_stray_mask_without_an_image_is_named_and_not_counted(gen, tmp_path, capsys):
    root = _copy(gen, tmp_path)
    stray = np.zeros((32, 32), np.uint8)
    stray[8:20, 8:20] = 9
    Image.fromarray(stray).save(root / "masks" / "lost.png")
    with pytest.warns(DataWarning) as caught:
        assert main(["prepare", "--data", str(root), "--split", "train", "--size", "32", "--workers", "1"]) == 0
    (said,) = [str(w.message) for w in caught]
    for needle in (str(root / "masks" / "lost.png"), "without an image", "(9: 144 px)", "not counted", "C = 3"):
        assert needle in said, said
    assert "class_0 " in capsys.readouterr().out and prepare(root, "train", 32, workers=1).num_classes == 3


def test_classes_no_mask_holds_are_warned_about_naming_the_file(gen, tmp_path, capsys):
    root = _copy(gen, tmp_path)
    path = root / "masks" / "img_3.png"
    m = np.asarray(Image.open(path)).copy()
    m[0, :4] = 9  # a stroke of 9 among 0..2
    Image.fromarray(m).save(path)
    with pytest.warns(DataWarning) as caught:
        assert main(["prepare", "--data", str(root), "--split", "train", "--size", "32", "--workers", "1"]) == 0
    (said,) = [str(w.message) for w in caught]
    for needle in ("C = 10", "no mask holds 3, 4, 5, 6, 7, 8", f"{path} (9: 4 px)", "classes.txt"):
        assert needle in said, said


@given(st.integers(2, 12), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_annotated_regions_are_never_refused_and_give_c_from_the_largest_value(c, n, seed):
    """Masks of regions (a coarse grid of class values, upsampled 8x) holding every class: C is the
    largest value + 1, nothing is refused or warned about."""
    rng = np.random.default_rng(seed)
    grids = [rng.integers(0, c, size=(4, 5)) for _ in range(n)]
    grids[0].flat[:c] = np.arange(c)  # every class somewhere
    stats = {Path(f"m{i}.png"): value_stats(np.kron(g, np.ones((8, 8), np.int64)).astype(np.uint8))
             for i, g in enumerate(grids)}
    assert classes_from_stats(stats) == (c, [])


def test_the_real_oxford_trimaps_pass_and_their_jpeg_copies_are_refused():
    from sample_data import SAMPLE

    trimaps = sorted((SAMPLE / "annotations" / "trimaps").glob("[!.]*.png"))[:12]
    if not trimaps:
        pytest.skip(f"no Oxford sample at {SAMPLE}")
    masks = [np.asarray(Image.open(p)) for p in trimaps]
    assert classes_from_stats({p: value_stats(m) for p, m in zip(trimaps, masks)}) == (4, [
        f"C = 4 classes inferred from the largest mask value 3, but no mask holds 0; the values above the gap come "
        f"from {trimaps[0]} (1: {(masks[0] == 1).sum()} px, 2: {(masks[0] == 2).sum()} px, 3: "
        f"{(masks[0] == 3).sum()} px); {trimaps[1]} (1: {(masks[1] == 1).sum()} px, 2: {(masks[1] == 2).sum()} px, "
        f"3: {(masks[1] == 3).sum()} px); {trimaps[2]} (1: {(masks[2] == 1).sum()} px, 2: {(masks[2] == 2).sum()} "
        f"px, 3: {(masks[2] == 3).sum()} px); and 9 more files: check those files, or list the classes in "
        "classes.txt"])
    with pytest.raises(ValueError, match="lossy compression"):
        classes_from_stats({p: value_stats(_jpeg(m)) for p, m in zip(trimaps, masks)})


# ----------------------------------------------------------------------- item 5: other class names


def test_eval_of_a_checkpoint_trained_on_other_class_names_is_refused(tmp_path, capsys):
    ck = tmp_path / "sky.safetensors"
    make_checkpoint(ck, "segnet", class_names=("sky", "road", "car"))
    # classes.txt: background, shape_1, shape_2
    data = make_generic_dataset(tmp_path / "shapes", n=10, num_classes=3, size=32, split_files=True)
    assert main(["eval", "--checkpoint", str(ck), "--data", str(data), "--split", "test", "--workers", "1",
                 "--device", "cpu"]) == 2
    one_line(capsys, str(ck), "trained on classes sky, road, car", "background, shape_1, shape_2")


# ---------------------------------------------------------------- item 7: a rank that cannot join


def test_a_rank_that_cannot_reach_its_rendezvous_says_so_and_ends_in_one_line(pets, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": "1", "WORLD_SIZE": "2",
           "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "FSEG_DIST_TIMEOUT": "1",
           "XDG_CACHE_HOME": str(tmp_path / "xdg"), "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "functional_seg.cli", *_train(pets, out, "--val-split", "none")],
                          env=env, capture_output=True, text=True, timeout=120)
    where = f"127.0.0.1:{port}"
    lines = proc.stderr.splitlines()
    waiting = [line for line in lines if line.startswith("fseg: rank 1 of 2 is waiting")]
    errors = [line for line in lines if line.startswith("fseg: error: ")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(waiting) == 1 and where in waiting[0] and "1 s (FSEG_DIST_TIMEOUT)" in waiting[0], proc.stderr
    assert len(errors) == 1 and f"rank 1 of 2 could not join the job at {where} within 1 s" in errors[0]
    assert lines.index(waiting[0]) < lines.index(errors[0])
    assert "Traceback" not in proc.stderr and "frame #" not in proc.stderr and len(lines) <= 3, proc.stderr
    assert not out.exists()


# --------------------------------------------------------------- item 9: refused settings and --resume


@pytest.mark.parametrize("flag, value, said", [
    ("--sweep", "lr=1e-3,0", "--sweep: every lr must be a positive number (as --lr), got [0.001, 0.0]"),
    ("--sweep", "lr=-1e-3,1e-3", "--sweep: every lr must be a positive number (as --lr), got [-0.001, 0.001]"),
    ("--gamma", "0", "--gamma: must lie in (0, 1] (a decay factor), got 0.0"),
    ("--gamma", "1.5", "--gamma: must lie in (0, 1] (a decay factor), got 1.5"),
    ("--momentum", "1", "--momentum: must lie in [0, 1), got 1.0"),
    ("--warmup-steps", "-1", "--warmup-steps: must be an integer >= 0, got -1"),
])
def test_bad_optimizer_settings_are_refused_before_anything_is_written(pets, tmp_path, capsys, flag, value, said):
    assert main([*_train(pets, tmp_path / "run"), flag, value]) == 2
    assert one_line(capsys) == f"fseg: error: {said}"
    assert not (tmp_path / "run").exists()


def test_resume_of_a_folder_without_a_run_is_refused_and_leaves_no_lock(pets, tmp_path, capsys):
    """Item 9 (and 13: a refused run left a stale .lock): a new folder is not created, a user's
    folder keeps exactly its files."""
    assert main(_train(pets, tmp_path / "new", "--resume")) == 2
    one_line(capsys, f"--resume: {tmp_path / 'new'} holds no run to continue", "drop --resume")
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(_train(pets, mine, "--resume")) == 2
    one_line(capsys, "holds no run to continue")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- item 10: data details


def test_upper_case_mask_extension_and_a_bom_are_read(tmp_path):
    root = make_generic_dataset(tmp_path / "g", n=8, num_classes=3, size=32, split_files=True)
    mask = root / "masks" / "img_0.png"
    want = np.asarray(Image.open(mask))
    mask.rename(root / "masks" / "img_0.PNG")
    (root / "classes.txt").write_text("pet\nbackground\nborder\n", encoding="utf-8-sig")  # Notepad's UTF-8
    (root / "train.txt").write_text((root / "train.txt").read_text(), encoding="utf-8-sig")
    data = prepare(root, "train", 32, workers=1)
    assert data.class_names == ("pet", "background", "border")
    assert data.names[0] == "img_0" and len(data) == len((root / "train.txt").read_text("utf-8-sig").split())
    assert np.array_equal(data.masks[0].numpy(), want)


def test_voc_without_a_test_list_points_at_the_test_split_flag_before_preparing(tmp_path, capsys):
    root = make_voc_dataset(tmp_path / "voc", n=8)
    cache = tmp_path / "user-cache"
    argv = _train(root, tmp_path / "run")
    argv = argv[:argv.index("--test-split")]  # the default flags
    assert main(argv) == 2
    one_line(capsys, "--test-split: split file", "test.txt is missing", "lists train, trainval, val",
              "pass --test-split none, or --test-split val with --train-split train")
    assert not (tmp_path / "run").exists() and not list(cache.rglob("*.safetensors"))  # nothing prepared
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the advice keeps training and test images apart
        assert main([*argv, "--train-split", "train", "--test-split", "val"]) == 0


# ------------------------------------------------------------------------------ item 12: export edges


def test_export_at_the_models_stride_words_its_static_note(tmp_path, capsys):
    from tiny_models import TINY as TINY_CFGS

    from functional_seg.models import create_model

    stride = create_model("segformer", **TINY_CFGS["segformer"]).stride
    ck = tmp_path / "sf.safetensors"
    make_checkpoint(ck, "segformer", size=stride)
    assert main(["export", "--checkpoint", str(ck), "--format", "pt2", "--out", str(tmp_path / "sf.pt2")]) == 0
    out = capsys.readouterr().out
    note = next(line for line in out.splitlines() if line.startswith("note: "))
    assert f"static H, W = {stride}" in note and "1 x 1" in note and f"--size {2 * stride} or more" in note
    assert "Constraints violated" not in note and "h_blocks" not in note and "TORCH_LOGS" not in note
    program = torch.export.load(str(tmp_path / "sf.pt2")).module()
    assert program(torch.rand(2, 3, stride, stride)).shape == (2, 3, stride, stride)


def _fail_if_traced(monkeypatch):
    import functional_seg.export as export

    def traced(*_a, **_k):
        raise AssertionError("the export ran before its target was checked")

    monkeypatch.setattr(export, "trace", traced)


def test_export_onto_a_folder_is_refused_first_naming_it(tmp_path, capsys, monkeypatch):
    ck = tmp_path / "ck.safetensors"
    make_checkpoint(ck, "segnet")
    target = tmp_path / "exports"
    target.mkdir()
    (target / "old.onnx").write_bytes(b"keep")
    _fail_if_traced(monkeypatch)
    assert main(["export", "--checkpoint", str(ck), "--format", "onnx", "--out", str(target)]) == 2
    one_line(capsys, f"--out {target} is a folder", str(target / "model.onnx"))
    assert files(target) == {"old.onnx": b"keep"}


def test_export_into_a_read_only_folder_is_refused_first_naming_the_target(tmp_path, capsys, monkeypatch):
    ck = tmp_path / "ck.safetensors"
    make_checkpoint(ck, "segnet")
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {proc.stderr.decode().strip()}")
    try:
        _fail_if_traced(monkeypatch)
        assert main(["export", "--checkpoint", str(ck), "--format", "pt2", "--out", str(ro / "m.pt2")]) == 2
        line = one_line(capsys, f"cannot write {ro / 'm.pt2'}", "read-only")
        assert ".tmp" not in line and ".probe" not in line
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


# ------------------------------------------------------------------- item 13: kill -9 between writes


KILL_BEFORE_BEST = """
import os, signal, sys
from functional_seg.train import rundir
real = rundir.RunDir.save

def save(self, which, *args, **kwargs):
    if which == "best":  # last.safetensors is written: die as kill -9 would, before best
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, which, *args, **kwargs)

rundir.RunDir.save = save
from functional_seg.cli import main
from functional_seg.core.tree import flatten_with_names
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_between_last_and_best_resumes_and_gets_its_best(pets, tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", KILL_BEFORE_BEST, *_train(pets, out)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.jsonl", "last.safetensors"} <= names and "best.safetensors" not in names
    kept = files(out)
    assert main(_train(pets, out, "--resume")) == 0  # the same 1 epoch: nothing left to train
    assert "Traceback" not in capsys.readouterr().err
    last, best = (flatten_with_names(ckpt.load(out / f"{w}.safetensors")[0]) for w in ("last", "best"))
    assert last.keys() == best.keys() and all(torch.equal(last[k], best[k]) for k in last)
    assert kept["last.safetensors"] == (out / "last.safetensors").read_bytes()  # nothing was lost or redone
    assert kept["metrics.jsonl"] == (out / "metrics.jsonl").read_bytes()


def test_adam_turns_a_rounding_level_gradient_into_a_full_step():
    """Item 13's true bound: a gradient element whose sign rounding decides (1e-6 here) moves by
    about +lr in one run and -lr in another after ONE Adam step, whatever its size: world sizes
    that sum in another order can differ by up to ~2 lr per step (see train/distributed.py)."""
    from functional_seg.train import OptimizerConfig, make_optimizer

    lr = 1e-2
    opt = make_optimizer(OptimizerConfig(lr=lr))
    params = {"w": torch.zeros(3)}
    state = opt.init(params)
    moved = []
    for sign in (1.0, -1.0):
        grads = {"w": torch.tensor([1e-6, 1.0, 1e-12]) * sign}
        new, _ = opt.apply(grads, state, params, step=torch.tensor(0), lr=torch.tensor(lr))
        moved.append(new["w"])
    gap = (moved[0] - moved[1]).abs()
    assert gap[0] > 1.9 * lr and gap[1] > 1.9 * lr  # 1e-6 and 1.0 alike: a step of lr
    assert gap[2] < 1e-3 * lr  # below Adam's eps the step vanishes

