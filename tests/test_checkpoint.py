"""Checkpoints: exact round trips, atomic writes, and a clear error for every bad file.

Every failure mode is a ``CheckpointError`` (a ``ValueError``) whose message names the file and
what is wrong: missing file, not safetensors, truncated, a flipped bit, another model or cfg,
mismatched names and shapes. Reading never unpickles: ``torch.load`` is never called.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from functional_seg import checkpoint as ckpt
from functional_seg.checkpoint import CheckpointError
from functional_seg.core import random as jr
from functional_seg.core.tree import flatten_with_names, tree_leaves, tree_map, tree_structure
from functional_seg.models import check_model, create_model, load_checkpoint, model_metadata
from functional_seg.train import OptimizerConfig, TrainState, init_ensemble, init_train_state, make_optimizer
from functional_seg.train.state import with_ema


def _save(path, ts, model, **meta):
    """What the run directory writes: the tree, the model's name and cfg, its ensemble size, more."""
    k = 0 if ts.step.dim() == 0 else int(ts.step.shape[0])
    return ckpt.save(path, ts, {**model_metadata(model), "ensemble": k, **meta})


def _load(path, *, model=None, template=None):
    tree, meta = ckpt.load(path, template=template)
    if model is not None:
        check_model(meta, model, path=path)
    return tree, meta


@pytest.fixture(scope="module")
def model():
    return create_model("segnet", widths=(4, 8), convs_per_stage=(1, 1))


@pytest.fixture(scope="module")
def optimizer():
    return make_optimizer(OptimizerConfig(name="adamw", lr=1e-3, weight_decay=1e-2, clip_norm=1.0))


def _trained_state(model, optimizer, seed=0) -> TrainState:
    """A state with non-trivial values in every group (moments, counts, BN stats, step)."""
    from functional_seg.losses import get_loss
    from functional_seg.train import make_train_step

    ts = init_train_state(model, optimizer, jr.key(seed), hparams={"loss_weight": 0.5})
    g = torch.Generator().manual_seed(seed)
    batch = (torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=g),
             torch.randint(0, 3, (2, 16, 16), generator=g))
    loss = get_loss("ce")
    step = make_train_step(model, lambda logits, t, loss_weight: loss_weight * loss(logits, t), optimizer)
    for _ in range(2):
        ts, _ = step(ts, batch)
    return ts


