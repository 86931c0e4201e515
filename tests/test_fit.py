"""The fit loop end to end on a tiny synthetic dataset: the run directory, exact resume (at an epoch
end and mid-epoch), a diverging loss, and vmapped ensembles with a learning-rate sweep.

Data: 16 synthetic training and 8 test images at 32 px, batch 8 (2 steps per epoch); model: a
2-stage SegNet with 4/8 channels. Each fit takes a few seconds on two CPU cores.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from functional_seg import checkpoint as ckpt
from functional_seg.core.tree import flatten_with_names
from functional_seg.data import CLASS_NAMES, Loader, Splits, augment_preset, make_synthetic_dataset, prepare
from functional_seg.data.preprocess import Preprocess
from functional_seg.models import create_model
from functional_seg.train import FitConfig, OptimizerConfig, RunDirError, TrainingDiverged, evaluate_ensemble, fit
from functional_seg.train import loop as loop_mod


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "pets", n_trainval=16, n_test=8, size=48)


@pytest.fixture(scope="module")
def data(pets, tmp_path_factory):
    """Train and val held in memory."""
    cache = tmp_path_factory.mktemp("cache")
    train = prepare(pets, "trainval", 32, cache_dir=cache, workers=1, in_memory=True)
    val = prepare(pets, "test", 32, cache_dir=cache, workers=1, in_memory=True)
    return train, val


@pytest.fixture(scope="module")
def sharded(pets, tmp_path_factory):
    """The same splits read from shards of 5 samples at each batch (every batch crosses shards):
    the resumed runs below read these and must match ``one_go``, which read memory."""
    cache = tmp_path_factory.mktemp("shards")
    train = prepare(pets, "trainval", 32, cache_dir=cache, workers=1, in_memory=False, shard_samples=5)
    val = prepare(pets, "test", 32, cache_dir=cache, workers=1, in_memory=False, shard_samples=5)
    assert train.storage == val.storage == "shards"
    return train, val


@pytest.fixture(scope="module")
def model():
    return create_model("segnet", widths=(4, 8), convs_per_stage=(1, 1))


def _config(**kw) -> FitConfig:
    kw.setdefault("epochs", 2)
    kw.setdefault("optimizer", OptimizerConfig(lr=1e-2))
    kw.setdefault("augment", augment_preset("flip_jitter"))
    return FitConfig(batch_size=8, device="cpu", log_every=1, **kw)


def _fit(model, data, out_dir, *, resume=False, **kw):
    train, val = data
    return fit(model, Splits(train, val), _config(**kw), out_dir=out_dir, resume=resume, hooks=[])


def _params_equal(a, b) -> bool:
    """Bit equality of two trees, leaf by flattened name (key order may differ)."""
    fa, fb = flatten_with_names(a), flatten_with_names(b)
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


@pytest.fixture(scope="module")
def one_go(model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_go")
    return _fit(model, data, out), out


def test_fit_writes_the_run_directory(one_go, model):
    result, out = one_go
    assert result.step == 4 and len(result.history) == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records == result.history
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == [2, 4]
    for r in records:
        assert math.isfinite(r["train_loss"]) and 0 <= r["train_pixel_accuracy"] <= 1
        assert r["images_per_s"] > 0 and r["lr"] == pytest.approx(1e-2)
        val = r["val"]
        for key in ("pixel_accuracy", "mean_iou", "iou", "dice", "precision", "recall", "series_iou",
                    "series_custom_iou", "confusion", "iou/pet"):
            assert key in val
        assert sum(map(sum, val["confusion"])) == 8 * 32 * 32
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["model"] == "segnet" and config["preprocess"]["size"] == 32
    assert config["optimizer"]["steps_per_epoch"] == 2 and config["maths"]["seed"] == 0
    tree, meta = ckpt.load(out / "last.safetensors")
    assert int(tree["step"]) == 4 and meta["config"]["seed"] == 0 and meta["model"] == "segnet"
    assert meta["preprocess"]["class_names"] == list(CLASS_NAMES)
    assert _params_equal(tree["params"], result.train_state.params)
    best_score = max(r["val"]["mean_iou"] for r in records)
    assert result.best_mean_iou == pytest.approx(best_score)
    _, best_meta = ckpt.load(out / "best.safetensors")
    assert best_meta["extra"]["best_mean_iou"] == pytest.approx(best_score)


def test_resume_from_an_epoch_end_is_bit_identical(one_go, model, sharded, tmp_path):
    first = _fit(model, sharded, tmp_path, epochs=1)
    assert first.step == 2
    resumed = _fit(model, sharded, tmp_path, epochs=2, resume=True)
    assert resumed.step == 4
    assert _params_equal(resumed.train_state, one_go[0].train_state)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert json.loads(lines[1])["train_loss"] == one_go[0].history[1]["train_loss"]


def test_resume_mid_epoch_is_bit_identical(one_go, model, sharded, tmp_path):
    stopped = _fit(model, sharded, tmp_path, max_steps=3, checkpoint_every=1)
    assert stopped.step == 3
    resumed = _fit(model, sharded, tmp_path, resume=True)
    assert resumed.step == 4
    assert _params_equal(resumed.train_state, one_go[0].train_state)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]  # the partial epoch's record was replaced
    assert records[1]["train_loss"] == one_go[0].history[1]["train_loss"]  # the epoch's sums carried over


@pytest.mark.parametrize("change, named", [
    ({"seed": 1}, "seed was 0 in last.safetensors, this run has 1"),
    ({"augment": augment_preset("flip")}, "augment.contrast was 0.3 in last.safetensors, this run has 0.0"),
    ({"optimizer": OptimizerConfig(lr=0.5)}, "optimizer.lr was 0.01 in last.safetensors, this run has 0.5"),
    ({"optimizer": OptimizerConfig(name="sgd", lr=1e-2)}, "optimizer.name was 'adam'"),
    ({"loss": "dice"}, "loss was 'ce'"),
])
def test_resume_refuses_a_changed_setting_naming_it(model, data, tmp_path, change, named):
    _fit(model, data, tmp_path, epochs=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(RunDirError, match=named.replace("(", r"\(").replace(".", r"\.")):
        _fit(model, data, tmp_path, epochs=2, resume=True, **change)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing rewritten


def test_resume_may_extend_the_epochs_of_a_constant_schedule(model, data, tmp_path):
    _fit(model, data, tmp_path, epochs=1)
    assert _fit(model, data, tmp_path, epochs=2, resume=True).step == 4
    cosine = tmp_path / "cosine"
    _fit(model, data, cosine, epochs=1, optimizer=OptimizerConfig(lr=1e-2, schedule="cosine"))
    with pytest.raises(RunDirError, match="optimizer.total_steps was 2 .* this run has 4"):
        _fit(model, data, cosine, epochs=2, resume=True, optimizer=OptimizerConfig(lr=1e-2, schedule="cosine"))


def _poison(monkeypatch, edit):
    """Make fit's train step pass its output through ``edit(old_state, new_state, metrics)``."""
    from functional_seg.train import build

    real = build.make_train_step

    def poisoned(*args, **kwargs):
        step = real(*args, **kwargs)
        return lambda train_state, batch: edit(train_state, *step(train_state, batch))

    monkeypatch.setattr(build, "make_train_step", poisoned)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(model, data, tmp_path, monkeypatch):
    def nan_loss(old, new, metrics):
        bad = old.step >= 2  # the first step of epoch 2 (a tensor test: no sync)
        return new, {**metrics, "loss": torch.where(bad, torch.tensor(float("nan")), metrics["loss"])}

    _poison(monkeypatch, nan_loss)
    with pytest.raises(TrainingDiverged, match=r"non-finite \(nan\) at epoch 2, step 3.*last good checkpoint"):
        _fit(model, data, tmp_path)
    tree, _ = ckpt.load(tmp_path / "last.safetensors")
    assert int(tree["step"]) == 2
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_non_finite_state_with_a_finite_loss_is_never_checkpointed(model, data, tmp_path, monkeypatch):
    """lr 1e9 kept the loss finite (ln 3) while batch-norm running_var became inf: caught at the save."""

    def inf_statistic(old, new, metrics):
        leaf = next(k for k in new.state)  # one statistic becomes inf from step 3 on
        first = next(iter(new.state[leaf]))
        bad = torch.where(old.step >= 2, float("inf"), 0.0)
        inner = {**new.state[leaf], first: new.state[leaf][first] + bad}
        return new._replace(state={**new.state, leaf: inner}), metrics

    _poison(monkeypatch, inf_statistic)
    with pytest.raises(TrainingDiverged, match=r"train state became non-finite .* step 4.*last good checkpoint"):
        _fit(model, data, tmp_path)
    tree, _ = ckpt.load(tmp_path / "last.safetensors")
    assert int(tree["step"]) == 2


