"""Gradient accumulation and the EMA of the weights.

- ``accumulate=K`` is one optimizer step on the whole batch (a BN-free model, augmentation on):
  the same parameters up to float reduction order, the same loss and confusion counts;
- the EMA after n steps is the hand-computed recursion ``e <- d e + (1 - d) p_t`` over the
  params sequence, it round-trips through a checkpoint (``ema.params.*``, ``ema.state.*``) and
  ``load_checkpoint(path, weights="ema")`` returns it, and ``weights="auto"`` the weights that
  validated higher; ensembles carry one EMA per member.

Tiny models (a 2-layer BN-free conv net, a 4/8-channel SegNet), 32 px, a few steps.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import bn_free_model

from functional_seg import checkpoint as ckpt
from functional_seg.core import random as jr
from functional_seg.core.tree import flatten_with_names, tree_map
from functional_seg.data import Splits, augment_preset, make_synthetic_dataset, prepare
from functional_seg.losses import get_loss
from functional_seg.models import create_model, load_checkpoint
from functional_seg.train import FitConfig, OptimizerConfig, fit, make_optimizer, make_train_step
from functional_seg.train.state import init_ensemble, init_train_state, with_ema


def _batch(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
            torch.randint(0, 3, (n, size, size), generator=g))


def _run(model, steps, **kw):
    opt = make_optimizer(OptimizerConfig(lr=1e-2))
    step = make_train_step(model, get_loss("ce"), opt, augment_cfg=augment_preset("flip_jitter_crop"), **kw)
    ts = init_train_state(model, opt, jr.key(0))
    if kw.get("ema") is not None:
        ts = with_ema(ts)
    seq, metrics = [], []
    for i in range(steps):
        ts, m = step(ts, _batch(seed=i))
        seq.append(ts)
        metrics.append(m)
    return seq, metrics


def _max_diff(a, b) -> float:
    fa, fb = flatten_with_names(a), flatten_with_names(b)
    assert fa.keys() == fb.keys()
    return max(float((fa[k].double() - fb[k].double()).abs().max()) for k in fa)


@pytest.mark.parametrize("k", [2, 4])
def test_accumulate_equals_one_step_on_the_whole_batch(k):
    model = bn_free_model()
    (whole, *_), m_whole = _run(model, 3)
    (acc, *_), m_acc = _run(model, 3, accumulate=k)
    assert _max_diff(whole.params, acc.params) <= 1e-5
    assert _max_diff(whole.opt_state, acc.opt_state) <= 1e-5
    for a, b in zip(m_whole, m_acc):
        assert torch.equal(a["confusion"], b["confusion"])  # the same augmented batch, seen in K parts
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)


def test_accumulate_must_divide_the_batch():
    with pytest.raises(ValueError, match="batch_size 8 must be divisible by accumulate 3"):
        FitConfig(batch_size=8, accumulate=3)
    opt = make_optimizer(OptimizerConfig(lr=1e-2))
    model = bn_free_model()
    step = make_train_step(model, get_loss("ce"), opt, accumulate=3)
    with pytest.raises(ValueError, match="not divisible by accumulate 3"):
        step(init_train_state(model, opt, jr.key(0)), _batch())


def test_ema_after_n_steps_is_the_recursion_over_the_params():
    model = create_model("segnet", widths=(4, 8), convs_per_stage=(1, 1))
    d = 0.8
    seq, _ = _run(model, 4, ema=d)
    p0, s0 = model.init(jr.split(jr.key(0))[0])
    e_params, e_state = p0, s0
    for ts in seq:
        e_params = tree_map(lambda e, p: d * e + (1 - d) * p, e_params, ts.params)
        e_state = tree_map(lambda e, s: d * e + (1 - d) * s if s.is_floating_point() else s, e_state, ts.state)
    assert _max_diff(seq[-1].ema["params"], e_params) <= 1e-6
    assert _max_diff(seq[-1].ema["state"], e_state) <= 1e-6
    assert int(seq[-1].ema["state"]["input_bn"]["num_batches_tracked"]) == 4
    assert _max_diff(seq[-1].ema["params"], seq[-1].params) > 1e-4  # it lags the raw weights


def test_ema_needs_a_state_that_carries_one():
    model = bn_free_model()
    opt = make_optimizer(OptimizerConfig(lr=1e-2))
    step = make_train_step(model, get_loss("ce"), opt, ema=0.9)
    with pytest.raises(ValueError, match="with_ema"):
        step(init_train_state(model, opt, jr.key(0)), _batch())
    with pytest.raises(ValueError, match="ema: is a decay in"):
        FitConfig(ema=1.0)


def test_an_ensemble_keeps_one_ema_per_member():
    model = bn_free_model()
    opt = make_optimizer(OptimizerConfig(lr=1e-2))
    step = make_train_step(model, get_loss("ce"), opt, ema=0.5, ensemble=True)
    ts = with_ema(init_ensemble(model, opt, jr.key(0), 2))
    new, metrics = step(ts, _batch())
    assert metrics["loss"].shape == (2,)
    for name, e in flatten_with_names(new.ema["params"]).items():
        before, after = flatten_with_names(ts.params)[name], flatten_with_names(new.params)[name]
        assert torch.allclose(e, 0.5 * before + 0.5 * after, atol=1e-7)


def test_fit_with_ema_saves_it_scores_it_and_load_checkpoint_returns_it(tmp_path):
    root = make_synthetic_dataset(tmp_path / "pets", n_trainval=16, n_test=8, size=48)
    train = prepare(root, "trainval", 32, cache_dir=tmp_path / "cache", workers=1)
    val = prepare(root, "test", 32, cache_dir=tmp_path / "cache", workers=1)
    model = create_model("segnet", widths=(4, 8), convs_per_stage=(1, 1))
    config = FitConfig(epochs=1, batch_size=8, optimizer=OptimizerConfig(lr=1e-2), ema=0.9, accumulate=2,
                       augment=augment_preset("flip"), log_every=1)
    result = fit(model, Splits(train, val), config, out_dir=tmp_path / "run", hooks=[])
    record = result.final
    assert "val_ema" in record and record["val_ema"]["mean_iou"] != record["val"]["mean_iou"]
    ts = result.train_state
    last = tmp_path / "run" / "last.safetensors"
    tree, meta = ckpt.load(last)
    assert meta["maths"]["ema"] == 0.9 and meta["maths"]["accumulate"] == 2
    assert _max_diff(tree["ema"], ts.ema) == 0.0
    ema = load_checkpoint(last, weights="ema")
    assert _max_diff(ema.params, ts.ema["params"]) == 0.0 and _max_diff(ema.state, ts.ema["state"]) == 0.0
    assert _max_diff(load_checkpoint(last, weights="params").params, ts.params) == 0.0
    better = "ema" if record["val_ema"]["mean_iou"] > record["val"]["mean_iou"] else "params"
    auto = load_checkpoint(last)  # the policy: whichever validated higher at that epoch
    assert auto.weights == (better,) and meta["selection"]["weights"] == [better]
    assert _max_diff(auto.params, ts.ema["params"] if better == "ema" else ts.params) == 0.0
