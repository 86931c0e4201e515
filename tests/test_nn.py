"""Pure layers against their torch.nn counterparts (same weights, 1e-5), their inits, and grad/vmap through each."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import global_rng_unchanged
from hypothesis import given
from hypothesis import strategies as st
from strategies import image_batches, keys
from torch import nn

from functional_seg import nn as fnn
from functional_seg.core import random as jr
from functional_seg.core.tree import flatten_with_names, stack, tree_allclose, tree_leaves, tree_map, unstack

TOL = {"rtol": 1e-5, "atol": 1e-5}


def close(actual, expected, **kw):
    torch.testing.assert_close(actual, expected, **(TOL | kw))


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def perturbed(key, tree, scale=0.5):
    """Add keyed noise to every float leaf so ones/zeros inits become distinguishable."""
    leaves = tree_leaves(tree)
    noise = iter(jr.normal(k, leaf.shape) * scale for k, leaf in zip(jr.split(key, len(leaves)), leaves))
    return tree_map(lambda leaf: leaf + next(noise), tree)


def load(module: nn.Module, params: dict, state: dict | None = None) -> nn.Module:
    """Copy our trees into a torch module by name (strict: the names must be torch's own)."""
    module.load_state_dict(flatten_with_names(params) | flatten_with_names(state or {}), strict=True)
    return module


# ------------------------------------------------------------------------------------ convolutions


CONV_CASES = [  # (in, out, kernel, stride, padding, groups, dilation, bias)
    (3, 5, 3, 1, 1, 1, 1, True),
    (4, 6, 3, 2, 1, 1, 1, True),
    (4, 6, 1, 1, 0, 1, 1, False),
    (4, 4, 3, 1, 1, 4, 1, True),  # depthwise
    (4, 8, 3, 2, 1, 4, 1, False),  # depthwise, channel multiplier 2
    (4, 6, 3, 1, 2, 2, 2, True),  # grouped, dilated
]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@given(k=keys, x=image_batches(channels=None, max_side=9))
def test_conv2d_matches_torch(case, k, x):
    cin, cout, ksize, stride, padding, groups, dilation, bias = case
    x = x[:, :1].expand(-1, cin, -1, -1).contiguous() * torch.linspace(0.5, 1.5, cin).reshape(1, -1, 1, 1)
    params = fnn.init_conv2d(k, cin, cout, ksize, groups=groups, bias=bias)
    torch_conv = load(nn.Conv2d(cin, cout, ksize, stride, padding, dilation, groups, bias=bias), params)
    y = fnn.conv2d(params, x, stride=stride, padding=padding, dilation=dilation, groups=groups)
    close(y, torch_conv(x))


def test_init_conv2d_rejects_bad_groups(key):
    with pytest.raises(ValueError, match="groups"):
        fnn.init_conv2d(key, 4, 6, 3, groups=4)


@pytest.mark.parametrize("stride", [1, 2])
@given(k=keys, x=image_batches(channels=4, max_side=9))
def test_separable_conv2d_matches_depthwise_then_pointwise(stride, k, x):
    params = fnn.init_separable_conv2d(k, 4, 6, 3, bias=True)
    torch_sep = nn.Sequential(nn.Conv2d(4, 4, 3, stride, 1, groups=4), nn.Conv2d(4, 6, 1))
    torch_sep.load_state_dict({f"{i}.{n}": v for i, part in enumerate(["depthwise", "pointwise"])
                               for n, v in params[part].items()}, strict=True)
    close(fnn.separable_conv2d(params, x, stride=stride, padding=1), torch_sep(x))
    # (k*k + C_out) * C_in weights, as the docstring says
    assert params["depthwise"]["weight"].numel() + params["pointwise"]["weight"].numel() == (9 + 6) * 4
    assert "bias" not in fnn.init_separable_conv2d(k, 4, 6, 3)["depthwise"]


@pytest.mark.parametrize("kernel, stride, padding", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
@given(k=keys, x=image_batches(channels=4, max_side=6))
def test_conv_transpose2d_matches_torch(kernel, stride, padding, k, x):
    params = fnn.init_conv_transpose2d(k, 4, 3, kernel)
    torch_deconv = load(nn.ConvTranspose2d(4, 3, kernel, stride, padding), params)
    close(fnn.conv_transpose2d(params, x, stride=stride, padding=padding), torch_deconv(x))


# -------------------------------------------------------------------------------------- batch norm


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (6, 3, 7), (2, 3, 1, 1)], ids=["2d", "1d", "hw1"])
def test_batch_norm_train_matches_torch_over_three_updates(key, shape):
    c = shape[1]
    params, state = fnn.init_batch_norm(c)
    params = perturbed(key, params)
    torch_bn = load((nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(c), params, state).train()
    for step in range(3):
        x = randn(*shape, seed=step) * (step + 1) + step
        before = tree_map(torch.clone, state)
        y, new_state = fnn.batch_norm(params, state, x, train=True)
        close(y, torch_bn(x))
        assert tree_allclose(state, before)  # the input state is not mutated
        close(new_state["running_mean"], torch_bn.running_mean)
        close(new_state["running_var"], torch_bn.running_var)
        assert new_state["num_batches_tracked"].dtype == torch.int64
        assert new_state["num_batches_tracked"].item() == torch_bn.num_batches_tracked.item() == step + 1
        state = new_state
    # eval with the updated statistics
    torch_bn.eval()
    x = randn(*shape, seed=10)
    y, eval_state = fnn.batch_norm(params, state, x, train=False)
    close(y, torch_bn(x))
    assert eval_state is state


def test_batch_norm_momentum_and_eps(key):
    params, state = fnn.init_batch_norm(3)
    torch_bn = load(nn.BatchNorm2d(3, eps=1e-3, momentum=0.3), params, state)
    x = randn(2, 3, 4, 4) * 3 + 1
    y, new_state = fnn.batch_norm(params, state, x, train=True, momentum=0.3, eps=1e-3)
    close(y, torch_bn(x))
    close(new_state["running_var"], torch_bn.running_var)


def test_batch_norm_training_rejects_one_value_per_channel():
    params, state = fnn.init_batch_norm(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fnn.batch_norm(params, state, randn(1, 3, 1, 1), train=True)
    with pytest.raises(ValueError):  # torch says the same
        nn.BatchNorm2d(3).train()(randn(1, 3, 1, 1))


def test_self_attention_init_follows_multihead_attention(key):
    dim = 64
    params = fnn.init_self_attention(key, dim)
    torch_mha = nn.MultiheadAttention(dim, 4)
    assert params["in_proj"]["weight"].shape == torch_mha.in_proj_weight.shape
    bound = math.sqrt(6.0 / (dim + 3 * dim))  # xavier_uniform_ on in_proj_weight
    w = params["in_proj"]["weight"]
    assert float(w.abs().max()) <= bound
    assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert float(w.std()) == pytest.approx(float(torch_mha.in_proj_weight.detach().std()), rel=0.1)
    assert not params["in_proj"]["bias"].any() and not params["out_proj"]["bias"].any()
    assert not torch_mha.in_proj_bias.any() and not torch_mha.out_proj.bias.any()


def test_batch_norm_low_precision_keeps_float32_state(key):
    params, state = fnn.init_batch_norm(3)
    x = randn(2, 3, 4, 4).to(torch.bfloat16)
    y, new_state = fnn.batch_norm(params, state, x, train=True)
    assert y.dtype == torch.bfloat16 and new_state["running_mean"].dtype == torch.float32
    y_eval, _ = fnn.batch_norm(params, new_state, x, train=False)
    assert y_eval.dtype == torch.bfloat16


def test_norm_inits_match_torch():
    params, state = fnn.init_batch_norm(5)
    reference = nn.BatchNorm2d(5).state_dict()
    assert tree_allclose(flatten_with_names(params) | flatten_with_names(state), dict(reference))
    assert tree_allclose(flatten_with_names(fnn.init_layer_norm(5)), dict(nn.LayerNorm(5).state_dict()))


# ---------------------------------------------------------------------------- linear, layer norm


@given(k=keys, lead=st.lists(st.integers(1, 3), max_size=2))
def test_linear_matches_torch(k, lead):
    params = fnn.init_linear(k, 8, 5)
    x = randn(*lead, 8)
    close(fnn.linear(params, x), load(nn.Linear(8, 5), params)(x))
    no_bias = fnn.init_linear(k, 8, 5, bias=False)
    close(fnn.linear(no_bias, x), load(nn.Linear(8, 5, bias=False), no_bias)(x))


@given(k=keys, eps=st.sampled_from([1e-5, 1e-6]))
def test_layer_norm_matches_torch(k, eps):
    params = perturbed(k, fnn.init_layer_norm(8))
    x = randn(2, 3, 8) * 4 + 2
    close(fnn.layer_norm(params, x, eps=eps), load(nn.LayerNorm(8, eps=eps), params)(x))


# ----------------------------------------------------------------------------------- pool, resize


@given(x=image_batches(multiple=2, max_side=12))
def test_max_pool_and_unpool_match_torch(x):
    pooled, indices = fnn.max_pool2d_with_indices(x, 2)
    torch_pooled, torch_indices = nn.MaxPool2d(2, return_indices=True)(x)
    assert torch.equal(pooled, torch_pooled) and torch.equal(indices, torch_indices)
    assert indices.dtype == torch.int64
    assert torch.equal(fnn.max_pool2d(x, 2), torch_pooled)
    expected = nn.MaxUnpool2d(2)(torch_pooled, torch_indices)
    for kernel in (None, 2):  # the general scatter and the elementwise window path
        unpooled = fnn.max_unpool2d(pooled, indices, x.shape[-2:], kernel_size=kernel)
        assert torch.equal(unpooled, expected)
    # each max comes back to where it was, everything else is zero
    assert torch.equal(unpooled == x, (unpooled != 0) | (x == 0))


@given(x=image_batches(max_side=11), kernel=st.integers(2, 3))
def test_window_unpool_equals_scatter_on_any_size(x, kernel):
    """Odd sizes (the pool floors them) and 3x3 windows: both paths agree with torch, gradients too."""
    if min(x.shape[-2:]) < kernel:
        return
    pooled, indices = fnn.max_pool2d_with_indices(x, kernel)
    size = x.shape[-2:]
    expected = nn.MaxUnpool2d(kernel)(pooled, indices, output_size=size)
    assert torch.equal(fnn.max_unpool2d(pooled, indices, size, kernel_size=kernel), expected)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    grads = [torch.func.grad(lambda p, k=k: (fnn.max_unpool2d(p, indices, size, kernel_size=k) * g).sum())(pooled)
             for k in (None, kernel)]
    assert torch.equal(grads[0], grads[1])


def test_window_unpool_writes_channels_last_and_vmaps():
    """Channels-last out (what the next conv reads on CUDA) from either layout in, same values."""
    x = randn(2, 3, 8, 6).contiguous(memory_format=torch.channels_last)
    pooled, indices = fnn.max_pool2d_with_indices(x, 2)
    out = fnn.max_unpool2d(pooled, indices, (8, 6), kernel_size=2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, fnn.max_unpool2d(pooled.contiguous(), indices.contiguous(), (8, 6)))
    # NCHW in, eager, no vmap: ATen's max_unpool2d (NCHW out); traced, the windowed form (channels-last)
    from_nchw = fnn.max_unpool2d(pooled.contiguous(), indices.contiguous(), (8, 6), kernel_size=2)
    assert from_nchw.is_contiguous() and torch.equal(from_nchw, out)
    traced = torch.compile(lambda p, i: fnn.max_unpool2d(p, i, (8, 6), kernel_size=2), backend="aot_eager",
                           fullgraph=True)(pooled.contiguous(), indices.contiguous())
    assert traced.is_contiguous(memory_format=torch.channels_last) and torch.equal(traced, out)
    stacked = torch.stack([x, 2 * x]).contiguous()
    pooled_k, indices_k = torch.func.vmap(lambda t: fnn.max_pool2d_with_indices(t, 2))(stacked)
    batched = torch.func.vmap(lambda p, i: fnn.max_unpool2d(p, i, (8, 6), kernel_size=2))(pooled_k, indices_k)
    assert torch.equal(batched[1], fnn.max_unpool2d(pooled_k[1], indices_k[1], (8, 6)))
    with pytest.raises(ValueError, match="output_size"):
        fnn.max_unpool2d(pooled, indices, (6, 6), kernel_size=2)


def test_max_pool_overlapping_windows_and_odd_sizes():
    x = randn(2, 3, 9, 11)
    pooled, indices = fnn.max_pool2d_with_indices(x, 3, stride=2)
    torch_pooled, torch_indices = nn.MaxPool2d(3, 2, return_indices=True)(x)
    assert torch.equal(pooled, torch_pooled) and torch.equal(indices, torch_indices)
    expected = nn.MaxUnpool2d(3, 2)(torch_pooled, torch_indices, output_size=(9, 11))
    assert torch.equal(fnn.max_unpool2d(pooled, indices, (9, 11)), expected)


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic", "nearest-exact", "area"])
@pytest.mark.parametrize("size", [(16, 12), (3, 5)])
def test_resize_matches_interpolate(mode, size):
    x = randn(2, 3, 8, 8)
    expected = F.interpolate(x, size=size, mode=mode, **({"align_corners": False} if "bi" in mode else {}))
    close(fnn.resize(x, size, mode=mode), expected)


# -------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("num_heads", [1, 2, 4])
@given(k=keys, length=st.integers(1, 7))
def test_self_attention_matches_multihead_attention_in_eval(num_heads, k, length):
    dim = 8
    params = fnn.init_self_attention(k, dim)
    mha = nn.MultiheadAttention(dim, num_heads, batch_first=True).eval()
    mha.load_state_dict({
        "in_proj_weight": params["in_proj"]["weight"], "in_proj_bias": params["in_proj"]["bias"],
        "out_proj.weight": params["out_proj"]["weight"], "out_proj.bias": params["out_proj"]["bias"],
    }, strict=True)
    x = randn(2, length, dim)
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False)[0]
    close(fnn.self_attention(params, x, num_heads=num_heads), expected)
    # the explicit-weights path (taken in training with dropout) agrees with the fused one at rate 0+
    explicit = fnn.dot_product_attention(*(randn(2, 3, length, 4, seed=s) for s in range(3)), dropout_rate=1e-12,
                                         train=True, key=k)
    close(explicit, F.scaled_dot_product_attention(*(randn(2, 3, length, 4, seed=s) for s in range(3))))


def test_attention_dropout_needs_a_key_and_is_keyed(key):
    params = fnn.init_self_attention(key, 8)
    x = randn(2, 5, 8)
    with pytest.raises(ValueError, match="key"):
        fnn.self_attention(params, x, num_heads=2, dropout_rate=0.5, train=True)
    a, b = jr.split(key)
    y1 = fnn.self_attention(params, x, num_heads=2, dropout_rate=0.5, train=True, key=a)
    assert torch.equal(y1, fnn.self_attention(params, x, num_heads=2, dropout_rate=0.5, train=True, key=a))
    assert not torch.allclose(y1, fnn.self_attention(params, x, num_heads=2, dropout_rate=0.5, train=True, key=b))
    close(fnn.self_attention(params, x, num_heads=2, dropout_rate=0.5, train=False),
          fnn.self_attention(params, x, num_heads=2))


# ---------------------------------------------------------------------------- dropout, activations


def test_dropout(key):
    x = torch.ones(100_000)
    assert fnn.dropout(x, 0.3, train=False) is x
    assert fnn.dropout(x, 0.0, train=True) is x
    with pytest.raises(ValueError, match="key"):
        fnn.dropout(x, 0.3, train=True)
    with pytest.raises(ValueError, match="rate"):
        fnn.dropout(x, 1.0, train=True, key=key)
    y = fnn.dropout(x, 0.3, train=True, key=key)
    assert torch.equal(y, fnn.dropout(x, 0.3, train=True, key=key))  # same key, same mask
    assert not torch.equal(y, fnn.dropout(x, 0.3, train=True, key=jr.fold_in(key, 1)))
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - 0.3) < 5 * math.sqrt(0.3 * 0.7 / x.numel())
    close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))  # kept values scaled by 1/(1-p)
    assert abs(y.double().mean().item() - 1.0) < 0.01  # so the expectation is unchanged


