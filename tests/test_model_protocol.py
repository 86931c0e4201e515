"""The model protocol: the registry's errors, input checks, and ``from_module`` on torchvision's FCN."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import global_rng_unchanged

from functional_seg import nn as fnn
from functional_seg.core import random as jr
from functional_seg.core.tree import flatten_with_names, tree_allclose, tree_clone, tree_leaves, tree_map
from functional_seg.models import Model, create_model, from_module, list_models, register_model
from functional_seg.models.base import build_cfg

# ------------------------------------------------------------------------------------ a tiny model


@dataclass(frozen=True)
class TinyCfg:
    num_classes: int = 2
    width: int = 4


def _tiny_init(cfg, key):
    conv_key, head_key = jr.split(key)
    bn_params, bn_state = fnn.init_batch_norm(cfg.width)
    params = {"conv": fnn.init_conv2d(conv_key, 3, cfg.width, 3), "bn": bn_params,
              "head": fnn.init_conv2d(head_key, cfg.width, cfg.num_classes, 1)}
    return params, {"bn": bn_state}


def _tiny_apply(cfg, params, state, x, train, key):
    h = fnn.conv2d(params["conv"], x, stride=8, padding=1)
    h, bn_state = fnn.batch_norm(params["bn"], state["bn"], h, train=train)
    logits = fnn.conv2d(params["head"], fnn.relu(h))
    return fnn.resize(logits, x.shape[-2:]), {"bn": bn_state}


def tiny(**overrides) -> Model:
    return Model(name="tiny", cfg=build_cfg(TinyCfg, overrides), init_fn=_tiny_init, apply_fn=_tiny_apply, stride=8)


def test_tiny_model_follows_the_protocol(key, gen):
    model = tiny(num_classes=5)
    assert model.num_classes == 5
    params, state = model.init(key)
    x = torch.randn(2, 3, 16, 24, generator=gen)
    logits, new_state = model.apply(params, state, x, train=False)
    assert logits.shape == (2, 5, 16, 24)
    assert tree_allclose(new_state, state)
    _, train_state = model.apply(params, state, x, train=True)
    assert train_state["bn"]["num_batches_tracked"].item() == 1


@pytest.mark.parametrize("shape, dtype, match", [
    ((2, 4, 16, 16), torch.float32, r"tiny: x must be float \[N, 3, H, W\], got torch.float32 \(2, 4, 16, 16\)"),
    ((2, 1, 16, 16), torch.float32, r"tiny: .*\[N, 3, H, W\]"),
    ((3, 16, 16), torch.float32, r"tiny: .*\(3, 16, 16\)"),
    ((2, 3, 16, 16), torch.int64, r"tiny: .*torch.int64"),
    ((2, 3, 20, 16), torch.float32, r"tiny: input size 20x16 must be divisible by the model's stride 8"),
    ((2, 3, 16, 12), torch.float32, r"tiny: input size 16x12 .* stride 8"),
])
def test_apply_rejects_bad_inputs_naming_model_and_size(key, shape, dtype, match):
    model = tiny()
    params, state = model.init(key)
    with pytest.raises(ValueError, match=match):
        model.apply(params, state, torch.zeros(shape, dtype=dtype), train=False)


def test_init_needs_a_key():
    with pytest.raises(TypeError, match="tiny.init"):
        tiny().init(0)
    with pytest.raises(TypeError, match="key"):
        tiny().init(torch.zeros(2))


# ---------------------------------------------------------------------------------------- registry


def test_create_model_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown model 'no_such_model'") as info:
        create_model("no_such_model")
    for name in list_models():
        assert name in str(info.value)


def test_list_models_is_sorted_and_lowercase():
    names = list_models()
    assert names == sorted(names) and all(n == n.lower() for n in names)


def test_create_model_bad_cfg_is_a_value_error():
    if not list_models():
        pytest.skip("no model registered")
    with pytest.raises(ValueError, match="no_such_field"):
        create_model(list_models()[0], no_such_field=1)


def test_register_model_twice_raises():
    if not list_models():
        pytest.skip("no model registered")
    name = list_models()[0]
    factory = create_model.__globals__["_REGISTRY"][name]
    with pytest.raises(ValueError, match="registered twice"):
        register_model(name)(lambda **cfg: None)
    assert create_model.__globals__["_REGISTRY"][name] is factory  # the first registration is kept


def test_build_cfg_names_unknown_fields():
    assert build_cfg(TinyCfg, {"width": 8}) == TinyCfg(width=8)
    with pytest.raises(ValueError, match=r"TinyCfg: unknown field\(s\) \['depth'\]"):
        build_cfg(TinyCfg, {"depth": 3})


# ----------------------------------------------------------------------------- from_module on FCN


@pytest.fixture(scope="module")
def fcn():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3)
    return module, from_module(module, name="fcn", stride=8)


@pytest.fixture(scope="module")
def fcn_init(fcn):
    _, model = fcn
    return model.init(jr.key(0))


@pytest.fixture(scope="module")
def fcn_x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _reference(module, params, state):
    """A copy of the torch module holding exactly these params and buffers."""
    ref = copy.deepcopy(module)
    ref.load_state_dict(flatten_with_names(params) | flatten_with_names(state), strict=True)
    return ref


def test_from_module_names_match_torch(fcn, fcn_init):
    module, model = fcn
    params, state = fcn_init
    assert list(flatten_with_names(params)) == [n for n, _ in module.named_parameters()]
    assert list(flatten_with_names(state)) == [n for n, _ in module.named_buffers()]
    assert all(not p.requires_grad for p in tree_leaves(params))
    assert model.num_classes == 3 and model.stride == 8 and model.name == "fcn"
    assert from_module(module).num_classes == 3  # guessed from the last Conv2d
    assert from_module(module).name == "fcn"


def test_from_module_eval_matches_the_module(fcn, fcn_init, fcn_x):
    module, model = fcn
    params, state = fcn_init
    with torch.no_grad():
        expected = _reference(module, params, state).eval()(fcn_x)["out"]
        logits, new_state = model.apply(params, state, fcn_x, train=False)
    assert logits.shape == (2, 3, 64, 64)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert new_state is state


def test_from_module_train_updates_state_out_of_place(fcn, fcn_init, fcn_x):
    module, model = fcn
    params, state = fcn_init
    before_params, before_state = tree_clone(params), tree_clone(state)
    k = jr.key(1)
    with torch.no_grad(), global_rng_unchanged():
        logits, new_state = model.apply(params, state, fcn_x, train=True, key=k)
        again, _ = model.apply(params, state, fcn_x, train=True, key=k)
        other, _ = model.apply(params, state, fcn_x, train=True, key=jr.key(2))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the head's dropout draws from torch's RNG
        ref = _reference(module, params, state).train()
        ref(fcn_x)
    # inputs untouched, new state differs and matches torch's own batch-norm update
    assert tree_allclose(params, before_params) and tree_allclose(state, before_state)
    assert list(flatten_with_names(new_state)) == list(flatten_with_names(state))
    assert not tree_allclose(new_state, state)
    torch.testing.assert_close(flatten_with_names(new_state), dict(ref.named_buffers()), rtol=1e-5, atol=1e-5)
    assert new_state["backbone"]["bn1"]["num_batches_tracked"].item() == 1
    # the head's dropout is a function of the key
    assert torch.equal(logits, again)
    assert not torch.equal(logits, other)


def test_grad_through_the_lifted_fcn(fcn, fcn_init, fcn_x):
    _, model = fcn
    params, state = fcn_init
    target = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(1))

    def loss_fn(params):
        logits, new_state = model.apply(params, state, fcn_x, train=True, key=jr.key(1))
        return F.cross_entropy(logits, target), new_state

    grads, new_state = torch.func.grad(loss_fn, has_aux=True)(params)
    assert tree_allclose(tree_map(lambda g: g.shape, grads), tree_map(lambda p: p.shape, params))
    assert all(torch.isfinite(g).all() for g in tree_leaves(grads))
    flat = flatten_with_names(grads)
    assert flat["classifier.4.weight"].abs().sum() > 0 and flat["backbone.conv1.weight"].abs().sum() > 0
    assert new_state["classifier"]["1"]["num_batches_tracked"].item() == 1


def test_from_module_init_is_a_function_of_the_key(fcn, fcn_init):
    _, model = fcn
    with global_rng_unchanged():
        again = model.init(jr.key(0))
        other = model.init(jr.key(1))
    # init re-draws the module's own tensors in place; the trees returned before are copies, unchanged by it
    assert tree_allclose(again, fcn_init)
    params, other_params = flatten_with_names(fcn_init[0]), flatten_with_names(other[0])
    assert not torch.equal(params["backbone.conv1.weight"], other_params["backbone.conv1.weight"])
    assert not torch.equal(params["classifier.4.weight"], other_params["classifier.4.weight"])
