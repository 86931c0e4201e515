"""The model protocol: the registry's errors, input checks, cfg validation of every registered model
(property tests: random invalid values refused with one-line ValueErrors, random valid cfgs accepted
and run on the meta device), ``from_module`` on torchvision's FCN, and the purity of a lifted
module's apply (no mode flips, interleaved and threaded calls equal separate ones)."""

from __future__ import annotations

import copy
import dataclasses
import threading
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import global_rng_unchanged
from hypothesis import given
from hypothesis import strategies as st

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
    with pytest.raises(ValueError, match=r"^TinyCfg: unknown field\(s\) \['depth'\]; valid: num_classes, width$"):
        build_cfg(TinyCfg, {"depth": 3})
    with pytest.raises(ValueError, match=r"^tiny: unknown field\(s\) \['depth', 'zz'\]; valid: num_classes, width$"):
        build_cfg(TinyCfg, {"depth": 3, "zz": 1, "width": 2}, name="tiny")


@pytest.mark.parametrize("name", ["segnet", "segnet_dsc", "unet", "vit", "segformer", "fcn_resnet50"])
def test_unknown_cfg_field_lists_the_valid_ones_in_one_line(name):
    with pytest.raises(ValueError) as info:
        create_model(name, bogus=1)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{name}: unknown field(s) ['bogus']; valid: ")
    assert message.split("valid: ")[1].split(", ") == list(SPEC[name])


# ------------------------------------------------------------------------------- cfg validation
# What each field of each registered model accepts, stated here independently of the models'
# rule tables; test_spec_covers_every_field keeps it complete when a field is added.

POS_INT, POS_ODD_INT, POS_INTS, POS_ODD_INTS, PROB, FLAG, FIXED = (
    "pos_int", "pos_odd_int", "pos_ints", "pos_odd_ints", "prob", "flag", "fixed")
ENCODER, OPT_ENCODER, WEIGHTS = "encoder", "optional_encoder", "weights"


def _int_in(*values: int) -> frozenset:
    """A field that takes one of these integers."""
    return frozenset(values)
_COMMON = {"num_classes": POS_INT, "in_channels": POS_INT}
_SEGNET = {**_COMMON, "widths": POS_INTS, "convs_per_stage": POS_INTS, "kernel_size": POS_ODD_INT,
           "separable": FIXED, "input_bn": FLAG, "final_relu": FLAG}
_LIFTED = {"num_classes": POS_INT}
SPEC: dict[str, dict] = {
    "segnet": _SEGNET,
    "segnet_dsc": _SEGNET,
    "unet": {**_COMMON, "base_width": POS_INT, "depth": POS_INT, "upsample": ("transposed", "bilinear"),
             "encoder": OPT_ENCODER, "encoder_weights": WEIGHTS, "decoder_channels": POS_INTS},
    "vit": {**_COMMON, "image_size": POS_INT, "patch_size": POS_INT, "dim": POS_INT, "depth": POS_INT,
            "num_heads": POS_INT, "mlp_dim": POS_INT, "dropout": PROB, "input_bn": FLAG,
            "pos_interpolation": ("bicubic", "bilinear", "none")},
    "segformer": {**_COMMON, "dims": POS_INTS, "depths": POS_INTS, "num_heads": POS_INTS, "sr_ratios": POS_INTS,
                  "patch_sizes": POS_ODD_INTS, "patch_strides": POS_INTS, "mlp_ratio": POS_INT,
                  "decoder_dim": POS_INT, "drop_path_rate": PROB, "decoder_dropout": PROB},
    "fpn": {**_COMMON, "encoder": ENCODER, "encoder_weights": WEIGHTS, "encoder_depth": _int_in(4, 5),
            "pyramid_channels": POS_INT, "segmentation_channels": POS_INT, "merge_policy": ("add", "cat"),
            "dropout": PROB},
    "deeplabv3plus": {**_COMMON, "encoder": ENCODER, "encoder_weights": WEIGHTS, "encoder_depth": _int_in(3, 4, 5),
                      "output_stride": _int_in(8, 16), "decoder_channels": POS_INT, "atrous_rates": POS_INTS,
                      "aspp_separable": FLAG, "aspp_dropout": PROB},
    "fcn_resnet50": _LIFTED,
    "deeplabv3_mobilenet": _LIFTED,
    "lraspp_mobilenet": _LIFTED,
}
_BUILT = {"segnet", "segnet_dsc", "unet", "vit", "segformer"}  # cheap to build: no torchvision module


