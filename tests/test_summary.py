"""The model summary: totals against torchinfo on the reference modules, layer by layer; against
torch's FlopCounterMode; the series' published figures; hand-worked totals; rows, table and JSON
totals; the memory estimate that refuses a model too big to allocate, before allocating it."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torchinfo
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.reference_modules import SeparableConv2d, build_reference
from functional_seg import summary as summary_mod
from functional_seg.core import random as jr
from functional_seg.core.tree import flatten_with_names, tree_size
from functional_seg.models import create_model, from_module, list_models
from functional_seg.summary import available_memory, check_fits, format_summary, summarize

SMALL = {
    "segnet": dict(widths=(8, 16, 16, 32)),
    "unet": dict(base_width=8, depth=2),
    "vit": dict(image_size=32, patch_size=8, dim=32, depth=2, num_heads=4, mlp_dim=64),
}


def _dotted(layer) -> str:
    names = []
    while layer.parent_info is not None:
        names.append(layer.var_name)
        layer = layer.parent_info
    return ".".join(reversed(names))


@pytest.mark.parametrize("name, cfg, size", [
    ("segnet", {}, 128),
    ("segnet_dsc", {}, 128),
    ("unet", {}, 64),
    ("unet", {"upsample": "bilinear"}, 64),
])
def test_totals_equal_torchinfo_on_reference_modules(name, cfg, size):
    """Default widths. Parameters: equal. Mult-adds, layer by layer, with torchinfo's conventions
    spelled out: a bias-free conv is equal; a biased conv adds bias x output pixels; a 2x2 stride-2
    transposed conv counts its weights at all 4x as many output pixels; batch norm adds N x params."""
    model = create_model(name, **cfg)
    ours = summarize(model, size, batch_size=2, device="meta")  # shapes only: same ops, same figures
    info = torchinfo.summary(build_reference(name, model.cfg), input_size=(2, 3, size, size), verbose=0)
    assert ours.total_params == info.total_params == info.trainable_params
    assert ours.trainable_params == ours.total_params

    rows = {r.name: r for r in ours.rows}
    batch_norm_macs = 0
    checked = 0
    for layer in info.summary_list:
        if not layer.is_leaf_layer or layer.num_params == 0:
            continue
        row = rows[_dotted(layer)]
        assert row.params == layer.num_params
        assert list(row.output_shape) == layer.output_size
        pixels = 2 * layer.output_size[2] * layer.output_size[3]
        module = layer.module
        bias = module.bias.numel() if getattr(module, "bias", None) is not None else 0
        if isinstance(module, nn.BatchNorm2d):
            assert (row.mult_adds, layer.macs) == (0, 2 * layer.num_params)
            batch_norm_macs += layer.macs
        elif isinstance(module, nn.ConvTranspose2d):
            assert layer.macs == 4 * row.mult_adds + bias * pixels
        elif isinstance(module, nn.Conv2d):
            assert layer.macs == row.mult_adds + bias * pixels
        else:
            raise AssertionError(f"unexpected layer {type(module).__name__}")
        checked += 1
    assert checked == len([r for r in ours.rows if r.params])
    if name.startswith("segnet"):  # bias-free convs only: the totals differ by the batch norms alone
        assert ours.total_mult_adds == info.total_mult_adds - batch_norm_macs


@pytest.mark.parametrize("name", ["segnet", "unet", "lraspp_mobilenet"])
def test_mult_adds_equal_flop_counter_mode(name):
    """Without attention our total is FlopCounterMode's flops / 2 (it misses CPU flash attention)."""
    model = create_model(name, **SMALL.get(name, {}))
    ours = summarize(model, 64, batch_size=2)
    params, state = model.init(jr.key(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.apply(params, state, torch.zeros(2, 3, 64, 64), train=False)
    assert ours.total_mult_adds == counter.get_total_flops() // 2
    assert ours.total_params == tree_size(params)


def test_series_reference_point_regular_vs_separable_conv():
    """SERIES.md, Part 3: 16 -> 32 channels, 3x3, 128x128."""
    conv = from_module(nn.Conv2d(16, 32, 3, padding=1, bias=False), name="conv", in_channels=16)
    dsc = from_module(SeparableConv2d(16, 32, 3), name="dsc", in_channels=16, num_classes=32)
    s_conv, s_dsc = summarize(conv, 128), summarize(dsc, 128)
    assert (s_conv.total_params, s_conv.total_mult_adds) == (4_608, 75_497_472)
    assert (s_dsc.total_params, s_dsc.total_mult_adds) == (656, 10_747_904)


def test_segnet_versus_depthwise_separable_at_default_widths():
    """SERIES.md: about 9.1 G vs 1.1 G conv mult-adds per 128x128 image."""
    segnet = summarize(create_model("segnet"), 128, device="meta")
    dsc = summarize(create_model("segnet_dsc"), 128, device="meta")
    assert (segnet.total_params, dsc.total_params) == (15_274_892, 1_749_671)
    assert (segnet.total_mult_adds, dsc.total_mult_adds) == (9_116_319_744, 1_077_657_600)
    assert round(segnet.total_params / dsc.total_params, 2) == 8.73
    assert round(segnet.total_mult_adds / dsc.total_mult_adds, 2) == 8.46


def _meta_param_count(model) -> int:
    with torch.device("meta"):
        params, _ = model.init(jr.key(0, device="meta"))
    return tree_size(params)


def test_rows_add_up_and_attention_products_are_grouped():
    s = summarize(create_model("vit", **SMALL["vit"]), 32, batch_size=2)
    # input_bn 6, patch_embed 192*32+32, pos_embed 16*32, 2 blocks of (2 norms 2*64, in_proj 32*96+96,
    # out_proj 32*32+32, fc1 32*64+64, fc2 64*32+32), head 32*192+192
    assert sum(r.params for r in s.rows) == s.total_params == 6 + 6176 + 512 + 2 * 8544 + 6336 == 30_118
    # per image, L = 16 tokens: patch_embed L*192*32, per block in_proj L*32*96 + q k^T and (.) v 2*L*L*32
    # + out_proj L*32*32 + fc1 L*32*64 + fc2 L*64*32, head L*32*192; batch 2
    per_block = 16 * (32 * 96 + 2 * 16 * 32 + 32 * 32 + 32 * 64 + 64 * 32)
    assert s.total_mult_adds == 2 * (16 * 192 * 32 + 2 * per_block + 16 * 32 * 192) == 983_040
    rows = {r.name: r for r in s.rows}
    # q k^T and (.) v: 2 * N * heads * L * L * head_dim mult-adds, no parameters
    assert rows["blocks.0.attn"].params == 0
    assert rows["blocks.0.attn"].mult_adds == 2 * 2 * 4 * 16 * 16 * 8
    assert rows["blocks.0.attn.in_proj"].output_shape == (2, 16, 96)  # [N, L, 3 dim], not the flat matmul
    assert rows["pos_embed"].params == 16 * 32
    assert [r.name for r in s.rows][:3] == ["input_bn", "patch_embed", "pos_embed"]


def test_every_registered_model_summarises():
    for name in list_models():
        model = create_model(name, **SMALL.get(name, {}))
        size = 32 if name in ("vit", "unet") else 64
        s = summarize(model, size, device="meta")
        assert s.total_params == sum(r.params for r in s.rows) == _meta_param_count(model) > 0
        assert s.total_mult_adds == sum(r.mult_adds for r in s.rows) > 0


def test_lifted_rows_use_torchvision_names():
    model = create_model("lraspp_mobilenet")
    s = summarize(model, 64)
    params, _ = model.init(jr.key(0))
    assert s.total_params == tree_size(params)
    assert {r.name.split(".")[0] for r in s.rows} == {"backbone", "classifier"}
    assert s.rows[0].name == "backbone.0.0" and s.rows[0].output_shape == (1, 16, 32, 32)
    assert set(flatten_with_names(params)) >= {f"{r.name}.weight" for r in s.rows if r.params}


def test_table_and_json_totals():
    s = summarize(create_model("segnet", **SMALL["segnet"]), 64, batch_size=2)
    table = format_summary(s)
    assert "encoder.0.0.conv" in table and "[2, 8, 64, 64]" in table
    assert f"Total params: {s.total_params:,}" in table
    totals = json.loads(json.dumps(s.totals()))
    # (C_in, C_out, side) of every 3x3 conv of SegNet widths (8, 16, 16, 32), convs (2, 2, 3, 3), 64 px
    convs = [(3, 8, 64), (8, 8, 64), (8, 16, 32), (16, 16, 32), (16, 16, 16), (16, 16, 16), (16, 16, 16),
             (16, 32, 8), (32, 32, 8), (32, 32, 8),                                    # encoder
             (32, 32, 8), (32, 32, 8), (32, 16, 8), (16, 16, 16), (16, 16, 16), (16, 16, 16),
             (16, 16, 32), (16, 8, 32), (8, 8, 64), (8, 3, 64)]                        # decoder
    bn_channels = [3] + [c_out for _, c_out, _ in convs]
    params = sum(9 * c_in * c_out for c_in, c_out, _ in convs) + 2 * sum(bn_channels)
    assert totals["total_params"] == totals["trainable_params"] == params == 69_116
    assert totals["total_mult_adds"] == 2 * sum(9 * c_in * c_out * side**2 for c_in, c_out, side in convs) == 40_108_032
    assert totals["input_shape"] == [2, 3, 64, 64]
    assert totals["input_bytes"] == 2 * 3 * 64 * 64 * 4
    assert totals["param_bytes"] == 4 * 69_116
    assert totals["state_bytes"] == 8 * sum(bn_channels) + 8 * len(bn_channels)  # mean, var; int64 count
    assert totals["non_trainable_params"] == 0
    assert totals["total_bytes"] == sum(totals[k] for k in ("param_bytes", "state_bytes", "activation_bytes",
                                                             "input_bytes"))


def test_size_not_divisible_by_stride_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible"):
        summarize(create_model("segnet", **SMALL["segnet"]), 60)


@pytest.mark.parametrize("name", ["segnet", "vit"])
def test_meta_device_gives_the_same_figures(name):
    model = create_model(name, **SMALL[name])
    size = 32 if name == "vit" else 64
    assert summarize(model, size, 2, device="meta") == summarize(model, size, 2, device="cpu")


# ----------------------------------------------------------------------------------------------
# The memory estimate


def test_a_model_too_big_for_memory_is_refused_before_allocating():
    """widths=100000 would need terabytes: one line naming the estimate, in seconds, nothing allocated."""
    model = create_model("segnet", widths=(100_000,) * 4)
    n = _meta_param_count(model)
    start = time.monotonic()
    with pytest.raises(ValueError) as info:
        summarize(model, 128)
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert "\n" not in message and message.startswith("segnet: input [1, 3, 128, 128] needs an estimated ")
    assert f"({n:,} parameters, {4 * n / 1e9:,.1f} GB;" in message and "GB is available" in message
    assert summarize(model, 128, device="meta").total_params == n  # shapes only: no limit


def test_check_fits_against_the_available_memory(monkeypatch):
    s = summarize(create_model("segnet", **SMALL["segnet"]), 64, device="meta")
    total = s.totals()["total_bytes"]
    monkeypatch.setattr(summary_mod, "available_memory", lambda device="cpu": total)
    check_fits(s, "cpu")
    summarize(create_model("segnet", **SMALL["segnet"]), 64)  # runs on the CPU
    monkeypatch.setattr(summary_mod, "available_memory", lambda device="cpu": total - 1)
    with pytest.raises(ValueError, match=r"needs an estimated .* but only .* is available"):
        check_fits(s, "cpu")
    with pytest.raises(ValueError, match="is available"):
        summarize(create_model("segnet", **SMALL["segnet"]), 64)


def test_available_memory():
    cpu = available_memory("cpu")
    assert isinstance(cpu, int) and cpu > 0
    assert available_memory("meta") is None
