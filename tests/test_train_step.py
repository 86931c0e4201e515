"""The pure train step: purity, eager == compiled, one graph over many steps, learning, vmap ensembles,
and the optimizers against torch.optim.

Models are tiny (a 2-stage SegNet with 4/8 channels) and images 16-32 px so every test runs in
seconds on two shared CPU cores. Compiled tests use the "aot_eager" backend: dynamo captures
the same graph (the part that can break: torchopt trees, grad_and_value, the random keys) and
AOTAutograd traces forward+backward, without inductor's minutes-long C++ build on CPU. Set
FSEG_TEST_INDUCTOR=1 to use inductor instead.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from functional_seg.core import random as jr
from functional_seg.core.tree import tree_clone, tree_leaves, tree_map, unstack
from functional_seg.data import augment_preset
from functional_seg.losses import get_loss
from functional_seg.models import create_model
from functional_seg.train import (
    OptimizerConfig,
    TrainState,
    compile_report,
    ensemble_step,
    init_ensemble,
    init_train_state,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
)

BACKEND = "inductor" if os.environ.get("FSEG_TEST_INDUCTOR") else "aot_eager"


@pytest.fixture(scope="module")
def model():
    return create_model("segnet", widths=(4, 8), convs_per_stage=(1, 1))


def _batch(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    masks = torch.randint(0, 3, (n, size, size), generator=g)
    masks[:, :2, :2] = 255  # some ignored pixels
    return images, masks


def _assert_trees_equal(a, b):
    la, lb = tree_leaves(a), tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


def _max_diff(a, b) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(tree_leaves(a), tree_leaves(b)))


def _step(model, opt, **kw):
    from functional_seg.data.preprocess import Preprocess
    from functional_seg.runtime import resolve_precision

    pre = Preprocess(precision=resolve_precision(kw.pop("precision", "fp32"), "cpu"))
    return make_train_step(model, get_loss("ce", ignore_index=255), opt, preprocess=pre,
                           augment_cfg=kw.pop("augment_cfg", augment_preset("flip_jitter")), **kw)


def test_train_step_is_pure_and_returns_tensors(model):
    opt = make_optimizer(OptimizerConfig(name="adamw", lr=1e-2, weight_decay=1e-2, clip_norm=1.0))
    ts = init_train_state(model, opt, jr.key(0))
    batch = _batch()
    ts_copy, batch_copy = tree_clone(ts), tree_clone(batch)
    step = _step(model, opt)
    new, metrics = step(ts, batch)
    _assert_trees_equal(ts, ts_copy)  # nothing mutated, step counter included
    _assert_trees_equal(batch, batch_copy)
    assert isinstance(new, TrainState)
    assert int(new.step) == 1 and int(ts.step) == 0
    assert torch.equal(new.key, ts.key)  # the per-step key is derived, not stored
    assert set(metrics) == {"loss", "pixel_accuracy", "confusion"}
    assert metrics["loss"].dim() == 0 and metrics["pixel_accuracy"].dim() == 0
    assert metrics["confusion"].shape == (3, 3) and metrics["confusion"].dtype == torch.int64
    assert int(metrics["confusion"].sum()) == 4 * 16 * 16 - 4 * 4  # ignored pixels not counted
    assert 0.0 <= float(metrics["pixel_accuracy"]) <= 1.0
    assert not any(x is y for x, y in zip(tree_leaves(new.params), tree_leaves(ts.params)))
    assert any(not torch.equal(x, y) for x, y in zip(tree_leaves(new.params), tree_leaves(ts.params)))
    assert any(not torch.equal(x, y) for x, y in zip(tree_leaves(new.state), tree_leaves(ts.state)))  # BN stats


def test_same_state_same_result_and_key_changes_per_step(model):
    opt = make_optimizer(OptimizerConfig(lr=1e-2))
    ts = init_train_state(model, opt, jr.key(1))
    step = _step(model, opt)
    a, ma = step(ts, _batch())
    b, mb = step(ts, _batch())
    _assert_trees_equal((a, ma), (b, mb))
    # The same batch at the next step draws another augmentation: different augmented masks (flips).
    _, m2 = step(a, _batch())
    _, m2b = step(a._replace(step=ts.step), _batch())
    assert float(m2["loss"]) != float(m2b["loss"])


def test_loss_decreases_on_a_tiny_set(model):
    opt = make_optimizer(OptimizerConfig(lr=3e-2))
    ts = init_train_state(model, opt, jr.key(0))
    images, _ = _batch(n=8, size=16)
    # A learnable target: the label is a function of the pixel's red channel.
    masks = torch.bucketize(images[:, 0].long(), torch.tensor([85, 170]))
    step = _step(model, opt, augment_cfg=augment_preset("flip"))
    losses = []
    for _ in range(25):
        ts, metrics = step(ts, (images, masks))
        losses.append(float(metrics["loss"]))
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:3]) / 3


def test_compiled_step_matches_eager_and_compiles_once(model):
    # adamw: torchopt's add_decayed_weights maps over the trees with optree, inside the graph.
    opt = make_optimizer(OptimizerConfig(name="adamw", lr=1e-2, weight_decay=1e-3, clip_norm=5.0, schedule="cosine",
                                         warmup_steps=2, total_steps=10))
    ts = init_train_state(model, opt, jr.key(0))
    batch = _batch()
    eager = _step(model, opt)
    compiled = _step(model, opt, compile=True, backend=BACKEND)
    report = compile_report(compiled, ts, batch, n_steps=6)
    assert report["graphs"] == 1, report
    assert report["recompiles"] == 0, report
    assert report["graph_breaks"] == 0, report
    # A new learning rate is a new tensor value, not a new graph.
    hot = report["final_state"]._replace(hparams={"lr": torch.tensor(3e-3)})
    report2 = compile_report(compiled, hot, batch, n_steps=2)
    assert report2["graphs"] == 0 and report2["recompiles"] == 0, report2

    e = ts
    for _ in range(6):
        e, em = eager(e, batch)
    c = report["final_state"]
    assert int(c.step) == int(e.step) == 6
    assert _max_diff(e.params, c.params) < 1e-4
    assert _max_diff(e.state, c.state) < 1e-4
    assert _max_diff(e.opt_state, c.opt_state) < 1e-4
    _, cm = compiled(c, batch)
    _, em = eager(e, batch)
    assert abs(float(cm["loss"]) - float(em["loss"])) < 1e-4


def test_two_member_vmap_ensemble_equals_two_separate_runs(model):
    opt = make_optimizer(OptimizerConfig(name="sgd", lr=1e-2, momentum=0.9, weight_decay=1e-4))
    key = jr.key(3)
    lrs = [3e-2, 1e-2]
    stacked = init_ensemble(model, opt, key, 2, sweep={"lr": lrs})
    assert stacked.step.shape == (2,) and stacked.hparams["lr"].shape == (2,)
    batch = _batch()
    step = _step(model, opt)
    vstep = ensemble_step(step)
    singles = [init_train_state(model, opt, k, hparams={"lr": lr}) for k, lr in zip(jr.split(key, 2), lrs)]
    for _ in range(3):
        stacked, vm = vstep(stacked, batch)
        outs = [step(s, batch) for s in singles]
        singles = [o[0] for o in outs]
    assert vm["loss"].shape == (2,) and vm["confusion"].shape == (2, 3, 3)
    for member, single in zip(unstack(stacked), singles):
        assert _max_diff(member.params, single.params) < 1e-5
        assert _max_diff(member.state, single.state) < 1e-5
        assert torch.equal(member.step, single.step)
    assert torch.allclose(vm["loss"], torch.stack([o[1]["loss"] for o in outs]), atol=1e-5)
    # Different keys and learning rates: the members really differ.
    a, b = unstack(stacked)
    assert _max_diff(a.params, b.params) > 1e-3


def test_eval_step_counts_every_labelled_pixel(model):
    opt = make_optimizer()
    ts = init_train_state(model, opt, jr.key(0))
    images, masks = _batch()
    from functional_seg.data.preprocess import Preprocess
    from functional_seg.metrics import confusion_matrix, series_custom_iou

    out = make_eval_step(model)(ts.params, ts.state, images, masks)
    assert int(out["confusion"].sum()) == int((masks != 255).sum())
    assert out["custom_iou"].shape == (4,)
    assert bool(((out["custom_iou"] > 0) & (out["custom_iou"] <= 1)).all())
    logits, _ = model.apply(ts.params, ts.state, Preprocess().model_input(images), train=False)
    assert torch.equal(out["confusion"], confusion_matrix(logits, masks, 3, ignore_index=255))
    assert torch.allclose(out["custom_iou"].mean(), series_custom_iou(logits, masks, ignore_index=255))


# ----------------------------------------------------------------------------------------------
# Optimizers against torch.optim on a quadratic problem


def _quadratic_problem():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, generator=g)
    target = torch.randn(6, 3, generator=g)
    params = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}

    def loss(p):
        return ((a @ p["w"] + p["b"] - target) ** 2).mean() * 10

    return params, loss


def _run_ours(cfg, n=8):
    params, loss = _quadratic_problem()
    opt = make_optimizer(cfg)
    opt_state = opt.init(params)
    lr = torch.tensor(cfg.lr)
    for i in range(n):
        grads = torch.func.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params, step=torch.tensor(i), lr=lr)
        params = tree_map(lambda p, u: p + u, params, updates)
    return params


def _run_torch(make, n=8, clip=None, scheduler=None):
    params, loss = _quadratic_problem()
    ps = [torch.nn.Parameter(params["w"].clone()), torch.nn.Parameter(params["b"].clone())]
    opt = make(ps)
    sched = scheduler(opt) if scheduler else None
    for _ in range(n):
        opt.zero_grad()
        loss({"w": ps[0], "b": ps[1]}).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(ps, clip)
        opt.step()
        if sched:
            sched.step()
    return {"w": ps[0].detach(), "b": ps[1].detach()}


@pytest.mark.parametrize("case", ["adam", "adam_wd", "adamw", "sgd", "sgd_nesterov", "adam_clip", "adam_steplr"])
def test_optimizers_match_torch_optim(case):
    if case == "adam":
        ours = _run_ours(OptimizerConfig(name="adam", lr=0.05))
        ref = _run_torch(lambda p: torch.optim.Adam(p, lr=0.05))
    elif case == "adam_wd":
        ours = _run_ours(OptimizerConfig(name="adam", lr=0.05, weight_decay=0.1))
        ref = _run_torch(lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1))
    elif case == "adamw":
        ours = _run_ours(OptimizerConfig(name="adamw", lr=0.05, weight_decay=0.1))
        ref = _run_torch(lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1))
    elif case == "sgd":
        ours = _run_ours(OptimizerConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=0.01))
        ref = _run_torch(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=0.01))
    elif case == "sgd_nesterov":
        ours = _run_ours(OptimizerConfig(name="sgd", lr=0.01, momentum=0.9, nesterov=True))
        ref = _run_torch(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True))
    elif case == "adam_clip":
        ours = _run_ours(OptimizerConfig(name="adam", lr=0.05, clip_norm=0.5))
        ref = _run_torch(lambda p: torch.optim.Adam(p, lr=0.05), clip=0.5)
    else:  # the series' StepLR(7, 0.7) with 1 step per epoch, here StepLR(2, 0.5)
        ours = _run_ours(OptimizerConfig(name="adam", lr=0.05, schedule="step", step_size=2, gamma=0.5,
                                         steps_per_epoch=1))
        ref = _run_torch(lambda p: torch.optim.Adam(p, lr=0.05),
                         scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5))
    for k in ref:
        assert torch.allclose(ours[k], ref[k], atol=1e-5, rtol=1e-5), (case, k, ours[k] - ref[k])


@pytest.mark.parametrize("cfg", [OptimizerConfig(name="adam", lr=0.05, weight_decay=0.1, clip_norm=0.5),
                                 OptimizerConfig(name="adamw", lr=0.05, weight_decay=0.1, schedule="cosine",
                                                 warmup_steps=2, total_steps=8),
                                 OptimizerConfig(name="sgd", lr=0.01, momentum=0.9, nesterov=True)],
                         ids=["adam", "adamw_cosine", "sgd_nesterov"])
def test_apply_is_update_then_apply_updates(cfg):
    import torchopt

    params, loss = _quadratic_problem()
    opt = make_optimizer(cfg)
    state_a = state_b = opt.init(params)
    by_apply = by_update = params
    lr = torch.tensor(cfg.lr)
    for i in range(8):
        step = torch.tensor(i)
        by_apply, state_a = opt.apply(torch.func.grad(loss)(by_apply), state_a, by_apply, step=step, lr=lr)
        updates, state_b = opt.update(torch.func.grad(loss)(by_update), state_b, by_update, step=step, lr=lr)
        by_update = torchopt.apply_updates(by_update, updates, inplace=False)
    for a, b in zip(tree_leaves((by_apply, state_a)), tree_leaves((by_update, state_b))):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), (a - b).abs().max()
    assert _max_diff(by_apply, params) > 1e-3  # it did move


def test_adam_matches_torch_over_a_thousand_steps_of_bias_correction():
    # the bias corrections (1 - b ** t) are folded into 0-d factors; they must hold from t = 1 to
    # where they reach 1, with torch.optim.Adam's eps placement (eps added to sqrt(v_hat))
    params, loss = _quadratic_problem()
    opt = make_optimizer(OptimizerConfig(name="adam", lr=1e-3, eps=1e-3))
    ours, opt_state, lr = params, opt.init(params), torch.tensor(1e-3)
    ref = [torch.nn.Parameter(params["w"].clone()), torch.nn.Parameter(params["b"].clone())]
    torch_opt = torch.optim.Adam(ref, lr=1e-3, eps=1e-3)
    for i in range(1000):
        ours, opt_state = opt.apply(torch.func.grad(loss)(ours), opt_state, ours, step=torch.tensor(i), lr=lr)
        torch_opt.zero_grad()
        loss({"w": ref[0], "b": ref[1]}).backward()
        torch_opt.step()
    assert _max_diff(ours, {"w": ref[0].detach(), "b": ref[1].detach()}) < 1e-5
    assert _max_diff(ours, params) > 0.1


def test_schedules_are_pure_tensor_functions():
    step = torch.arange(0, 101)
    cos = make_schedule(OptimizerConfig(schedule="cosine", warmup_steps=10, total_steps=100, min_lr_ratio=0.1))(step)
    assert cos.dtype == torch.float32 and cos.shape == (101,)
    assert torch.allclose(cos[:10], (torch.arange(10) + 1) / 10 * 1.0, atol=1e-6)  # linear warmup
    assert abs(float(cos[10]) - 1.0) < 1e-6 and abs(float(cos[100]) - 0.1) < 1e-6
    assert abs(float(cos[55]) - (0.1 + 0.9 * 0.5)) < 1e-6  # half way: midpoint of the cosine
    assert bool((cos[10:].diff() <= 1e-7).all())
    poly = make_schedule(OptimizerConfig(schedule="poly", total_steps=100, power=2.0))(step)
    assert torch.allclose(poly, (1 - step / 100.0) ** 2, atol=1e-6)
    st = make_schedule(OptimizerConfig(schedule="step", step_size=7, gamma=0.7, steps_per_epoch=10))(step)
    assert torch.allclose(st, 0.7 ** (step // 70).float(), atol=1e-6)
    const = make_schedule(OptimizerConfig())(torch.tensor(12345))
    assert float(const) == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        make_schedule(OptimizerConfig(schedule="cosine"))
    with pytest.raises(ValueError, match="name: must be one of adam, adamw, sgd, got 'lion'"):
        OptimizerConfig(name="lion")


def test_optimizer_config_round_trips_through_dict():
    cfg = OptimizerConfig(name="sgd", lr=0.1, clip_norm=1.0, schedule="poly", total_steps=7)
    assert OptimizerConfig.from_dict(cfg.to_dict()) == cfg
    assert dataclasses.asdict(cfg)["lr"] == 0.1


def test_compiled_vmap_ensemble_step_compiles_once(model):
    opt = make_optimizer(OptimizerConfig(lr=1e-2))
    stacked = init_ensemble(model, opt, jr.key(0), 2, sweep={"lr": [1e-2, 3e-3]})
    vstep = ensemble_step(_step(model, opt), compile=True, backend=BACKEND)
    report = compile_report(vstep, stacked, _batch(), n_steps=4)
    assert (report["graphs"], report["recompiles"], report["graph_breaks"]) == (1, 0, 0), report
    assert report["final_state"].step.tolist() == [4, 4]


def test_the_vmap_safe_confusion_method_equals_bincount():
    from functional_seg.metrics import confusion_matrix

    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (3, 8, 8), generator=g)
    target = torch.randint(0, 4, (3, 8, 8), generator=g)  # 3 is out of range: not counted
    target[0, :3] = 255

    def compare(p, t, **kw):
        return confusion_matrix(p, t, 3, ignore_index=255, method="compare", **kw)

    assert torch.equal(compare(pred, target), confusion_matrix(pred, target, 3, ignore_index=255))
    assert torch.equal(compare(pred, target, per_image=True),
                       confusion_matrix(pred, target, 3, ignore_index=255, per_image=True))
    batched = torch.func.vmap(lambda p: compare(p, target))(torch.stack([pred, target % 3]))
    assert torch.equal(batched[1], confusion_matrix(target % 3, target, 3, ignore_index=255))


def test_bf16_autocast_step_runs_and_auto_is_fp32_on_cpu(model):
    opt = make_optimizer(OptimizerConfig(lr=1e-2))
    ts = init_train_state(model, opt, jr.key(0))
    batch = _batch()
    fp32, m32 = _step(model, opt, precision="fp32")(ts, batch)
    auto, mauto = _step(model, opt, precision="auto")(ts, batch)
    _assert_trees_equal((fp32, m32), (auto, mauto))
    bf16, m16 = _step(model, opt, precision="bf16")(ts, batch)
    assert m16["loss"].dtype == torch.float32 and math.isfinite(float(m16["loss"]))
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 0.05
    assert all(p.dtype == torch.float32 for p in tree_leaves(bf16.params))  # master weights stay fp32
    with pytest.raises(ValueError, match="unknown precision"):
        _step(model, opt, precision="fp8")
    with pytest.raises(ValueError, match="precision must be fp32 or bf16"):
        from functional_seg.data.preprocess import Preprocess

        Preprocess(precision="auto")


def test_donate_writes_the_new_state_into_the_old_tensors(model):
    """make_train_step(donate=True): the same numbers, held in the tensors of the state passed in."""
    opt = make_optimizer(OptimizerConfig(name="adamw", lr=1e-2, weight_decay=1e-2))
    ts = init_train_state(model, opt, jr.key(0))
    ref, ref_metrics = _step(model, opt)(tree_clone(ts), _batch())
    new, metrics = _step(model, opt, donate=True)(ts, _batch())
    assert _max_diff(new.params, ref.params) == 0.0 and _max_diff(new.opt_state, ref.opt_state) == 0.0
    assert _max_diff(new.state, ref.state) == 0.0 and torch.equal(metrics["loss"], ref_metrics["loss"])
    assert all(a is b for a, b in zip(tree_leaves((new.params, new.opt_state)), tree_leaves((ts.params, ts.opt_state)))
               if isinstance(a, torch.Tensor) and a.dim() > 0)
    again, _ = _step(model, opt, donate=True)(new, _batch(seed=1))  # a donated state steps on
    assert _max_diff(again.params, ref.params) > 0