def test_activations_are_torchs():
    x = randn(3, 4)
    for ours, theirs in [(fnn.relu, F.relu), (fnn.gelu, F.gelu), (fnn.silu, F.silu), (fnn.sigmoid, torch.sigmoid)]:
        assert torch.equal(ours(x), theirs(x))


# ------------------------------------------------------------------------------------------- init


def _bound_from_torch(weight: torch.Tensor) -> float:
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
    return 1.0 / math.sqrt(fan_in)


@pytest.mark.parametrize("name, make, torch_module", [
    ("conv", lambda k: fnn.init_conv2d(k, 64, 64, 3), lambda: nn.Conv2d(64, 64, 3)),
    ("depthwise", lambda k: fnn.init_conv2d(k, 256, 256, 5, groups=256), lambda: nn.Conv2d(256, 256, 5, groups=256)),
    ("conv_transpose", lambda k: fnn.init_conv_transpose2d(k, 64, 32, 4), lambda: nn.ConvTranspose2d(64, 32, 4)),
    ("linear", lambda k: fnn.init_linear(k, 256, 300), lambda: nn.Linear(256, 300)),
])
def test_init_follows_torch_default_scheme(key, name, make, torch_module):
    """kaiming_uniform_(a=sqrt(5)): U(-b, b) with b = 1/sqrt(fan_in), fan_in as torch computes it."""
    params = make(key)
    reference = torch_module()
    assert tree_allclose(tree_map(lambda p: p.shape, params), {n: p.shape for n, p in reference.named_parameters()})
    bound = _bound_from_torch(reference.weight)
    for n, p in params.items():
        assert p.dtype == torch.float32
        assert p.abs().max().item() <= bound, n
        if p.numel() > 1000:
            assert abs(p.std().item() / (bound / math.sqrt(3)) - 1) < 0.03, n
            assert abs(p.mean().item()) < 0.05 * bound, n


