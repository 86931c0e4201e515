"""U-Net (Ronneberger et al., 2015) with batch norm, as pure functions.

Widths double at every level: w_l = base_width * 2**l for l = 0..depth. The encoder is a double
conv (3x3 conv -> BN -> ReLU, twice; bias-free) at level 0, then ``depth`` times 2x2 max-pool and
a double conv to the next width. Each decoder step upsamples by 2, concatenates the skip from the
same level ([upsampled, skip] along channels) and applies a double conv to w_{l-1}:

- ``upsample="transposed"`` (the paper's "up-convolution"): a 2x2 stride-2 transposed conv
  w_l -> w_{l-1} (with bias), so the double conv sees 2 * w_{l-1} channels;
- ``upsample="bilinear"``: parameter-free bilinear x2 (align_corners=False), so the double conv
  sees w_l + w_{l-1} channels.

A 1x1 conv (with bias) maps w_0 to ``num_classes``. x [N, C_in, H, W] with H, W divisible by
2**depth -> logits [N, num_classes, H, W].

Param trees: ``encoder.{l}.{0|1}.conv`` / ``.bn``, ``decoder.{i}.up`` (transposed only),
``decoder.{i}.convs.{0|1}.conv`` / ``.bn`` (i = 0 is the deepest step), ``head``.

With ``encoder=<timm name or torchvision:name>`` the model is instead SMP's U-Net over a pretrained-ready
encoder (``models.encoders``; ``encoder_weights`` says where its weights come from): the encoder's first
D = len(decoder_channels) stages give features f_1..f_D (reductions r_1 < ... < r_D). Decoder block i
(i = 0..D-1) resizes x (starting at f_D) by nearest neighbour to the next finer size (f_{D-1}, ..., f_1,
then the input's), concatenates the skip at that size (none at the input size) and applies two
3x3 conv -> BN -> ReLU to ``decoder_channels[i]``; a 3x3 conv (with bias) maps to ``num_classes``. Trees:
``encoder.*`` (the backbone's names), ``decoder.blocks.{i}.conv{1|2}.conv`` / ``.bn``, ``head``; stride
r_D. ``base_width``, ``depth`` and ``upsample`` belong to the classic U-Net and must stay at their
defaults then; ``encoder=None`` is exactly the classic U-Net (same trees and numbers as before these
fields existed, so old checkpoints load).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import random as jr
from ..nn import conv2d, conv_transpose2d, init_conv2d, init_conv_transpose2d, max_pool2d, resize
from .base import POSITIVE_INT, POSITIVE_INTS, Model, Rule, build_cfg, cfg_error, one_of, register_model, validate_cfg
from .encoder_decoder import ENCODER, ENCODER_WEIGHTS, encoder_decoder_model
from .encoders import EncoderError, create_encoder
from .segnet import conv_bn_relu, init_conv_bn

__all__ = ["UNetCfg", "unet"]

_UPSAMPLE = ("transposed", "bilinear")


@dataclass(frozen=True)
class UNetCfg:
    """Static hyperparameters of U-Net: ``base_width`` (w_0), ``depth`` (number of poolings),
    ``upsample`` ("transposed" or "bilinear") for the classic U-Net; ``encoder``, ``encoder_weights``
    and ``decoder_channels`` (one per encoder stage used, deepest first) for SMP's U-Net over an encoder."""

    num_classes: int = 3
    in_channels: int = 3
    base_width: int = 64
    depth: int = 4
    upsample: str = "transposed"
    encoder: str | None = None
    encoder_weights: str | None = None
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)

    def __post_init__(self):
        validate_cfg(self, "unet", _RULES)
        defaults = UNetCfg.__dataclass_fields__
        if self.encoder is None:
            for name in ("encoder_weights", "decoder_channels"):
                if getattr(self, name) != defaults[name].default:
                    raise cfg_error("unet", name, getattr(self, name), "left at its default without an encoder "
                                    "(encoder=None is the classic U-Net)")
        else:
            for name in ("base_width", "depth", "upsample"):
                if getattr(self, name) != defaults[name].default:
                    raise cfg_error("unet", name, getattr(self, name), "left at its default with an encoder "
                                    "(it belongs to the classic U-Net; the encoder U-Net has decoder_channels)")


_RULES = {"num_classes": POSITIVE_INT, "in_channels": POSITIVE_INT, "base_width": POSITIVE_INT,
          "depth": POSITIVE_INT, "upsample": one_of(*_UPSAMPLE),
          "encoder": Rule(f"None or {ENCODER.expected}", lambda v: v is None or ENCODER.check(v)),
          "encoder_weights": ENCODER_WEIGHTS, "decoder_channels": POSITIVE_INTS}


def _init_double_conv(key: torch.Tensor, c_in: int, c_out: int) -> tuple[dict, dict]:
    k0, k1 = jr.split(key)
    p0, s0 = init_conv_bn(k0, c_in, c_out)
    p1, s1 = init_conv_bn(k1, c_out, c_out)
    return {"0": p0, "1": p1}, {"0": s0, "1": s1}


def _double_conv(params: dict, state: dict, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, dict]:
    x, s0 = conv_bn_relu(params["0"], state["0"], x, train=train)
    x, s1 = conv_bn_relu(params["1"], state["1"], x, train=train)
    return x, {"0": s0, "1": s1}


