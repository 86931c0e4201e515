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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import random as jr
from ..nn import conv2d, conv_transpose2d, init_conv2d, init_conv_transpose2d, max_pool2d, resize
from .base import POSITIVE_INT, Model, build_cfg, one_of, register_model, validate_cfg
from .segnet import conv_bn_relu, init_conv_bn

__all__ = ["UNetCfg", "unet"]

_UPSAMPLE = ("transposed", "bilinear")


@dataclass(frozen=True)
class UNetCfg:
    """Static hyperparameters of U-Net: ``base_width`` (w_0), ``depth`` (number of poolings),
    ``upsample`` ("transposed" or "bilinear")."""

    num_classes: int = 3
    in_channels: int = 3
    base_width: int = 64
    depth: int = 4
    upsample: str = "transposed"

    def __post_init__(self):
        validate_cfg(self, "unet", _RULES)


_RULES = {"num_classes": POSITIVE_INT, "in_channels": POSITIVE_INT, "base_width": POSITIVE_INT,
          "depth": POSITIVE_INT, "upsample": one_of(*_UPSAMPLE)}


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


@register_model("unet", check=lambda cfg: build_cfg(UNetCfg, cfg, name="unet"))
def unet(**cfg) -> Model:
    """U-Net. Default: base width 64, depth 4, transposed-conv upsampling (31.0 M parameters)."""
    cfg = build_cfg(UNetCfg, cfg, name="unet")
    return Model(name="unet", cfg=cfg, init_fn=_init, apply_fn=_apply, stride=2**cfg.depth,
                 in_channels=cfg.in_channels)