def test_init_is_a_function_of_the_key(key):
    a, b = jr.split(key)
    makers = [
        lambda k: fnn.init_conv2d(k, 3, 4, 3), lambda k: fnn.init_separable_conv2d(k, 3, 4, 3),
        lambda k: fnn.init_conv_transpose2d(k, 3, 4, 2), lambda k: fnn.init_linear(k, 3, 4),
        lambda k: fnn.init_self_attention(k, 8),
    ]
    with global_rng_unchanged():
        for make in makers:
            assert tree_allclose(make(a), make(a.clone()))
            drawn = [(x, y) for x, y in zip(tree_leaves(make(a)), tree_leaves(make(b))) if x.any() or y.any()]
            assert drawn and all(not torch.equal(x, y) for x, y in drawn)  # zero-init biases are the same
        params = fnn.init_linear(a, 3, 4)  # weight and bias come from different subkeys
        assert not torch.equal(params["weight"][0, :3], params["bias"][:3])
        fnn.init_batch_norm(4), fnn.init_layer_norm(4)
        fnn.dropout(torch.ones(10), 0.5, train=True, key=a)
        fnn.self_attention(fnn.init_self_attention(a, 8), randn(1, 3, 8), num_heads=2, dropout_rate=0.5, train=True,
                           key=b)


