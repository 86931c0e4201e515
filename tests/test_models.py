"""The model zoo: every registered model through init, apply (train and eval), grad, vmap over two
stacked parameter sets and torch.compile; the series' parameter counts; equality with the plain
``torch.nn.Module`` references in benchmarks/reference_modules.py; cfg and input-size errors; keys.

The walk uses small cfgs (SMALL) so the file runs in about a minute on 2 CPU cores. Compilation,
``fullgraph=True``: ``test_compile_fullgraph`` uses the ``aot_eager`` backend (Dynamo's full-graph
capture and AOTAutograd's functionalisation, everything our code decides, but no C++ code
generation) for every model but two of the three lifted torchvision ones (one stands for the
shared lifting path); inductor (the default backend, C++ code generation on CPU) runs on the
U-Net (eval and train), the ViT's training forward with dropout keys, SegNet and SegFormer: the
ops that are ours.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from benchmarks.reference_modules import build_reference, load_pure
from functional_seg.core import random as jr
from functional_seg.core.tree import flatten_with_names, stack, tree_leaves, tree_size, tree_structure
from functional_seg.models import create_model, from_module, list_models

# name -> (cfg, (N, H, W))
SMALL: dict[str, tuple[dict, tuple[int, int, int]]] = {
    "segnet": (dict(widths=(8, 16, 16, 32)), (2, 64, 64)),
    "segnet_dsc": (dict(widths=(8, 16, 16, 32)), (2, 64, 64)),
    "unet": (dict(base_width=8, depth=2), (2, 32, 32)),
    "vit": (dict(image_size=32, patch_size=8, dim=32, depth=2, num_heads=4, mlp_dim=64), (2, 32, 32)),
    "segformer": (dict(dims=(8, 16, 24, 32), num_heads=(1, 1, 2, 2), decoder_dim=32), (2, 64, 64)),
    "fcn_resnet50": ({}, (2, 64, 64)),
    "deeplabv3_mobilenet": ({}, (2, 64, 64)),
    "lraspp_mobilenet": ({}, (2, 64, 64)),
    "fpn": (dict(encoder="test_efficientnet", pyramid_channels=16, segmentation_channels=32), (2, 64, 64)),
    "deeplabv3plus": (dict(encoder="test_efficientnet", decoder_channels=16, atrous_rates=(1, 2, 3)), (2, 64, 64)),
}
LIFTED = {"fcn_resnet50", "deeplabv3_mobilenet", "lraspp_mobilenet"}
LIFTED_DROPOUT = {"fcn_resnet50", "deeplabv3_mobilenet"}  # dropout from torch's RNG: vmap needs a randomness mode

_MODELS: dict[str, object] = {}


def small_model(name: str):
    """One instance per name for the whole file (the torchvision builds take seconds)."""
    if name not in _MODELS:
        _MODELS[name] = create_model(name, **SMALL[name][0])
    return _MODELS[name]


def small_input(name: str, gen: torch.Generator) -> torch.Tensor:
    n, h, w = SMALL[name][1]
    return torch.randn(n, 3, h, w, generator=gen)


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def test_every_registered_model_has_a_small_cfg():
    assert set(list_models()) == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_walk(name, gen):
    """init -> apply (eval, train) -> grad (every parameter leaf finite and not all zero) -> vmap over two
    stacked parameter sets."""
    model = small_model(name)
    params, state = model.init(jr.key(0))
    x = small_input(name, gen)
    n, _, h, w = x.shape
    train_key = jr.key(1)

    logits, eval_state = model.apply(params, state, x, train=False)
    assert logits.shape == (n, model.num_classes, h, w) and logits.dtype == torch.float32
    assert finite(logits)
    assert eval_state is state  # eval leaves the state as it was

    before = [t.clone() for t in tree_leaves(state)]
    logits, new_state = model.apply(params, state, x, train=True, key=train_key)
    assert logits.shape == (n, model.num_classes, h, w) and finite(logits)
    assert tree_structure(new_state) == tree_structure(state)
    assert all(torch.equal(a, b) for a, b in zip(before, tree_leaves(state)))  # inputs untouched
    if tree_leaves(state):
        assert any(not torch.equal(a, b) for a, b in zip(tree_leaves(new_state), tree_leaves(state)))

    target = torch.randint(0, model.num_classes, (n, h, w), generator=gen)

    def loss_fn(p):
        out, st = model.apply(p, state, x, train=True, key=train_key)
        return F.cross_entropy(out, target), st

    grads, _ = grad(loss_fn, has_aux=True)(params)
    assert tree_structure(grads) == tree_structure(params)
    flat = flatten_with_names(grads)
    assert set(flat) == set(flatten_with_names(params))
    not_finite = [n for n, g in flat.items() if not finite(g)]
    zero = [n for n, g in flat.items() if finite(g) and not bool(g.ne(0).any())]
    assert not not_finite, f"{name}: non-finite gradients for {not_finite}"
    assert not zero, f"{name}: all-zero gradients for {len(zero)} of {len(flat)} leaves: {zero}"

    params2, state2 = model.init(jr.key(2))
    stacked_params, stacked_state = stack([params, params2]), stack([state, state2])
    randomness = "different" if name in LIFTED_DROPOUT else "error"
    out, out_state = vmap(lambda p, s: model.apply(p, s, x, train=True, key=train_key), randomness=randomness)(
        stacked_params, stacked_state)
    assert out.shape == (2, n, model.num_classes, h, w) and finite(out)
    if name not in LIFTED_DROPOUT:  # explicit keys: the batched run equals the separate runs
        ref, ref_state = model.apply(params2, state2, x, train=True, key=train_key)
        torch.testing.assert_close(out[1], ref, atol=1e-4, rtol=1e-4)
        for a, b in zip(tree_leaves(out_state), tree_leaves(ref_state)):
            torch.testing.assert_close(a[1], b, atol=1e-4, rtol=1e-4)
    out, _ = vmap(lambda p, s: model.apply(p, s, x, train=False))(stacked_params, stacked_state)
    torch.testing.assert_close(out[1], model.apply(params2, state2, x, train=False)[0], atol=1e-4, rtol=1e-4)


# Dynamo capture (aot_eager) for every model whose ops are ours; the three lifted torchvision models
# share one lifting path (``from_module``), which a small module stands for below (Dynamo spends
# 40 s or more on each torchvision graph, even the smallest, which is torchvision's code, not ours).
_FULLGRAPH = sorted(set(SMALL) - LIFTED)


def test_compile_fullgraph_of_a_lifted_module(gen):
    """``from_module``'s apply (parameters and buffers swapped in functionally) in one graph, train
    and eval: batch norm's running statistics come back as the new state, as eager returns them."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Dropout2d(0.0), torch.nn.Conv2d(4, 3, 1))
    model = from_module(net, name="tiny_module", num_classes=3, stride=1)
    params, state = model.init(jr.key(0))
    x = torch.rand(2, 3, 16, 16, generator=gen)
    for train in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(lambda p, s, x, train=train: model.apply(p, s, x, train=train), fullgraph=True,
                                 backend="aot_eager")
        out, new_state = compiled(params, state, x)
        ref, ref_state = model.apply(params, state, x, train=train)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(new_state, ref_state)
        moved = not torch.equal(new_state["1"]["running_mean"], state["1"]["running_mean"])
        assert moved == train  # training updates the statistics: the state really flows out of the graph


