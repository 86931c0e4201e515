"""Data parallelism on CPU with gloo: two processes under ``torchrun --standalone``.

- a BN-free model: 2 ranks at global batch 8 reach the parameters of 1 process at batch 8 and of
  ``accumulate=2`` (augmentation on, 2 epochs), within 1e-4;
- SegNet (batch norm) with ``--sync-bn`` through ``fseg train``: 2 ranks equal 1 process; without
  it 2 ranks equal ``--accumulate 2`` (each half normalised by itself, statistics averaged);
- a rank that fails at step 2 ends the job non-zero with a line naming it and no checkpoint;
- a 2-rank run stopped after epoch 1 and resumed ends bit-identical to one run straight through.

Synthetic data: 16 training images at 32 px, 2 steps per epoch. The ranks read it from shards of 5
samples at each batch, through the loader's prefetch thread; the single processes they are compared
with hold it in memory, so the comparisons also hold across the two storages. Each ``torchrun`` takes ~10-20 s
on two cores (two interpreters importing torch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from functional_seg import checkpoint as ckpt
from functional_seg.core.tree import flatten_with_names
from functional_seg.data import Splits, augment_preset, make_synthetic_dataset, prepare
from functional_seg.train import FitConfig, OptimizerConfig, fit
from functional_seg.train.distributed import SINGLE, World, all_reduce_sum

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

WORKER = """
import json, os, sys
sys.path.insert(0, {tests!r})
from tiny_models import bn_free_model
from functional_seg.data import Splits, augment_preset, prepare
from functional_seg.train import FitConfig, OptimizerConfig, fit
from functional_seg.train import build

spec = json.loads(sys.argv[1])
fail_at = spec.get("fail_at")
if fail_at and os.environ.get("RANK") == "1":
    real = build.make_train_step

    def failing(*args, **kwargs):
        step, calls = real(*args, **kwargs), []

        def wrapped(ts, batch):
            calls.append(1)
            if len(calls) == fail_at:
                raise RuntimeError("injected failure")
            return step(ts, batch)
        return wrapped
    build.make_train_step = failing
train = prepare(spec["root"], "trainval", 32, cache_dir=spec["cache"], workers=1, in_memory=False, shard_samples=5)
assert train.storage == "shards"
config = FitConfig(batch_size=8, epochs=spec["epochs"], optimizer=OptimizerConfig(lr=1e-2),
                   augment=augment_preset("flip_jitter_crop"), log_every=1)
fit(bn_free_model(), Splits(train), config, out_dir=spec["out"], resume=spec.get("resume", False), hooks=[])
"""


def _env(tmp_path) -> dict:
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               PYTHONWARNINGS="ignore")
    return env


def _torchrun(tmp_path, *args, nproc=2, timeout=240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    root = make_synthetic_dataset(base / "pets", n_trainval=16, n_test=8, size=48)
    cache = base / "cache"
    prepare(root, "trainval", 32, cache_dir=cache, workers=1, shard_samples=5)  # the ranks' shards
    return base, root, cache, prepare(root, "trainval", 32, cache_dir=cache, workers=1, in_memory=True)


def _worker(tmp_path, data, out, **spec):
    _, root, cache, _ = data
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS)))
    spec = {"root": str(root), "cache": str(cache), "out": str(out), "epochs": 2, **spec}
    return _torchrun(tmp_path, str(script), json.dumps(spec))


def _max_diff(a, b) -> float:
    fa, fb = flatten_with_names(a), flatten_with_names(b)
    assert fa.keys() == fb.keys()
    return max(float((fa[k].double() - fb[k].double()).abs().max()) for k in fa)


def _params(path):
    tree, _ = ckpt.load(path)
    return tree["params"]


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    proc = _worker(tmp, data, tmp / "run")
    assert proc.returncode == 0, _first_error(proc.stderr)
    return tmp / "run"


def _local_fit(data, out, **kw):
    from tiny_models import bn_free_model

    config = FitConfig(batch_size=8, epochs=2, optimizer=OptimizerConfig(lr=1e-2),
                       augment=augment_preset("flip_jitter_crop"), log_every=1, **kw)
    return fit(bn_free_model(), Splits(data[3]), config, out_dir=out, hooks=[])


def test_two_ranks_equal_one_process_and_accumulate_2(two_ranks, data, tmp_path):
    dist_params = _params(two_ranks / "last.safetensors")
    one = _local_fit(data, tmp_path / "one").train_state.params
    acc = _local_fit(data, tmp_path / "acc", accumulate=2).train_state.params
    assert _max_diff(dist_params, one) <= 1e-4
    assert _max_diff(dist_params, acc) <= 1e-4
    records = [json.loads(line) for line in (two_ranks / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]  # rank 0 alone wrote the record
    assert not list(two_ranks.glob("*.tmp*"))


def test_resume_of_a_two_rank_run_is_exact(two_ranks, data, tmp_path):
    first = _worker(tmp_path, data, tmp_path / "run", epochs=1)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _worker(tmp_path, data, tmp_path / "run", epochs=2, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = ckpt.load(tmp_path / "run" / "last.safetensors")[0], ckpt.load(two_ranks / "last.safetensors")[0]
    assert _max_diff(a, b) == 0.0


def test_a_failed_rank_ends_the_job_without_a_checkpoint(data, tmp_path):
    proc = _worker(tmp_path, data, tmp_path / "run", fail_at=2)
    assert proc.returncode != 0
    assert "rank 1 of 2 failed: RuntimeError: injected failure" in proc.stderr
    run = tmp_path / "run"
    assert not (run / "last.safetensors").exists() and not (run / "best.safetensors").exists()
    assert not [p for p in run.iterdir() if p.name not in ("config.json", ".lock")]


def _cli_run(tmp_path, data, out, *extra, nproc=None, splits=("--val-split", "none", "--test-split", "none")):
    _, root, _, _ = data
    args = ["-m", "functional_seg.cli", "train", "--data", str(root), "--model", "segnet", "--model-cfg",
            "widths=4,8", "convs_per_stage=1,1", "--size", "32", "--batch-size", "8", "--epochs", "2",
            "--lr", "1e-2", "--augment", "flip_jitter", *splits,
            "--workers", "1", "--device", "cpu", "--no-progress", "--out", str(out), *extra]
    if nproc:
        proc = _torchrun(tmp_path, *args, nproc=nproc)
    else:
        proc = subprocess.run([sys.executable, *args], env=_env(tmp_path), cwd=tmp_path, capture_output=True,
                              text=True, timeout=240)
    assert proc.returncode == 0, _first_error(proc.stderr)
    return proc


def _cli(tmp_path, data, out, *extra, nproc=None):
    _cli_run(tmp_path, data, out, *extra, nproc=nproc)
    return ckpt.load(out / "last.safetensors")[0]


def test_a_two_rank_cli_run_with_validation_and_a_test_split_ends_well(data, tmp_path):
    """Fault report item 1: every 2-rank run of 2 epochs ended as a failed job (rank 1 formatted a
    summary it did not have). Rank 0 alone validates, scores the test split, writes and prints."""
    out = tmp_path / "run"
    proc = _cli_run(tmp_path, data, out, nproc=2, splits=("--val-split", "carve", "--test-split", "trainval"))
    assert proc.stdout.count("checkpoints: ") == 1 and proc.stdout.count("\nvalidation\n") == 1
    assert "Traceback" not in proc.stderr
    test = json.loads((out / "test.json").read_text())
    assert test["split"] == "trainval" and test["checkpoint"].endswith("best.safetensors")
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def _first_error(stderr: str) -> str:
    """The ranks' own complaint (before torchrun's summary), then the summary's tail."""
    lines = stderr.splitlines()
    marks = [i for i, line in enumerate(lines) if any(w in line for w in ("Error", "error:", "terminate", "abort"))]
    head = "\n".join(lines[max(marks[0] - 20, 0):marks[0] + 20]) if marks else ""
    return head + "\n...\n" + stderr[-1500:]