def test_ensemble_with_an_lr_sweep_reports_each_member(model, data, tmp_path):
    result = _fit(model, data, tmp_path, epochs=1, sweep={"lr": [1e-2, 1e-3]})
    assert result.members == 2
    record = result.history[-1]
    assert record["members"] == 2 and len(record["train_loss"]) == 2 and len(record["val"]) == 2
    assert record["hparams"]["lr"] == pytest.approx([1e-2, 1e-3])
    assert record["lr"] == pytest.approx([1e-2, 1e-3])
    tree, meta = ckpt.load(tmp_path / "last.safetensors")
    assert meta["ensemble"] == 2 and tree["step"].tolist() == [2, 2]
    _, val = data
    summaries = evaluate_ensemble(model, tree["params"], tree["state"], Loader(val, 8, shuffle=False, drop_last=False),
                                  class_names=CLASS_NAMES)
    assert [s["mean_iou"] for s in summaries] == [v["mean_iou"] for v in record["val"]]


def test_fit_rejects_bad_sweeps(model, data, tmp_path):
    with pytest.raises(ValueError, match="sweep: cannot sweep 'momentum'"):
        _fit(model, data, tmp_path, sweep={"momentum": [0.9, 0.8]})
    with pytest.raises(ValueError, match="ce_dice"):
        _fit(model, data, tmp_path, sweep={"loss_weight": [0.5, 1.0]})
    with pytest.raises(ValueError, match="ensemble: 3 disagrees"):
        _fit(model, data, tmp_path, sweep={"lr": [1e-2, 1e-3]}, ensemble=3)