def _assert_equal(a, b):
    assert tree_structure(a) == tree_structure(b)
    for x, y in zip(tree_leaves(a), tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def test_round_trip_is_exact(tmp_path, model, optimizer):
    ts = _trained_state(model, optimizer)
    path = _save(tmp_path / "run" / "last.safetensors", ts, model, optimizer=optimizer.cfg,
                 args={"size": 16, "lr": 1e-3}, extra={"best_mean_iou": 0.5})
    template = init_train_state(model, optimizer, jr.key(99), hparams={"loss_weight": 0.0})
    loaded, meta = _load(path, model=model, template=template)
    _assert_equal(loaded, ts)  # the torchopt NamedTuples come back as such
    assert type(loaded.opt_state) is type(ts.opt_state)
    assert meta["format"] == "functional_seg/2" and meta["model"] == "segnet"
    assert meta["cfg"]["widths"] == [4, 8]
    assert meta["optimizer"]["name"] == "adamw" and meta["args"] == {"size": 16, "lr": 1e-3}
    assert meta["extra"] == {"best_mean_iou": 0.5} and meta["ensemble"] == 0
    assert meta["version"] and meta["torch"] == torch.__version__
    # Without a template: nested dicts (keys sorted, as safetensors stores them), same tensors.
    raw, _ = ckpt.load(path)
    flat_raw, flat_ts = flatten_with_names(raw["params"]), flatten_with_names(ts.params)
    assert flat_raw.keys() == flat_ts.keys()
    assert all(torch.equal(flat_raw[k], flat_ts[k]) for k in flat_ts)
    assert int(raw["step"]) == 2 and torch.equal(raw["key"], ts.key)
    assert sorted(raw["hparams"]) == ["loss_weight", "lr"]
    # The file is plain safetensors with readable names.
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
    assert "step" in names and "key" in names and "hparams.lr" in names
    assert any(n.startswith("params.") for n in names) and any(n.startswith("opt_state.") for n in names)
    assert any(n.startswith("state.") and n.endswith("running_mean") for n in names)


def test_ensemble_round_trip_and_load_checkpoint(tmp_path, model, optimizer):
    stacked = init_ensemble(model, optimizer, jr.key(0), 3, sweep={"lr": [1e-3, 2e-3, 3e-3]})
    path = _save(tmp_path / "ens.safetensors", stacked, model, optimizer=optimizer.cfg)
    loaded, meta = _load(path, model=model, template=stacked)
    _assert_equal(loaded, stacked)
    assert meta["ensemble"] == 3
    every = load_checkpoint(path)
    assert every.model.name == "segnet" and every.model.cfg == model.cfg and every.members == 3
    _assert_equal(every.params, stacked.params)
    _assert_equal(every.state, stacked.state)
    one = load_checkpoint(path, member=2)
    assert one.members is None and one.member == 2
    _assert_equal(one.params, tree_map(lambda t: t[2], stacked.params))
    assert load_checkpoint(path, member="auto").member == 0  # nothing validated: member 0
    with pytest.raises(CheckpointError, match=r"member 3 is out of range.*3 members \(0..2\)"):
        load_checkpoint(path, member=3)


def test_auto_weights_and_member_follow_the_recorded_validation(tmp_path, model, optimizer):
    """The one policy: what fit recorded as validating best is what eval, predict and export load."""
    stacked = with_ema(init_ensemble(model, optimizer, jr.key(0), 2))
    ema = tree_map(lambda t: t + 1.0 if t.is_floating_point() else t, stacked.ema)
    stacked = stacked._replace(ema=ema)
    selection = {"weights": ["params", "ema"], "member": 1}
    path = _save(tmp_path / "sel.safetensors", stacked, model, selection=selection)
    both = load_checkpoint(path)
    assert both.weights == ("params", "ema")
    _assert_equal(tree_map(lambda t: t[0], both.params), tree_map(lambda t: t[0], stacked.params))
    _assert_equal(tree_map(lambda t: t[1], both.params), tree_map(lambda t: t[1], ema["params"]))
    best = load_checkpoint(path, member="auto")
    assert best.member == 1 and best.weights == ("ema",)
    _assert_equal(best.params, tree_map(lambda t: t[1], ema["params"]))
    forced = load_checkpoint(path, member="auto", weights="params")
    _assert_equal(forced.params, tree_map(lambda t: t[1], stacked.params))
    single = _save(tmp_path / "one.safetensors", init_train_state(model, optimizer, jr.key(1)), model)
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        load_checkpoint(single, weights="ema")
    with pytest.raises(CheckpointError, match="holds one model, not an ensemble"):
        load_checkpoint(single, member=1)


def test_load_checkpoint_rebuilds_from_metadata(tmp_path, model, optimizer):
    ts = _trained_state(model, optimizer)
    path = _save(tmp_path / "m.safetensors", ts, model, optimizer=optimizer.cfg)
    loaded = load_checkpoint(path)
    rebuilt, params, state = loaded.model, loaded.params, loaded.state
    assert rebuilt.cfg == model.cfg  # JSON lists became the cfg's tuples again
    _assert_equal(params, ts.params)
    _assert_equal(state, ts.state)
    x = torch.rand(1, 3, 16, 16)
    a, _ = model.apply(ts.params, ts.state, x, train=False)
    b, _ = rebuilt.apply(params, state, x, train=False)
    assert torch.equal(a, b)


@given(st.lists(st.tuples(st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool]),
                          st.lists(st.integers(0, 3), max_size=3)), min_size=1, max_size=5))
def test_any_tree_of_tensors_round_trips(tmp_path_factory, leaves):
    from functional_seg.models.base import ModuleCfg

    g = torch.Generator().manual_seed(len(leaves))
    params = {}
    for i, (dtype, shape) in enumerate(leaves):
        t = torch.randint(0, 2 if dtype == torch.bool else 100, shape, generator=g).to(dtype)
        params[f"layer{i}"] = {"w": t}
    ts = TrainState(params, {}, None, torch.tensor(7), jr.key(1), {"lr": torch.tensor(0.1)})
    fake = type("M", (), {"name": "toy", "cfg": ModuleCfg(num_classes=3)})()
    path = tmp_path_factory.mktemp("prop") / "t.safetensors"
    _save(path, ts, fake)
    loaded, meta = ckpt.load(path, template=ts)
    _assert_equal(loaded.params, ts.params)
    assert int(loaded.step) == 7


# ----------------------------------------------------------------------------------------------
# Every bad file gets a clear CheckpointError


@pytest.fixture
def saved(tmp_path, model, optimizer):
    ts = init_train_state(model, optimizer, jr.key(0))
    return _save(tmp_path / "good.safetensors", ts, model, optimizer=optimizer.cfg), ts


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", b"\x00" * 7,
                                     pickle.dumps({"params": [1, 2, 3]})])
def test_non_safetensors_file(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="expected a safetensors checkpoint written by functional_seg"):
        ckpt.load(path)