def test_spec_covers_every_field():
    from functional_seg.models.lifted import LiftedCfg

    assert set(SPEC) == set(list_models())
    for name, spec in SPEC.items():
        cfg_cls = LiftedCfg if SPEC[name] is _LIFTED else type(create_model(name).cfg)
        assert list(spec) == [f.name for f in dataclasses.fields(cfg_cls)], name


_not_int = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3), st.booleans(), st.none(),
                     st.tuples(st.integers(1, 4)))
_bad_pos_int = st.one_of(st.integers(max_value=0), _not_int)
_bad_pos_odd_int = st.one_of(_bad_pos_int, st.integers(1, 50).map(lambda n: 2 * n))


def _bad_tuples(bad_item):
    """A non-empty run of valid items with one bad item inserted; or empty; or not a tuple at all."""
    spliced = st.tuples(st.lists(st.integers(1, 9).map(lambda n: 2 * n - 1), max_size=3), bad_item,
                        st.integers(0, 3)).map(lambda t: tuple(t[0][:t[2]] + [t[1]] + t[0][t[2]:]))
    return st.one_of(spliced, st.just(()), st.just([]), st.integers(1, 8), st.text(max_size=3), st.none())


_BAD = {
    POS_INT: _bad_pos_int,
    POS_ODD_INT: _bad_pos_odd_int,
    POS_INTS: _bad_tuples(_bad_pos_int),
    POS_ODD_INTS: _bad_tuples(_bad_pos_odd_int),
    PROB: st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-9), st.just(float("nan")),
                    st.just(float("inf")), st.integers(min_value=1), st.text(max_size=3), st.booleans(), st.none()),
    FLAG: st.one_of(st.integers(), st.floats(), st.text(max_size=3), st.none()),
    ENCODER: st.one_of(st.integers(), st.booleans(), st.none(), st.just(""), st.just("  ")),
    OPT_ENCODER: st.one_of(st.integers(), st.booleans(), st.just(""), st.just("  ")),
    WEIGHTS: st.one_of(st.integers(), st.booleans(), st.floats(), st.tuples(st.text(max_size=2))),
}


@st.composite
def invalid_fields(draw):
    """(model name, field, value) with a value that field must refuse whatever the other fields are."""
    name = draw(st.sampled_from(sorted(SPEC)))
    field = draw(st.sampled_from([f for f, kind in SPEC[name].items() if kind != FIXED]))
    kind = SPEC[name][field]
    if isinstance(kind, tuple):  # a choice
        value = draw(st.one_of(st.text(max_size=8).filter(lambda v: v not in kind), st.integers(), st.none()))
    elif isinstance(kind, frozenset):  # one of some integers
        value = draw(st.one_of(st.integers().filter(lambda v: v not in kind), st.booleans(), st.none(),
                               st.floats(), st.text(max_size=3)))
    else:
        value = draw(_BAD[kind])
    return name, field, value


@given(invalid_fields())
def test_invalid_cfg_values_are_refused_in_one_line(case):
    name, field, value = case
    with pytest.raises(ValueError) as info:
        create_model(name, **{field: value})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{name}: {field} must be "), message
    assert message.endswith(f", got {value!r}"), message


def _ints(draw, values, n):
    """n ints from ``values``, as a tuple, a list or numpy integers (all must be accepted)."""
    out = [draw(values) for _ in range(n)]
    form = draw(st.sampled_from(["tuple", "list", "numpy"]))
    return tuple(out) if form == "tuple" else out if form == "list" else [np.int64(v) for v in out]