def _listing(folder):
    """Every file of the folder with its bytes, but the run directory's own lock file."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


def test_a_fresh_run_refuses_to_overwrite_an_old_one(one_go, model, data):
    _, out = one_go
    before = _listing(out)
    with pytest.raises(RunDirError, match="already holds a run.*--resume"):
        _fit(model, data, out)
    assert _listing(out) == before


def test_results_without_a_last_checkpoint_are_never_deleted(model, data, tmp_path):
    """A run killed in epoch 1 (or a disk-full error) left results but no last.safetensors."""
    for name, text in (("config.json", "{}"), ("metrics.jsonl", '{"step": 1}\n'), ("best.safetensors", "x")):
        (tmp_path / name).write_text(text)
    before = _listing(tmp_path)
    with pytest.raises(RunDirError, match="already holds a run"):
        _fit(model, data, tmp_path)
    with pytest.raises(RunDirError, match="metrics.jsonl, best.safetensors but no last.safetensors"):
        _fit(model, data, tmp_path, resume=True)
    assert _listing(tmp_path) == before


def test_a_second_live_run_in_the_same_directory_is_refused(model, data, tmp_path):
    from functional_seg.train import RunDir

    with RunDir(tmp_path), pytest.raises(RunDirError, match=r"another run \(pid \d+\) is writing"):
        _fit(model, data, tmp_path)
    assert _fit(model, data, tmp_path, epochs=1).step == 2  # the lock went with its holder


def test_metrics_are_strict_json(one_go):
    _, out = one_go
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in metrics.jsonl"))


def test_the_compiled_eval_step_compiles_once_for_a_short_last_batch_and_other_weights(model, data):
    from torch._dynamo.utils import counters

    from functional_seg.core import random as jr
    from functional_seg.core.tree import tree_map
    from functional_seg.train import evaluate, make_eval_step

    _, val = data
    loader = Loader(val, 3, shuffle=False, drop_last=False)  # 8 images: 3 + 3 + a short 2
    pre = Preprocess(class_names=CLASS_NAMES, layout="oxford_pets")  # with the series' per-image figure
    eval_step = make_eval_step(model, preprocess=pre, compile=True, backend="aot_eager")
    params, state = model.init(jr.key(0))
    other = tree_map(lambda p: p * 0.5, params)  # e.g. the EMA weights of the same model
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    compiled = [evaluate(model, p, state, loader, eval_step=eval_step, preprocess=pre) for p in (params, other)]
    assert counters["stats"]["unique_graphs"] - before == 1
    eager = [evaluate(model, p, state, loader, preprocess=pre) for p in (params, other)]
    for c, e in zip(compiled, eager):
        assert c["confusion"] == e["confusion"] and sum(map(sum, c["confusion"])) == 8 * 32 * 32
        assert c["series_custom_iou"] == pytest.approx(e["series_custom_iou"], abs=1e-6)


@pytest.mark.parametrize("compile", [True, False])
def test_planning_a_run_sets_the_cpu_allocator_and_the_compile_cache_only_when_it_compiles(model, data, tmp_path,
                                                                                            monkeypatch, compile):
    from functional_seg import runtime

    calls = []
    monkeypatch.setattr(runtime, "reuse_freed_cpu_memory", lambda: calls.append("reuse") or True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")  # recorded first, so the test's own value is undone
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    train, val = data
    loop_mod.plan_run(model, Splits(train, val), _config(compile=compile))  # builds the steps; nothing compiles
    assert calls == ["reuse"]  # the CPU: freed memory is kept for the next step
    if compile:
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "functional_seg" / "compile")
    else:
        assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and not (tmp_path / "cache").exists()


def test_fit_with_the_default_config_does_what_fseg_train_does(model, data, tmp_path):
    """One source of settings: the CLI's defaults are FitConfig's; fit(model, data, FitConfig()) carves
    validation, augments as the series did, resolves the device, and scores a test split once."""
    import dataclasses

    from functional_seg.cli import build_parser
    from functional_seg.core.settings import from_arguments
    from functional_seg.train import evaluate

    assert from_arguments(FitConfig, build_parser().parse_args(["train"])) == FitConfig()
    assert FitConfig().augment == augment_preset("flip_jitter") and FitConfig().device == "auto"
    train, test = data
    config = dataclasses.replace(FitConfig(), epochs=1, batch_size=8)
    carved = fit(model, train, config, out_dir=tmp_path / "carve", hooks=[])
    assert carved.val_note.startswith("2 images carved") and carved.test is None
    assert carved.history[0]["val"]["mean_iou"] == carved.history[0]["val"]["mean_iou"]  # validated
    result = fit(model, Splits(train, None, test, test_split="test"), config, out_dir=tmp_path / "test", hooks=[])
    saved = json.loads((tmp_path / "test" / "test.json").read_text())
    assert saved["split"] == "test" and saved["checkpoint"].endswith("last.safetensors") and saved == result.test
    tree, meta = ckpt.load(tmp_path / "test" / "last.safetensors")
    direct = evaluate(model, tree["params"], tree["state"], Loader(test, 8, shuffle=False, drop_last=False),
                      preprocess=Preprocess.from_dict(meta["preprocess"]))
    assert saved["summary"]["confusion"] == direct["confusion"]
    # the test block reports Boundary IoU with its band, and calibration with its diagram
    summary = saved["summary"]
    assert summary["boundary_dilation_ratio"] == 0.02 and summary["boundary_width_px"] == 1  # 32 px: round(0.9)
    counted = sum(map(sum, summary["confusion"]))
    assert sum(summary["calibration_counts"][0]) == counted and 0 <= summary["ece"] <= 1
    assert (tmp_path / "test" / "reliability.png").stat().st_size > 0
    assert "reliability_count" not in carved.history[0]["val"]  # per-epoch records stay lean


def test_a_split_s_boundary_and_calibration_figures_are_the_kernels_on_the_whole_split(model, data):
    """Padded, batched and summed on the host, they equal one call over every image at once."""
    from functional_seg import metrics as M
    from functional_seg.core import random as jr
    from functional_seg.train import evaluate

    _, val = data
    pre = Preprocess(class_names=CLASS_NAMES, layout="oxford_pets")
    params, state = model.init(jr.key(1))
    summary = evaluate(model, params, state, Loader(val, 3, shuffle=False, drop_last=False), preprocess=pre,
                       detail=True)
    images, masks = val.gather(range(len(val)))
    with torch.no_grad():
        logits = model.apply(params, state, pre.model_input(images), train=False)[0]
    inter, union = M.boundary_counts(logits, masks.long(), 3, ignore_index=255)
    assert summary["boundary_iou"] == pytest.approx(M.boundary_iou(inter, union).tolist(), nan_ok=True)
    counts = M.calibration_counts(logits.softmax(1), masks.long(), ignore_index=255)
    torch.testing.assert_close(torch.tensor(summary["calibration_counts"], dtype=counts.dtype), counts)
    assert summary["ece"] == pytest.approx(float(M.ece(counts)))