def test_torch_pickle_file_is_rejected_without_unpickling(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    torch.save({"params": torch.zeros(3)}, path)

    def forbidden(*a, **k):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(CheckpointError, match=f"{path.name}.*expected a safetensors checkpoint"):
        ckpt.load(path)


def test_safetensors_from_elsewhere_is_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="format tag is None"):
        ckpt.load(path)


def test_truncated_file(saved):
    path, _ = saved
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 20):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="expected a safetensors checkpoint"):
            ckpt.load(path)


def test_flipped_bit_in_the_data_is_caught(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes: the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        ckpt.load(path)


def test_garbled_header(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[10] = ord("}")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="expected a safetensors checkpoint"):
        ckpt.load(path)


def test_another_model_or_cfg_is_named(saved, optimizer):
    path, _ = saved
    wider = create_model("segnet", widths=(4, 16), convs_per_stage=(1, 1))
    with pytest.raises(CheckpointError, match=r"another cfg: widths: file has \[4, 8\], model has \[4, 16\]"):
        _load(path, model=wider)
    other = create_model("segnet_dsc", widths=(4, 8), convs_per_stage=(1, 1))
    with pytest.raises(CheckpointError, match="holds a 'segnet' model, not 'segnet_dsc'"):
        _load(path, model=other)


def test_structure_mismatch_lists_names_and_shapes(saved, optimizer):
    path, _ = saved
    wider = create_model("segnet", widths=(4, 16), convs_per_stage=(1, 1))
    template = init_train_state(wider, optimizer, jr.key(0))
    with pytest.raises(CheckpointError) as err:
        ckpt.load(path, template=template)
    msg = str(err.value)
    assert "does not match the model" in msg and "shape/dtype mismatch" in msg
    assert "params." in msg and "[16," in msg and "[8," in msg
    sgd = make_optimizer(OptimizerConfig(name="sgd"))
    template = init_train_state(create_model("segnet", widths=(4, 8), convs_per_stage=(1, 1)), sgd, jr.key(0))
    pattern = r"(?s)missing \(\d+\): opt_state\..*unexpected \(\d+\): opt_state\..*another optimizer"
    with pytest.raises(CheckpointError, match=pattern):
        ckpt.load(path, template=template)


def test_load_checkpoint_of_an_unregistered_model(tmp_path):
    from functional_seg.models import from_module

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 3, 1))
    model = from_module(net, num_classes=3, name="tiny_module")
    opt = make_optimizer()
    ts = init_train_state(model, opt, jr.key(0))
    path = _save(tmp_path / "lifted.safetensors", ts, model, optimizer=opt.cfg)
    loaded, _ = _load(path, model=model, template=ts)  # fine with the model in hand
    _assert_equal(loaded, ts)
    with pytest.raises(CheckpointError, match="cannot rebuild its model.*tiny_module"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------------------------
# Atomic writes


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(saved, model, optimizer, monkeypatch):
    path, ts = saved
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(path, ts._replace(step=ts.step + 5), model, optimizer=optimizer.cfg)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    loaded, _ = ckpt.load(path, template=ts)
    assert int(loaded.step) == 0


def test_stale_temp_files_are_cleaned_and_permissions_are_normal(saved, model, optimizer):
    path, ts = saved
    stale = path.parent / f".{path.name}.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    _save(path, ts, model, optimizer=optimizer.cfg)
    assert not stale.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_metadata_is_plain_json(saved):
    path, _ = saved
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header["__metadata__"]
    assert all(isinstance(v, str) for v in meta.values())
    for field in ("cfg", "optimizer", "ensemble"):
        json.loads(meta[field])


def _edit_header(path, edit):
    """Rewrite the JSON header in place (same tensor bytes), as a user with an editor could."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header["__metadata__"])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])


def test_an_edited_metadata_value_is_caught(saved):
    """Editing the recorded size changed predictions silently when the digest covered tensors only."""
    path, _ = saved
    _edit_header(path, lambda meta: meta.update(cfg=meta["cfg"].replace('"num_classes": 3', '"num_classes": 4')))
    with pytest.raises(CheckpointError, match="corrupted or was edited"):
        ckpt.load(path)


def test_a_file_without_its_digest_is_refused(saved):
    path, _ = saved
    _edit_header(path, lambda meta: meta.pop("sha256"))
    with pytest.raises(CheckpointError, match="has no digest"):
        ckpt.load(path)


def test_an_older_format_is_named(saved):
    path, _ = saved
    _edit_header(path, lambda meta: meta.update(format="functional_seg/1"))
    with pytest.raises(CheckpointError, match="format tag is 'functional_seg/1'.*older functional_seg"):
        ckpt.load(path)


def test_checkpoint_code_imports_neither_train_nor_models():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(ckpt))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if "train" in m.split(".") or "models" in m.split(".")], imported