# --------------------------------------------------------------------------- grad and vmap, per layer

# name -> (init(key) -> params, apply(params, x) -> y, x)
LAYERS = {
    "conv2d": (lambda k: fnn.init_conv2d(k, 4, 6, 3), lambda p, x: fnn.conv2d(p, x, stride=2, padding=1),
               randn(2, 4, 8, 8)),
    "depthwise": (lambda k: fnn.init_conv2d(k, 4, 4, 3, groups=4), lambda p, x: fnn.conv2d(p, x, padding=1, groups=4),
                  randn(2, 4, 8, 8)),
    "separable": (lambda k: fnn.init_separable_conv2d(k, 4, 6, 3, bias=True),
                  lambda p, x: fnn.separable_conv2d(p, x, padding=1), randn(2, 4, 8, 8)),
    "conv_transpose2d": (lambda k: fnn.init_conv_transpose2d(k, 4, 3, 2),
                         lambda p, x: fnn.conv_transpose2d(p, x, stride=2), randn(2, 4, 5, 5)),
    "linear": (lambda k: fnn.init_linear(k, 8, 5), fnn.linear, randn(2, 3, 8)),
    "layer_norm": (lambda k: perturbed(k, fnn.init_layer_norm(8)), fnn.layer_norm, randn(2, 3, 8)),
    "batch_norm_train": (lambda k: perturbed(k, fnn.init_batch_norm(4)[0]),
                         lambda p, x: fnn.batch_norm(p, fnn.init_batch_norm(4)[1], x, train=True)[0],
                         randn(3, 4, 5, 5)),
    "batch_norm_eval": (lambda k: perturbed(k, fnn.init_batch_norm(4)[0]),
                        lambda p, x: fnn.batch_norm(p, fnn.init_batch_norm(4)[1], x, train=False)[0],
                        randn(3, 4, 5, 5)),
    "self_attention": (lambda k: fnn.init_self_attention(k, 8), lambda p, x: fnn.self_attention(p, x, num_heads=2),
                       randn(2, 5, 8)),
    "self_attention_dropout": (
        lambda k: fnn.init_self_attention(k, 8),
        lambda p, x: fnn.self_attention(p, x, num_heads=2, dropout_rate=0.2, train=True, key=jr.key(3)),
        randn(2, 5, 8)),
}