def _init(cfg: UNetCfg, key: torch.Tensor) -> tuple[dict, dict]:
    widths = [cfg.base_width * 2**level for level in range(cfg.depth + 1)]
    enc_key, dec_key, head_key = jr.split(key, 3)
    params: dict = {"encoder": {}, "decoder": {}}
    state: dict = {"encoder": {}, "decoder": {}}
    for level, c_out in enumerate(widths):
        c_in = cfg.in_channels if level == 0 else widths[level - 1]
        params["encoder"][str(level)], state["encoder"][str(level)] = _init_double_conv(
            jr.fold_in(enc_key, level), c_in, c_out)
    for i, level in enumerate(range(cfg.depth, 0, -1)):
        up_key, conv_key = jr.split(jr.fold_in(dec_key, i))
        c_deep, c_skip = widths[level], widths[level - 1]
        p: dict = {}
        if cfg.upsample == "transposed":
            p["up"] = init_conv_transpose2d(up_key, c_deep, c_skip, 2)
            c_cat = 2 * c_skip
        else:
            c_cat = c_deep + c_skip
        p["convs"], s = _init_double_conv(conv_key, c_cat, c_skip)
        params["decoder"][str(i)], state["decoder"][str(i)] = p, {"convs": s}
    params["head"] = init_conv2d(head_key, widths[0], cfg.num_classes, 1)
    return params, state


def _apply(cfg: UNetCfg, params: dict, state: dict, x: torch.Tensor, train: bool, key: torch.Tensor | None
           ) -> tuple[torch.Tensor, dict]:
    del key  # no randomness in U-Net
    new_state: dict = {"encoder": {}, "decoder": {}}
    skips = []
    for level in range(cfg.depth + 1):
        if level > 0:
            x = max_pool2d(x, 2)
        x, new_state["encoder"][str(level)] = _double_conv(
            params["encoder"][str(level)], state["encoder"][str(level)], x, train)
        skips.append(x)
    skips.pop()  # the bottleneck output is x itself
    for i in range(cfg.depth):
        p = params["decoder"][str(i)]
        skip = skips.pop()
        if cfg.upsample == "transposed":
            x = conv_transpose2d(p["up"], x, stride=2)
        else:
            x = resize(x, (skip.shape[-2], skip.shape[-1]), mode="bilinear")
        x, s = _double_conv(p["convs"], state["decoder"][str(i)]["convs"], torch.cat([x, skip], dim=1), train)
        new_state["decoder"][str(i)] = {"convs": s}
    return conv2d(params["head"], x), (new_state if train else state)


# ----------------------------------------------------------------------------------------------
# SMP's U-Net decoder over an encoder


def _init_smp_decoder(cfg: UNetCfg, key: torch.Tensor, encoder) -> tuple[dict, dict]:
    deep_first = encoder.channels[::-1]
    c_in = [deep_first[0], *cfg.decoder_channels[:-1]]
    c_skip = [*deep_first[1:], 0]
    blocks_p: dict = {}
    blocks_s: dict = {}
    block_key, head_key = jr.split(key)
    for i, (ci, cs, co) in enumerate(zip(c_in, c_skip, cfg.decoder_channels)):
        k1, k2 = jr.split(jr.fold_in(block_key, i))
        p1, s1 = init_conv_bn(k1, ci + cs, co)
        p2, s2 = init_conv_bn(k2, co, co)
        blocks_p[str(i)], blocks_s[str(i)] = {"conv1": p1, "conv2": p2}, {"conv1": s1, "conv2": s2}
    head = init_conv2d(head_key, cfg.decoder_channels[-1], cfg.num_classes, 3)
    return {"decoder": {"blocks": blocks_p}, "head": head}, {"decoder": {"blocks": blocks_s}}


def _apply_smp_decoder(cfg: UNetCfg, params: dict, state: dict, features: list, size, train: bool, key
                       ) -> tuple[torch.Tensor, dict]:
    del key  # no randomness
    sizes = [tuple(f.shape[-2:]) for f in features[-2::-1]] + [tuple(size)]  # the finer sizes, deep to shallow
    skips = features[-2::-1]
    x = features[-1]
    new_blocks: dict = {}
    for i in range(len(cfg.decoder_channels)):
        p, s = params["decoder"]["blocks"][str(i)], state["decoder"]["blocks"][str(i)]
        x = resize(x, sizes[i], mode="nearest")
        if i < len(skips):
            x = torch.cat([x, skips[i]], dim=1)
        x, s1 = conv_bn_relu(p["conv1"], s["conv1"], x, train=train)
        x, s2 = conv_bn_relu(p["conv2"], s["conv2"], x, train=train)
        new_blocks[str(i)] = {"conv1": s1, "conv2": s2}
    return conv2d(params["head"], x, padding=1), {"decoder": {"blocks": new_blocks}}


@register_model("unet", check=lambda cfg: build_cfg(UNetCfg, cfg, name="unet"))
def unet(**cfg) -> Model:
    """U-Net. Default: base width 64, depth 4, transposed-conv upsampling (31.0 M parameters).
    With ``encoder=...``: SMP's U-Net decoder over that encoder (see the module doc)."""
    cfg = build_cfg(UNetCfg, cfg, name="unet")
    if cfg.encoder is None:
        return Model(name="unet", cfg=cfg, init_fn=_init, apply_fn=_apply, stride=2**cfg.depth,
                     in_channels=cfg.in_channels)
    try:
        encoder = create_encoder(cfg.encoder, in_channels=cfg.in_channels, depth=len(cfg.decoder_channels))
    except EncoderError as err:
        raise ValueError(f"unet: {err}") from None
    return encoder_decoder_model("unet", cfg, encoder, _init_smp_decoder, _apply_smp_decoder)