@pytest.mark.parametrize("name", _FULLGRAPH)
def test_compile_fullgraph(name, gen):
    """torch.compile(fullgraph=True) of apply in eval matches eager (aot_eager backend, see the module doc)."""
    torch._dynamo.reset()  # one lambda compiled for every model: past 8 models a process hits dynamo's recompile limit
    model = small_model(name)
    params, state = model.init(jr.key(0))
    x = small_input(name, gen)
    compiled = torch.compile(lambda p, s, x: model.apply(p, s, x, train=False), fullgraph=True,
                             backend="aot_eager")
    out, _ = compiled(params, state, x)
    torch.testing.assert_close(out, model.apply(params, state, x, train=False)[0], atol=1e-4, rtol=1e-4)


def test_compile_inductor(gen):
    """The default backend (inductor, C++ code generation on CPU) on the small U-Net, eval and train."""
    model = small_model("unet")
    params, state = model.init(jr.key(0))
    x = small_input("unet", gen)
    for train in (False, True):
        compiled = torch.compile(lambda p, s, x, train=train: model.apply(p, s, x, train=train), fullgraph=True)
        out, new_state = compiled(params, state, x)
        ref, ref_state = model.apply(params, state, x, train=train)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(new_state, ref_state)


def test_compile_inductor_train_with_dropout_keys(gen):
    """The ViT's training forward with explicit dropout keys (attention, our counter-based draws)
    compiles with inductor and draws exactly as eager."""
    model = create_model("vit", image_size=32, patch_size=8, dim=16, depth=1, num_heads=2, mlp_dim=32)
    params, state = model.init(jr.key(0))
    x = small_input("vit", gen)
    step = torch.compile(lambda p, s, x, k: model.apply(p, s, x, train=True, key=k), fullgraph=True)
    out, new_state = step(params, state, x, jr.key(3))
    ref, ref_state = model.apply(params, state, x, train=True, key=jr.key(3))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(new_state, ref_state)


