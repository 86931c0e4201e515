"""DeepLabV3+ (Chen et al., 2018) over any encoder, as SMP builds it.

The encoder runs at ``output_stride`` (16 by default: its last stride becomes a dilation), giving
features f_1..f_D; f_D feeds an ASPP and f_2 (reduction 4 for the usual backbones) is the high-res skip:

    ASPP(f_D):  [conv1x1, sep3x3 dilated r_1, sep3x3 r_2, sep3x3 r_3, global-pool -> conv1x1 -> resize]
                each -> BN -> ReLU to ``decoder_channels``; concat -> conv1x1 -> BN -> ReLU -> dropout
                (elementwise, rate ``aspp_dropout``, drawn from the key); sep3x3 -> BN -> ReLU
    up     = bilinear_resize(ASPP, size(f_2))                          align_corners=True
    high   = conv1x1(f_2) -> BN -> ReLU                                48 channels (the paper's)
    x      = sep3x3(concat[up, high]) -> BN -> ReLU                    decoder_channels
    logits = bilinear_resize(conv1x1(x), input size)                   align_corners=True

sep3x3 is a depthwise 3x3 (dilated in the ASPP) and a pointwise 1x1, both bias-free ("aspp_separable";
False gives plain dilated 3x3 convs in the ASPP). The pooling branch resizes with align_corners=False,
as SMP. x [N, C_in, H, W], H and W divisible by the output stride -> logits [N, num_classes, H, W].
Trees: ``encoder.*``, ``decoder.aspp.convs.{0..4}.conv`` / ``.bn``, ``decoder.aspp.project``,
``decoder.aspp.sep``, ``decoder.block1``, ``decoder.block2`` (each ``.conv`` / ``.bn``), ``head``.
Training with batch norm after the global pool needs batch size >= 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import random as jr
from ..nn import batch_norm, conv2d, dropout, init_conv2d, relu, resize, separable_conv2d
from .base import (
    FLAG,
    POSITIVE_INT,
    POSITIVE_INTS,
    PROBABILITY,
    Model,
    Rule,
    build_cfg,
    cfg_error,
    register_model,
    validate_cfg,
)
from .encoder_decoder import ENCODER, ENCODER_WEIGHTS, encoder_decoder_model
from .encoders import EncoderError, create_encoder
from .segnet import init_conv_bn

__all__ = ["DeepLabV3PlusCfg", "deeplabv3plus"]

HIGHRES_CHANNELS = 48


@dataclass(frozen=True)
class DeepLabV3PlusCfg:
    """Static hyperparameters of DeepLabV3+ (SMP's defaults)."""

    num_classes: int = 3
    in_channels: int = 3
    encoder: str = "resnet34"
    encoder_weights: str | None = None
    encoder_depth: int = 5
    output_stride: int = 16
    decoder_channels: int = 256
    atrous_rates: tuple[int, ...] = (12, 24, 36)
    aspp_separable: bool = True
    aspp_dropout: float = 0.5

    def __post_init__(self):
        validate_cfg(self, "deeplabv3plus", _RULES)
        if len(self.atrous_rates) != 3:
            raise cfg_error("deeplabv3plus", "atrous_rates", self.atrous_rates, "three dilation rates")


_RULES = {"num_classes": POSITIVE_INT, "in_channels": POSITIVE_INT, "encoder": ENCODER,
          "encoder_weights": ENCODER_WEIGHTS,
          "encoder_depth": Rule("an integer in 3..5", lambda v: POSITIVE_INT.check(v) and 3 <= v <= 5, int),
          "output_stride": Rule("8 or 16", lambda v: POSITIVE_INT.check(v) and v in (8, 16), int),
          "decoder_channels": POSITIVE_INT, "atrous_rates": POSITIVE_INTS, "aspp_separable": FLAG,
          "aspp_dropout": PROBABILITY}


def _init_decoder(cfg: DeepLabV3PlusCfg, key: torch.Tensor, encoder) -> tuple[dict, dict]:
    c_deep, c_high, c = encoder.channels[-1], encoder.channels[1], cfg.decoder_channels
    keys = jr.split(key, 10)
    units = {"aspp.convs.0": init_conv_bn(keys[0], c_deep, c, 1)}
    for i in range(3):
        units[f"aspp.convs.{i + 1}"] = init_conv_bn(keys[i + 1], c_deep, c, 3, separable=cfg.aspp_separable)
    units["aspp.convs.4"] = init_conv_bn(keys[4], c_deep, c, 1)
    units["aspp.project"] = init_conv_bn(keys[5], 5 * c, c, 1)
    units["aspp.sep"] = init_conv_bn(keys[6], c, c, 3, separable=True)
    units["block1"] = init_conv_bn(keys[7], c_high, HIGHRES_CHANNELS, 1)
    units["block2"] = init_conv_bn(keys[8], HIGHRES_CHANNELS + c, c, 3, separable=True)
    params, state = _nest({k: v[0] for k, v in units.items()}), _nest({k: v[1] for k, v in units.items()})
    return {"decoder": params, "head": init_conv2d(keys[9], c, cfg.num_classes, 1)}, {"decoder": state}


def _nest(flat: dict) -> dict:
    out: dict = {}
    for name, value in flat.items():
        *path, leaf = name.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _unit(p: dict, s: dict, x: torch.Tensor, train: bool, *, dilation: int = 1) -> tuple[torch.Tensor, dict]:
    """conv (plain or separable; 'same' padding at ``dilation``) -> BN -> ReLU."""
    conv = p["conv"]
    if "depthwise" in conv:
        k = conv["depthwise"]["weight"].shape[-1]
        x = separable_conv2d(conv, x, padding=dilation * (k // 2), dilation=dilation)
    else:
        k = conv["weight"].shape[-1]
        x = conv2d(conv, x, padding=dilation * (k // 2), dilation=dilation)
    x, bn_state = batch_norm(p["bn"], s["bn"], x, train=train)
    return relu(x), {"bn": bn_state}


def _aspp(cfg, p: dict, s: dict, x: torch.Tensor, train: bool, key) -> tuple[torch.Tensor, dict]:
    new: dict = {"convs": {}}
    branches = []
    for i in range(4):
        y, new["convs"][str(i)] = _unit(p["convs"][str(i)], s["convs"][str(i)], x, train,
                                        dilation=cfg.atrous_rates[i - 1] if i else 1)
        branches.append(y)
    pooled, new["convs"]["4"] = _unit(p["convs"]["4"], s["convs"]["4"], x.mean(dim=(2, 3), keepdim=True), train)
    branches.append(resize(pooled, tuple(x.shape[-2:]), mode="bilinear"))
    y, new["project"] = _unit(p["project"], s["project"], torch.cat(branches, dim=1), train)
    if train and cfg.aspp_dropout > 0:
        if key is None:
            raise ValueError("deeplabv3plus: training (the ASPP has dropout) needs a key (key=...), got None")
        y = dropout(y, cfg.aspp_dropout, train=True, key=key)
    y, new["sep"] = _unit(p["sep"], s["sep"], y, train)
    return y, new


def _apply_decoder(cfg: DeepLabV3PlusCfg, params: dict, state: dict, features: list, size, train: bool, key
                   ) -> tuple[torch.Tensor, dict]:
    p, s = params["decoder"], state["decoder"]
    y, aspp_state = _aspp(cfg, p["aspp"], s["aspp"], features[-1], train, key)
    high_res = features[1]
    y = resize(y, tuple(high_res.shape[-2:]), mode="bilinear", align_corners=True)
    high, s1 = _unit(p["block1"], s["block1"], high_res, train)
    x, s2 = _unit(p["block2"], s["block2"], torch.cat([y, high], dim=1), train)
    logits = resize(conv2d(params["head"], x), tuple(size), mode="bilinear", align_corners=True)
    return logits, {"decoder": {"aspp": aspp_state, "block1": s1, "block2": s2}}


@register_model("deeplabv3plus")
def deeplabv3plus(**cfg) -> Model:
    """DeepLabV3+ over an encoder at output stride 16 (default: timm's resnet34, random init)."""
    cfg = build_cfg(DeepLabV3PlusCfg, cfg, name="deeplabv3plus")
    try:
        encoder = create_encoder(cfg.encoder, in_channels=cfg.in_channels, depth=cfg.encoder_depth,
                                 output_stride=cfg.output_stride)
    except EncoderError as err:
        raise ValueError(f"deeplabv3plus: {err}") from None
    return encoder_decoder_model("deeplabv3plus", cfg, encoder, _init_decoder, _apply_decoder)