@pytest.fixture(scope="module")
def synced(data, tmp_path_factory):
    """SegNet with --sync-bn on 2 ranks, 2 epochs straight through: the last checkpoint's tree."""
    tmp = tmp_path_factory.mktemp("synced")
    return _cli(tmp, data, tmp / "sync", "--sync-bn", nproc=2)


def test_batch_norm_with_sync_bn_is_world_size_invariant_and_without_it_is_accumulate(synced, data, tmp_path):
    one = _cli(tmp_path, data, tmp_path / "one")
    assert _max_diff(synced["params"], one["params"]) <= 1e-4
    assert _max_diff(synced["state"], one["state"]) <= 1e-4
    local = _cli(tmp_path, data, tmp_path / "local", nproc=2)
    acc = _cli(tmp_path, data, tmp_path / "acc", "--accumulate", "2")
    assert _max_diff(local["params"], acc["params"]) <= 1e-4
    assert _max_diff(local["state"], acc["state"]) <= 1e-4
    assert _max_diff(local["params"], one["params"]) > 1e-4  # per-rank statistics do change the maths


def test_a_sync_bn_run_of_two_ranks_resumed_on_one_process_continues_the_same_maths(synced, data, tmp_path):
    """Fault report item 13: 2 ranks for epoch 1, then ``--resume`` in one process for epoch 2, ends
    where 2 ranks straight through end (= continuing on 2: resume is exact), params, batch-norm
    statistics and Adam moments within 1e-4: the data slice, the draws and the statistics are the
    same on any world size. (Bigger models differ by up to ~2 lr per step: see distributed.py.)"""
    out = tmp_path / "run"
    _cli_run(tmp_path, data, out, "--sync-bn", "--epochs", "1", nproc=2)
    _cli_run(tmp_path, data, out, "--sync-bn", "--resume")
    resumed = ckpt.load(out / "last.safetensors")[0]
    for part in ("params", "state", "opt_state"):
        assert _max_diff(resumed[part], synced[part]) <= 1e-4, part
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]


def test_single_process_collectives_are_the_identity_and_the_batch_must_divide():
    t = [torch.ones(3), torch.zeros(2, dtype=torch.float64)]
    assert all_reduce_sum(SINGLE, t) == t
    with pytest.raises(ValueError, match="--batch-size 6 is the global batch and must be divisible by the world size 4"
                       ):
        World(rank=0, size=4).local_batch(6)


def test_a_vmapped_lr_sweep_under_two_ranks_equals_one_process(data, tmp_path):
    """Ensembles vmap over members inside the distributed step: each member's params after 2
    epochs on 2 ranks equal the same sweep run in one process (SegNet with --sync-bn)."""
    sweep = ("--sweep", "lr=1e-2,3e-2", "--sync-bn")
    two = _cli(tmp_path, data, tmp_path / "sweep2", *sweep, nproc=2)
    one = _cli(tmp_path, data, tmp_path / "sweep1", *sweep)
    assert next(iter(flatten_with_names(two["params"]).values())).shape[0] == 2  # stacked members
    assert _max_diff(two["params"], one["params"]) <= 1e-4
    assert _max_diff(two["state"], one["state"]) <= 1e-4