@pytest.mark.parametrize("name", ["segnet", "segformer"])
def test_compile_inductor_for_our_unusual_ops(name, gen):
    """Inductor on the models whose ops no other test generates code for: SegNet's max-unpool
    (index scatter and its channels-last window path) and SegFormer's overlapping patch embeddings
    with spatial-reduction attention. U-Net and the ViT are compiled above; the lifted
    torchvision models run torchvision's standard ops."""
    torch._dynamo.reset()
    model = small_model(name)
    params, state = model.init(jr.key(0))
    x = small_input(name, gen)
    compiled = torch.compile(lambda p, s, x: model.apply(p, s, x, train=False), fullgraph=True)
    torch.testing.assert_close(compiled(params, state, x)[0], model.apply(params, state, x, train=False)[0],
                               atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Parameter counts and references


@pytest.mark.parametrize("name, expected", [
    ("segnet", 15_274_892),      # SERIES.md, Part 2
    ("segnet_dsc", 1_749_671),   # SERIES.md, Part 3
    ("vit", 86_284_806),         # SERIES.md, Part 4
    ("unet", 31_037_763),        # classic U-Net, 64..1024 wide, BN, 2x2 up-convs
    ("segformer", 3_714_915),    # MiT-B0 + all-MLP decoder (256), 3 classes
])
def test_default_parameter_counts(name, expected):
    model = create_model(name)
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        params, state = model.init(jr.key(0))
    assert tree_size(params) == expected


@pytest.mark.parametrize("name, cfg", [
    ("segnet", {}), ("segnet_dsc", {}), ("unet", {}), ("unet", {"upsample": "bilinear"}),
    ("unet", {"base_width": 16, "depth": 3}), ("vit", {}), ("vit", {"patch_size": 8, "dim": 64, "depth": 3}),
    ("segformer", {}), ("segnet", {"widths": (32, 64), "convs_per_stage": (1, 2), "num_classes": 5}),
])
def test_parameter_counts_equal_reference_modules(name, cfg):
    """Same widths, same counts, leaf by leaf: our names and shapes equal the reference's state_dict."""
    model = create_model(name, **cfg)
    with torch.device("meta"):
        params, state = model.init(jr.key(0))
        ref = build_reference(name, model.cfg)
    assert tree_size(params) == sum(p.numel() for p in ref.parameters())
    ours = {n.replace("attn.in_proj.", "attn.in_proj_"): tuple(t.shape)
            for n, t in {**flatten_with_names(params), **flatten_with_names(state)}.items()}
    assert ours == {n: tuple(t.shape) for n, t in ref.state_dict().items()}


@pytest.mark.parametrize("name", ["segnet", "segnet_dsc", "unet", "vit", "segformer"])
def test_outputs_equal_reference_modules(name, gen):
    """The reference module loaded with our params computes the same logits (and, in training, the
    same batch-norm statistics)."""
    model = small_model(name)
    params, state = model.init(jr.key(0))
    ref = load_pure(build_reference(name, model.cfg), params, state)
    x = small_input(name, gen)
    with torch.no_grad():
        expected = ref.eval()(x)
    torch.testing.assert_close(model.apply(params, state, x, train=False)[0], expected, atol=1e-5, rtol=1e-4)
    if name in ("segnet", "segnet_dsc", "unet"):  # no dropout: training is deterministic too
        with torch.no_grad():
            expected = ref.train()(x)
        out, new_state = model.apply(params, state, x, train=True)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        buffers = dict(ref.named_buffers())
        for n, t in flatten_with_names(new_state).items():
            torch.testing.assert_close(t, buffers[n], atol=1e-6, rtol=1e-5)


def test_unet_bilinear_matches_reference(gen):
    model = create_model("unet", base_width=8, depth=2, upsample="bilinear")
    params, state = model.init(jr.key(0))
    ref = load_pure(build_reference("unet", model.cfg), params, state).eval()
    x = torch.randn(1, 3, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model.apply(params, state, x, train=False)[0], ref(x), atol=1e-5, rtol=1e-4)


def test_param_names_read_like_torch():
    params, state = small_model("segnet").init(jr.key(0))
    names = list(flatten_with_names(params))
    assert names[:3] == ["input_bn.weight", "input_bn.bias", "encoder.0.0.conv.weight"]
    assert "decoder.3.1.bn.bias" in names
    assert "encoder.0.0.bn.running_mean" in flatten_with_names(state)
    params, _ = small_model("segnet_dsc").init(jr.key(0))
    assert "encoder.0.0.conv.depthwise.weight" in flatten_with_names(params)
    params, _ = small_model("vit").init(jr.key(0))
    assert {"pos_embed", "blocks.1.attn.in_proj.weight", "blocks.1.mlp.fc2.bias", "head.weight"} <= set(
        flatten_with_names(params))


# ----------------------------------------------------------------------------------------------
# Errors, sizes and keys


@pytest.mark.parametrize("name", ["segnet", "segnet_dsc", "unet", "vit", "segformer", "lraspp_mobilenet"])
def test_unknown_cfg_field_is_a_value_error(name):
    with pytest.raises(ValueError, match="no_such_field"):
        create_model(name, no_such_field=1)


@pytest.mark.parametrize("name, size", [("segnet", (64, 60)), ("unet", (30, 32)), ("vit", (36, 32)),
                                        ("segformer", (48, 64))])
def test_input_size_not_divisible_by_stride(name, size):
    model = small_model(name)
    params, state = model.init(jr.key(0))
    with pytest.raises(ValueError, match="divisible by the model's stride"):
        model.apply(params, state, torch.zeros(1, 3, *size), train=False)


@pytest.mark.parametrize("name", ["segnet", "unet", "segformer"])
def test_other_sizes_divisible_by_stride_work(name, gen):
    model = small_model(name)
    params, state = model.init(jr.key(0))
    h, w = 2 * model.stride, 3 * model.stride
    out, _ = model.apply(params, state, torch.randn(1, 3, h, w, generator=gen), train=False)
    assert out.shape == (1, model.num_classes, h, w)


def test_vit_position_embedding_interpolates_at_other_sizes(gen):
    model = small_model("vit")  # trained grid 4x4 (32 px, patch 8)
    params, state = model.init(jr.key(0))
    out, _ = model.apply(params, state, torch.randn(2, 3, 48, 24, generator=gen), train=False)
    assert out.shape == (2, 3, 48, 24) and finite(out)
    strict = create_model("vit", **{**SMALL["vit"][0], "pos_interpolation": "none"})
    with pytest.raises(ValueError, match="pos_interpolation"):
        strict.apply(params, state, torch.zeros(1, 3, 48, 24), train=False)


@pytest.mark.parametrize("name", ["vit", "segformer", "deeplabv3_mobilenet"])
def test_training_with_dropout_needs_a_key(name):
    model = small_model(name)
    params, state = model.init(jr.key(0))
    n, h, w = SMALL[name][1]
    with pytest.raises(ValueError, match="key"):
        model.apply(params, state, torch.zeros(n, 3, h, w), train=True)


def test_no_dropout_no_key_needed(gen):
    model = create_model("vit", **{**SMALL["vit"][0], "dropout": 0.0})
    params, state = model.init(jr.key(0))
    out, _ = model.apply(params, state, small_input("vit", gen), train=True)
    assert finite(out)


@pytest.mark.parametrize("name", ["vit", "segformer"])
def test_dropout_draws_from_the_key(name, gen):
    model = small_model(name)
    params, state = model.init(jr.key(0))
    x = small_input(name, gen)
    a = model.apply(params, state, x, train=True, key=jr.key(5))[0]
    b = model.apply(params, state, x, train=True, key=jr.key(5))[0]
    c = model.apply(params, state, x, train=True, key=jr.key(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", ["segnet", "vit", "segformer", "lraspp_mobilenet"])
def test_init_is_a_function_of_the_key(name, no_global_rng):
    model = small_model(name)
    with no_global_rng():
        a, _ = model.init(jr.key(0))
        b, _ = model.init(jr.key(0))
        c, _ = model.init(jr.key(1))
    assert all(torch.equal(x, y) for x, y in zip(tree_leaves(a), tree_leaves(b)))
    assert any(not torch.equal(x, y) for x, y in zip(tree_leaves(a), tree_leaves(c)))


def test_building_a_lifted_model_leaves_the_global_rng(no_global_rng):
    with no_global_rng():
        create_model("lraspp_mobilenet", num_classes=4)