# layers without params: grad and vmap are taken over x
FUNCTIONS = {
    "max_pool2d": (lambda x: fnn.max_pool2d(x, 2), randn(2, 3, 6, 6)),
    "pool_unpool": (lambda x: fnn.max_unpool2d(*fnn.max_pool2d_with_indices(x, 2), x.shape[-2:]), randn(2, 3, 6, 6)),
    "pool_unpool_window": (lambda x: fnn.max_unpool2d(*fnn.max_pool2d_with_indices(x, 2), x.shape[-2:], 2),
                           randn(2, 3, 7, 6)),
    "resize_bilinear": (lambda x: fnn.resize(x, (9, 7)), randn(2, 3, 6, 6)),
    "resize_nearest": (lambda x: fnn.resize(x, (12, 12), mode="nearest"), randn(2, 3, 6, 6)),
    "dropout": (lambda x: fnn.dropout(x, 0.5, train=True, key=jr.key(1)), randn(2, 3, 6, 6)),
    "gelu": (fnn.gelu, randn(2, 3)),
    "relu": (fnn.relu, randn(2, 3)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_grad_through_layer_params(key, name):
    init, apply, x = LAYERS[name]
    params = init(key)
    grads = torch.func.grad(lambda p: apply(p, x).square().sum())(params)
    assert tree_allclose(tree_map(lambda g: g.shape, grads), tree_map(lambda p: p.shape, params))
    # the same gradients as autograd gives
    leaves = [p.clone().requires_grad_() for p in tree_leaves(params)]
    rebuilt = torch.utils._pytree.tree_unflatten(leaves, torch.utils._pytree.tree_structure(params))
    expected = torch.autograd.grad(apply(rebuilt, x).square().sum(), leaves)
    for g, e in zip(tree_leaves(grads), expected):
        close(g, e)
        assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("name", list(LAYERS))
def test_grad_through_layer_input(key, name):
    init, apply, x = LAYERS[name]
    gx = torch.func.grad(lambda x: apply(init(key), x).square().sum())(x)
    assert gx.shape == x.shape and torch.isfinite(gx).all() and gx.abs().sum() > 0


@pytest.mark.parametrize("name", list(LAYERS))
def test_vmap_over_stacked_params_equals_loop(key, name):
    init, apply, x = LAYERS[name]
    per_model = [init(k) for k in jr.split(key, 3)]
    stacked = stack(per_model)
    ys = torch.func.vmap(apply, in_dims=(0, None))(stacked, x)
    close(ys, torch.stack([apply(p, x) for p in per_model]))


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_grad_and_vmap_through_functions(name):
    fn, x = FUNCTIONS[name]
    gx = torch.func.grad(lambda x: fn(x).square().sum())(x)
    assert gx.shape == x.shape and torch.isfinite(gx).all() and gx.abs().sum() > 0
    xs = torch.stack([x, 2 * x + 1, -x])
    close(torch.func.vmap(fn)(xs), torch.stack([fn(xi) for xi in xs]))


def test_dropout_grad_is_the_scaled_mask(key):
    x = randn(1000)
    gx = torch.func.grad(lambda x: fnn.dropout(x, 0.25, train=True, key=key).sum())(x)
    mask = fnn.dropout(torch.ones(1000), 0.25, train=True, key=key)
    close(gx, mask)


def test_vmap_dropout_over_keys_equals_loop(key):
    x = randn(4, 6)
    ks = jr.split(key, 5)
    expected = torch.stack([fnn.dropout(x, 0.5, train=True, key=k) for k in ks])
    assert torch.equal(torch.func.vmap(lambda k: fnn.dropout(x, 0.5, train=True, key=k))(ks), expected)


@pytest.mark.parametrize("train", [True, False])
def test_vmapped_batch_norm_over_stacked_params_and_state_equals_loop(key, train):
    x = randn(4, 3, 5, 5) * 2 + 1
    models = []
    for i, k in enumerate(jr.split(key, 4)):
        params, state = fnn.init_batch_norm(3)
        state = {"running_mean": jr.normal(k, 3), "running_var": jr.uniform(k, 3, low=0.5, high=2.0),
                 "num_batches_tracked": torch.tensor(i)}
        models.append((perturbed(k, params), state))
    stacked_params, stacked_state = stack([p for p, _ in models]), stack([s for _, s in models])

    def apply(params, state, x):
        return fnn.batch_norm(params, state, x, train=train)

    ys, new_states = torch.func.vmap(apply, in_dims=(0, 0, None))(stacked_params, stacked_state, x)
    loop = [apply(p, s, x) for p, s in models]
    close(ys, torch.stack([y for y, _ in loop]))
    for got, (_, want) in zip(unstack(new_states), loop):
        assert tree_allclose(got, want, rtol=1e-5, atol=1e-5)
    if train:
        assert torch.equal(new_states["num_batches_tracked"], torch.tensor([1, 2, 3, 4]))
    # and vmap over a batch of inputs with shared params and state (e.g. per-device batches)
    xs = torch.stack([x, x * 3 - 1])
    params, state = models[0]
    ys, states = torch.func.vmap(apply, in_dims=(None, None, 0))(params, state, xs)
    for i in range(2):
        y, s = apply(params, state, xs[i])
        close(ys[i], y)
        if train:
            assert tree_allclose(unstack(states)[i], s, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ batch norm: gradients, sync hook


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_gradients_match_torch(key, train):
    """Forward and the gradients wrt input, weight and bias equal nn.BatchNorm2d's, in both modes."""
    params, state = fnn.init_batch_norm(3)
    params = perturbed(key, params)
    state = {**state, "running_mean": torch.tensor([0.5, -1.0, 2.0]), "running_var": torch.tensor([1.5, 0.5, 3.0])}
    torch_bn = load(nn.BatchNorm2d(3), params, state).train(train)
    x = randn(4, 3, 5, 6) * 2 + 1
    g = randn(4, 3, 5, 6, seed=1)
    x_ref = x.clone().requires_grad_(True)
    (torch_bn(x_ref) * g).sum().backward()

    def loss(params, x):
        y, new_state = fnn.batch_norm(params, state, x, train=train)
        return (y * g).sum(), new_state

    (grad_p, grad_x), new_state = torch.func.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    close(grad_x, x_ref.grad)
    close(grad_p["weight"], torch_bn.weight.grad)
    close(grad_p["bias"], torch_bn.bias.grad)
    close(new_state["running_mean"], torch_bn.running_mean)
    close(new_state["running_var"], torch_bn.running_var)


def test_batch_norm_train_saves_only_its_input():
    """The backward keeps one activation-sized tensor (the input), as nn.BatchNorm2d's does."""
    params, state = fnn.init_batch_norm(8)
    params = tree_map(lambda t: t.requires_grad_(True), params)
    x = randn(4, 8, 16, 16).requires_grad_(True)
    big = []

    def pack(t):
        if t.numel() >= x.numel():
            big.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fnn.batch_norm(params, state, x, train=True)
    assert len(big) == 1 and big[0] is x


def _doubling(stats):
    """Two identical ranks: the all-reduced sums and counts are twice the local ones."""
    return stats * 2


def test_batch_stats_reducer_with_identical_ranks_equals_the_plain_path(key):
    params, state = fnn.init_batch_norm(3)
    params = perturbed(key, params)
    state = {**state, "running_mean": torch.tensor([0.2, 1.5, -0.5])}
    x = randn(4, 3, 5, 6) * 3 + 2
    g = randn(4, 3, 5, 6, seed=1)

    def loss(params, x):
        y, new_state = fnn.batch_norm(params, state, x, train=True)
        return (y * g).sum(), (y, new_state)

    plain_grads, (plain_y, plain_state) = torch.func.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    calls = []

    def reducer(stats):
        calls.append(stats.shape)
        return _doubling(stats)

    with fnn.batch_stats_reducer(reducer):
        grads, (y, new_state) = torch.func.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    assert calls == [torch.Size([3, 3])]
    close(y, plain_y)
    # the state is that of the two ranks' batch in one process (the count, hence n / (n - 1), doubles)
    _, both_state = fnn.batch_norm(params, state, torch.cat([x, x]), train=True)
    assert tree_allclose(new_state, both_state, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(new_state["running_var"], plain_state["running_var"], rtol=1e-5, atol=1e-6)
    assert tree_allclose(grads, plain_grads, rtol=1e-4, atol=1e-4)
    # the count is the reduced one: the running variance's n / (n - 1) uses the 2 ranks' values
    n = 2 * 4 * 5 * 6
    with fnn.batch_stats_reducer(_doubling):
        _, s = fnn.batch_norm(params, state, x, train=True)
    var = x.var(dim=(0, 2, 3), correction=0)
    close(s["running_var"], 0.9 * state["running_var"] + 0.1 * var * n / (n - 1))
    # outside the context the fast path runs again
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert fnn.norm._REDUCER is None


def test_batch_stats_reducer_sees_the_other_rank():
    """A reducer adding a second rank's statistics normalises with the pooled mean and variance."""
    params, state = fnn.init_batch_norm(2)
    x, other = randn(3, 2, 4, 4), randn(3, 2, 4, 4, seed=5) * 2 + 1

    def pooled_stats(t):
        return fnn.norm._local_stats(other - state["running_mean"].reshape(1, -1, 1, 1)) + t

    with fnn.batch_stats_reducer(pooled_stats):
        y, s = fnn.batch_norm(params, state, x, train=True)
    both, _ = fnn.batch_norm(params, state, torch.cat([x, other]), train=True)
    close(y, both[:3], rtol=1e-4, atol=1e-4)
    close(s["running_mean"], fnn.batch_norm(params, state, torch.cat([x, other]), train=True)[1]["running_mean"])


def test_batch_stats_reducer_compiles_in_one_graph_with_grad_and_vmap(key):
    params, state = fnn.init_batch_norm(3)
    params = perturbed(key, params)
    x = randn(4, 3, 5, 6) * 2 + 1

    def step(params, x):
        def loss(p):
            y, new_state = fnn.batch_norm(p, state, x, train=True)
            return y.square().mean(), new_state
        return torch.func.grad(loss, has_aux=True)(params)

    eager_grads, _ = step(params, x)
    with fnn.batch_stats_reducer(_doubling):
        eager_state = step(params, x)[1]
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        grads, new_state = compiled(params, x)
        vgrads, _ = torch.func.vmap(step, in_dims=(None, 0))(params, torch.stack([x, x]))
    assert tree_allclose(grads, eager_grads, rtol=1e-4, atol=1e-4)
    assert tree_allclose(new_state, eager_state, rtol=1e-5, atol=1e-5)
    assert tree_allclose(unstack(vgrads)[1], eager_grads, rtol=1e-4, atol=1e-4)
