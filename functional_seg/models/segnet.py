"""SegNet and its depthwise-separable variant, the CNNs of "Efficient Image Segmentation Using
PyTorch", Parts 2 and 3.

x [N, C_in, H, W] goes through an input BatchNorm, an encoder of VGG-style stages (each a run of
3x3 conv -> BN -> ReLU, then a 2x2 max-pool that keeps its indices), and a mirrored decoder (each
stage a 2x2 max-unpool with the matching indices, then conv -> BN -> ReLU; the convs keep C_in
until the last, which maps to the next width). The decoder's last conv maps to ``num_classes``
and, as in the series, is followed by BN and ReLU (``final_relu=False`` drops that ReLU). Logits
come back [N, num_classes, H, W]; H and W must be divisible by 2**len(widths).

Param trees read like torch's: ``input_bn``, ``encoder.{stage}.{conv}.conv`` / ``.bn``,
``decoder.{stage}.{conv}.conv`` / ``.bn``. With ``separable=True`` each ``conv`` holds
``depthwise`` (3x3, groups = C_in) and ``pointwise`` (1x1), both without bias (Part 3).

Defaults reproduce the series: ``segnet`` 15,274,892 parameters, ``segnet_dsc`` 1,749,671.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import random as jr
from ..nn import (
    batch_norm,
    conv2d,
    init_batch_norm,
    init_conv2d,
    init_separable_conv2d,
    max_pool2d_with_indices,
    max_unpool2d,
    relu,
    separable_conv2d,
)
from .base import (
    FLAG,
    POSITIVE_INT,
    POSITIVE_INTS,
    POSITIVE_ODD_INT,
    Model,
    build_cfg,
    cfg_error,
    register_model,
    validate_cfg,
)

__all__ = ["SegNetCfg", "segnet", "segnet_dsc", "init_conv_bn", "conv_bn_relu"]


@dataclass(frozen=True)
class SegNetCfg:
    """Static hyperparameters of SegNet.

    widths: channels of the encoder stages (the decoder mirrors them back to ``num_classes``).
    convs_per_stage: conv -> BN -> ReLU units per encoder stage (decoder stages mirror them).
    kernel_size: odd; padding keeps the size (k // 2).
    separable: depthwise-separable convs (``segnet_dsc``).
    input_bn: a BatchNorm over the input channels first (as the series does).
    final_relu: a ReLU on the logits after the last BN (as the series does).
    """

    num_classes: int = 3
    in_channels: int = 3
    widths: tuple[int, ...] = (64, 128, 256, 512)
    convs_per_stage: tuple[int, ...] = (2, 2, 3, 3)
    kernel_size: int = 3
    separable: bool = False
    input_bn: bool = True
    final_relu: bool = True

    def __post_init__(self):
        model = "segnet_dsc" if self.separable is True else "segnet"
        validate_cfg(self, model, _RULES)
        if len(self.convs_per_stage) != len(self.widths):
            raise cfg_error(model, "convs_per_stage", self.convs_per_stage,
                            f"of length {len(self.widths)} (one entry per stage of widths {self.widths})")


_RULES = {
    "num_classes": POSITIVE_INT, "in_channels": POSITIVE_INT, "widths": POSITIVE_INTS,
    "convs_per_stage": POSITIVE_INTS, "kernel_size": POSITIVE_ODD_INT,
    "separable": FLAG, "input_bn": FLAG, "final_relu": FLAG,
}


# ----------------------------------------------------------------------------------------------
# conv -> BN -> ReLU, shared with U-Net


def init_conv_bn(key: torch.Tensor, in_channels: int, out_channels: int, kernel_size: int = 3, *,
                 separable: bool = False) -> tuple[dict, dict]:
    """A bias-free conv (or depthwise-separable pair) and a BatchNorm: ``({"conv", "bn"}, {"bn"})``."""
    if separable:
        conv = init_separable_conv2d(key, in_channels, out_channels, kernel_size, bias=False)
    else:
        conv = init_conv2d(key, in_channels, out_channels, kernel_size, bias=False)
    bn_params, bn_state = init_batch_norm(out_channels)
    return {"conv": conv, "bn": bn_params}, {"bn": bn_state}


def conv_bn_relu(params: dict, state: dict, x: torch.Tensor, *, train: bool, activation: bool = True
                 ) -> tuple[torch.Tensor, dict]:
    """x [N, C_in, H, W] -> ([N, C_out, H, W], new state); 'same' padding for the odd kernel."""
    conv = params["conv"]
    if "depthwise" in conv:
        x = separable_conv2d(conv, x, padding=conv["depthwise"]["weight"].shape[-1] // 2)
    else:
        x = conv2d(conv, x, padding=conv["weight"].shape[-1] // 2)
    x, bn_state = batch_norm(params["bn"], state["bn"], x, train=train)
    return (relu(x) if activation else x), {"bn": bn_state}


# ----------------------------------------------------------------------------------------------
# SegNet


def _stage_channels(cfg: SegNetCfg) -> tuple[list[list[tuple[int, int]]], list[list[tuple[int, int]]]]:
    """(C_in, C_out) of every conv: encoder stages first to last, decoder stages deepest first."""
    ins = (cfg.in_channels, *cfg.widths[:-1])
    encoder = [[(c_in if j == 0 else c_out, c_out) for j in range(n)]
               for c_in, c_out, n in zip(ins, cfg.widths, cfg.convs_per_stage)]
    outs = (*reversed(cfg.widths[:-1]), cfg.num_classes)
    decoder = [[(c_in, c_in if j < n - 1 else c_out) for j in range(n)]
               for c_in, c_out, n in zip(reversed(cfg.widths), outs, reversed(cfg.convs_per_stage))]
    return encoder, decoder


def _init(cfg: SegNetCfg, key: torch.Tensor) -> tuple[dict, dict]:
    encoder_chans, decoder_chans = _stage_channels(cfg)
    params: dict = {}
    state: dict = {}
    if cfg.input_bn:
        params["input_bn"], state["input_bn"] = init_batch_norm(cfg.in_channels)
    enc_key, dec_key = jr.split(key)
    for part, chans, part_key in (("encoder", encoder_chans, enc_key), ("decoder", decoder_chans, dec_key)):
        params[part], state[part] = {}, {}
        for i, stage in enumerate(chans):
            stage_key = jr.fold_in(part_key, i)
            stage_params, stage_state = {}, {}
            for j, (c_in, c_out) in enumerate(stage):
                stage_params[str(j)], stage_state[str(j)] = init_conv_bn(
                    jr.fold_in(stage_key, j), c_in, c_out, cfg.kernel_size, separable=cfg.separable)
            params[part][str(i)], state[part][str(i)] = stage_params, stage_state
    return params, state


def _apply(cfg: SegNetCfg, params: dict, state: dict, x: torch.Tensor, train: bool, key: torch.Tensor | None
           ) -> tuple[torch.Tensor, dict]:
    del key  # no randomness in SegNet
    new_state: dict = {}  # same key order as init's, so the trees' structures match
    if cfg.input_bn:
        x, new_state["input_bn"] = batch_norm(params["input_bn"], state["input_bn"], x, train=train)
    new_state["encoder"], new_state["decoder"] = {}, {}
    pooled: list[tuple[torch.Tensor, tuple[int, int]]] = []
    for i, n in enumerate(cfg.convs_per_stage):
        stage_state = {}
        for j in range(n):
            p, s = params["encoder"][str(i)][str(j)], state["encoder"][str(i)][str(j)]
            x, stage_state[str(j)] = conv_bn_relu(p, s, x, train=train)
        new_state["encoder"][str(i)] = stage_state
        size = (x.shape[-2], x.shape[-1])
        x, indices = max_pool2d_with_indices(x, 2)
        pooled.append((indices, size))
    last_stage = len(cfg.widths) - 1
    for i, n in enumerate(reversed(cfg.convs_per_stage)):
        indices, size = pooled.pop()
        x = max_unpool2d(x, indices, size, kernel_size=2)
        stage_state = {}
        for j in range(n):
            p, s = params["decoder"][str(i)][str(j)], state["decoder"][str(i)][str(j)]
            last = i == last_stage and j == n - 1
            x, stage_state[str(j)] = conv_bn_relu(p, s, x, train=train, activation=cfg.final_relu or not last)
        new_state["decoder"][str(i)] = stage_state
    return x, (new_state if train else state)


def _check(overrides: dict, *, separable: bool, name: str) -> SegNetCfg:
    if overrides.get("separable", separable) != separable:  # the registry name says it
        raise ValueError(f"{name}: separable is fixed by the model name (segnet or segnet_dsc), got "
                         f"separable={overrides['separable']!r}")
    return build_cfg(SegNetCfg, {"separable": separable, **overrides}, name=name)


def _build(overrides: dict, *, separable: bool, name: str) -> Model:
    cfg = _check(overrides, separable=separable, name=name)
    return Model(name=name, cfg=cfg, init_fn=_init, apply_fn=_apply, stride=2 ** len(cfg.widths),
                 in_channels=cfg.in_channels)


@register_model("segnet", check=lambda cfg: _check(cfg, separable=False, name="segnet"))
def segnet(**cfg) -> Model:
    """SegNet (Part 2). Default: widths (64, 128, 256, 512), 15,274,892 parameters, stride 16."""
    return _build(cfg, separable=False, name="segnet")


@register_model("segnet_dsc", check=lambda cfg: _check(cfg, separable=True, name="segnet_dsc"))
def segnet_dsc(**cfg) -> Model:
    """SegNet with depthwise-separable convs (Part 3). Default: 1,749,671 parameters, stride 16."""
    return _build(cfg, separable=True, name="segnet_dsc")