@st.composite
def valid_cfgs(draw):
    """(model name, cfg, side) for a small valid cfg and the smallest input side it must accept."""
    name = draw(st.sampled_from(sorted(_BUILT)))
    cfg: dict = {"num_classes": draw(st.integers(1, 4)), "in_channels": draw(st.integers(1, 4))}
    if name in ("segnet", "segnet_dsc"):
        n = draw(st.integers(1, 3))
        cfg.update(widths=_ints(draw, st.integers(1, 6), n), convs_per_stage=_ints(draw, st.integers(1, 2), n),
                   kernel_size=draw(st.sampled_from([1, 3, 5])), input_bn=draw(st.booleans()),
                   final_relu=draw(st.booleans()))
        side = 2 ** n
    elif name == "unet":
        cfg.update(base_width=draw(st.integers(1, 4)), depth=draw(st.integers(1, 3)),
                   upsample=draw(st.sampled_from(["transposed", "bilinear"])))
        side = 2 ** cfg["depth"]
    elif name == "vit":
        patch, heads = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        cfg.update(patch_size=patch, image_size=patch * draw(st.integers(1, 3)), num_heads=heads,
                   dim=heads * draw(st.integers(1, 3)), depth=draw(st.integers(1, 2)), mlp_dim=draw(st.integers(1, 8)),
                   dropout=draw(st.one_of(st.just(0), st.floats(0, 0.99))), input_bn=draw(st.booleans()),
                   pos_interpolation=draw(st.sampled_from(["bicubic", "bilinear", "none"])))
        side = cfg["image_size"]
    else:
        n = draw(st.integers(1, 4))
        heads = [draw(st.integers(1, 2)) for _ in range(n)]
        strides = [draw(st.integers(1, 2)) for _ in range(n)]
        total = int(np.prod(strides))
        reach = np.cumprod(strides)
        cfg.update(num_heads=tuple(heads), dims=tuple(h * draw(st.integers(1, 3)) for h in heads),
                   depths=_ints(draw, st.integers(1, 2), n), patch_strides=tuple(strides),
                   patch_sizes=_ints(draw, st.sampled_from([1, 3, 5]), n),
                   sr_ratios=tuple(draw(st.integers(1, total // int(r))) for r in reach),
                   mlp_ratio=draw(st.integers(1, 2)), decoder_dim=draw(st.integers(1, 8)),
                   drop_path_rate=draw(st.floats(0, 0.5)), decoder_dropout=draw(st.floats(0, 0.5)))
        side = total
    return name, cfg, side


@given(valid_cfgs())
def test_valid_cfgs_are_accepted_and_run(case):
    """Accepted means usable: init and an eval apply on the smallest input (meta device: shapes only)."""
    name, cfg, side = case
    model = create_model(name, **cfg)
    for field, value in cfg.items():  # lists and numpy integers are stored as tuples of Python ints
        stored = getattr(model.cfg, field)
        if isinstance(value, (list, tuple)):
            assert isinstance(stored, tuple) and all(type(v) is int for v in stored) and list(stored) == list(value)
        else:
            assert stored == value
    assert side % model.stride == 0
    with torch.device("meta"):
        params, state = model.init(jr.key(0, device="meta"))
        logits, _ = model.apply(params, state, torch.zeros(1, cfg["in_channels"], side, side), train=False)
    assert logits.shape == (1, cfg["num_classes"], side, side)


@pytest.mark.parametrize("name, cfg, message", [
    ("segnet", {"widths": (8, 16)}, "segnet: convs_per_stage must be of length 2"),
    ("segnet_dsc", {"convs_per_stage": (1,)}, "segnet_dsc: convs_per_stage must be of length 4"),
    ("segnet_dsc", {"separable": False}, "segnet_dsc: separable is fixed by the model name"),
    ("vit", {"image_size": 100}, "vit: image_size must be divisible by patch_size 16, got 100"),
    ("vit", {"num_heads": 5}, "vit: num_heads must be a divisor of dim 768, got 5"),
    ("segformer", {"depths": (2, 2, 2)}, "segformer: depths must be of length 4"),
    ("segformer", {"num_heads": (1, 2, 3, 8)}, "segformer: num_heads must be divisors of dims"),
    ("segformer", {"sr_ratios": (8, 8, 2, 1)}, "segformer: sr_ratios must be at most (8, 4, 2, 1)"),
])
def test_relations_between_fields_are_checked(name, cfg, message):
    with pytest.raises(ValueError) as info:
        create_model(name, **cfg)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_the_issue_examples():
    """The values that used to crash ``fseg train`` mid-run, refused as it starts."""
    for widths in [("a", "b", "c", "d"), (0, 8, 8, 8), (-4, 8, 8, 8)]:
        with pytest.raises(ValueError, match=r"^segnet: widths must be a non-empty tuple of positive integers"):
            create_model("segnet", widths=widths)
    with pytest.raises(ValueError, match=r"^segnet: num_classes must be a positive integer, got 0$"):
        create_model("segnet", num_classes=0)
    with pytest.raises(ValueError, match=r"^mine: stride must be a positive integer, got 0$"):
        from_module(torch.nn.Conv2d(3, 2, 1), name="mine", stride=0)
    with pytest.raises(ValueError, match=r"^mine: num_classes must be a positive integer, got 0$"):
        from_module(torch.nn.Conv2d(3, 2, 1), name="mine", num_classes=0)


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


# ------------------------------------------------------------------- from_module's apply is pure


def _small_module() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                   torch.nn.Dropout(0.5), torch.nn.Conv2d(4, 2, 1))


def _modes(module: torch.nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in module.named_modules()}


@pytest.mark.parametrize("start_training", [True, False])
def test_lifted_apply_leaves_the_modules_modes_and_tensors(start_training, gen):
    module = _small_module().train(start_training)
    module[1].train(not start_training)  # a mixed tree of flags, as a user might leave it
    modes = _modes(module)
    tensors = {n: t.clone() for n, t in module.state_dict().items()}
    model = from_module(module, name="small")
    params, state = model.init(jr.key(1))
    x = torch.randn(2, 3, 8, 8, generator=gen)
    for train in (True, False, True):
        model.apply(params, state, x, train=train, key=jr.key(2))
        assert _modes(module) == modes
    assert all(torch.equal(t, tensors[n]) for n, t in module.state_dict().items())  # init drew into a copy


def test_lifted_interleaved_train_and_eval_equal_separate_runs(gen):
    x = torch.randn(2, 3, 8, 8, generator=gen)
    interleaved = from_module(_small_module(), name="small")
    params, state = interleaved.init(jr.key(1))
    runs = [interleaved.apply(params, state, x, train=t, key=jr.key(3)) for t in (True, False, True, False)]
    train_only, eval_only = from_module(_small_module()), from_module(_small_module())
    ref_train = train_only.apply(params, state, x, train=True, key=jr.key(3))
    ref_eval = eval_only.apply(params, state, x, train=False)
    for (out, new_state), (ref, ref_state) in zip(runs, [ref_train, ref_eval] * 2):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(new_state, ref_state, rtol=0, atol=0)
    assert not torch.equal(runs[0][0], runs[1][0])  # train (batch statistics, dropout) differs from eval


def test_lifted_apply_from_several_threads_equals_serial_runs(gen):
    """Each thread calls into its own copy of the module: no thread reads another's params."""
    model = from_module(_small_module(), name="small")
    trees = [model.init(jr.key(i)) for i in range(4)]
    x = torch.randn(2, 3, 16, 16, generator=gen)
    expected = [model.apply(p, s, x, train=False)[0] for p, s in trees]
    results: dict[int, list] = {}
    barrier = threading.Barrier(len(trees))

    def work(i):
        barrier.wait()
        results[i] = [model.apply(*trees[i], x, train=False)[0] for _ in range(20)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(trees))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in results.items():
        assert all(torch.equal(out, expected[i]) for out in outs), f"thread {i} saw another's params"


def test_lifted_meta_init_draws_nothing(no_global_rng):
    model = from_module(_small_module(), name="small")
    with no_global_rng():
        params, state = model.init(jr.key(0, device="meta"))
    assert all(t.is_meta for t in tree_leaves((params, state)))
    assert {n: tuple(t.shape) for n, t in flatten_with_names(params).items()} == {
        "0.weight": (4, 3, 3, 3), "0.bias": (4,), "1.weight": (4,), "1.bias": (4,), "4.weight": (2, 4, 1, 1),
        "4.bias": (2,)}
