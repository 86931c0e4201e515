"""FPN (Kirillov et al., "Panoptic Feature Pyramid Networks", 2019) over any encoder, as SMP builds it.

The last four encoder features c2..c5 (reductions r, 2r, 4r, 8r; r = 4 for the usual backbones):

    p5 = conv1x1(c5)                                   pyramid_channels, with bias
    p_k = nearest_resize(p_{k+1}, size(c_k)) + conv1x1(c_k)     k = 4, 3, 2
    s_k = (conv3x3 -> GroupNorm(32) -> ReLU, then bilinear x2 if k > 2) repeated max(1, k - 2) times
          -> segmentation_channels at c2's size
    x = sum(s_5..s_2) ("add") or concat ("cat": 4 x segmentation_channels)
    x = spatial dropout(x)          (whole channels, rate ``dropout``, drawn from the key)
    logits = bilinear_resize(conv1x1(x), input size)   align_corners=True, as SMP's head

x [N, C_in, H, W] with H, W divisible by 8r -> logits [N, num_classes, H, W]. Trees: ``encoder.*``,
``decoder.p5``, ``decoder.p{4,3,2}.skip_conv``, ``decoder.seg_blocks.{j}.{k}.conv`` / ``.gn``
(j = 0 for p5 .. 3 for p2), ``head``. No batch norm in the decoder: its state is the encoder's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import random as jr
from ..nn import channel_dropout, conv2d, group_norm, init_conv2d, init_group_norm, relu, resize
from .base import POSITIVE_INT, PROBABILITY, Model, Rule, build_cfg, cfg_error, one_of, register_model, validate_cfg
from .encoder_decoder import ENCODER, ENCODER_WEIGHTS, encoder_decoder_model
from .encoders import EncoderError, create_encoder

__all__ = ["FPNCfg", "fpn"]

GN_GROUPS = 32  # SMP's Conv3x3GNReLU


@dataclass(frozen=True)
class FPNCfg:
    """Static hyperparameters of FPN (SMP's defaults). The encoder's first ``encoder_depth`` stages (4 or
    5) are computed and the decoder reads the last four."""

    num_classes: int = 3
    in_channels: int = 3
    encoder: str = "resnet34"
    encoder_weights: str | None = None
    encoder_depth: int = 5
    pyramid_channels: int = 256
    segmentation_channels: int = 128
    merge_policy: str = "add"
    dropout: float = 0.2

    def __post_init__(self):
        validate_cfg(self, "fpn", _RULES)
        if self.segmentation_channels % GN_GROUPS:
            raise cfg_error("fpn", "segmentation_channels", self.segmentation_channels,
                            f"a multiple of {GN_GROUPS} (GroupNorm with {GN_GROUPS} groups)")


_RULES = {"num_classes": POSITIVE_INT, "in_channels": POSITIVE_INT, "encoder": ENCODER,
          "encoder_weights": ENCODER_WEIGHTS,
          "encoder_depth": Rule("an integer in 4..5", lambda v: POSITIVE_INT.check(v) and 4 <= v <= 5, int),
          "pyramid_channels": POSITIVE_INT, "segmentation_channels": POSITIVE_INT,
          "merge_policy": one_of("add", "cat"), "dropout": PROBABILITY}


UPSAMPLES = (3, 2, 1, 0)  # bilinear x2 steps from p5, p4, p3, p2 to p2's size (each level halves the size)


def _init_decoder(cfg: FPNCfg, key: torch.Tensor, encoder) -> tuple[dict, dict]:
    c2, c3, c4, c5 = encoder.channels[-4:]
    p_key, seg_key, head_key = jr.split(key, 3)
    pk = jr.split(p_key, 4)
    dec: dict = {"p5": init_conv2d(pk[0], c5, cfg.pyramid_channels, 1)}
    for i, (level, c) in enumerate((("p4", c4), ("p3", c3), ("p2", c2))):
        dec[level] = {"skip_conv": init_conv2d(pk[i + 1], c, cfg.pyramid_channels, 1)}
    dec["seg_blocks"] = {}
    for j, n_up in enumerate(UPSAMPLES):
        block = {}
        for k in range(max(1, n_up)):
            c_in = cfg.pyramid_channels if k == 0 else cfg.segmentation_channels
            block[str(k)] = {"conv": init_conv2d(jr.fold_in(seg_key, 8 * j + k), c_in, cfg.segmentation_channels, 3,
                                                 bias=False),
                             "gn": init_group_norm(cfg.segmentation_channels)}
        dec["seg_blocks"][str(j)] = block
    merged = cfg.segmentation_channels * (4 if cfg.merge_policy == "cat" else 1)
    return {"decoder": dec, "head": init_conv2d(head_key, merged, cfg.num_classes, 1)}, {}


def _seg_block(block: dict, x: torch.Tensor, n_up: int) -> torch.Tensor:
    for k in range(len(block)):
        x = relu(group_norm(block[str(k)]["gn"], conv2d(block[str(k)]["conv"], x, padding=1), groups=GN_GROUPS))
        if n_up:
            x = resize(x, (2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=True)
    return x


def _apply_decoder(cfg: FPNCfg, params: dict, state: dict, features: list, size, train: bool, key
                   ) -> tuple[torch.Tensor, dict]:
    dec = params["decoder"]
    c2, c3, c4, c5 = features[-4:]
    p5 = conv2d(dec["p5"], c5)
    pyramid = [p5]
    for level, c in (("p4", c4), ("p3", c3), ("p2", c2)):
        up = resize(pyramid[-1], tuple(c.shape[-2:]), mode="nearest")
        pyramid.append(up + conv2d(dec[level]["skip_conv"], c))
    outs = [_seg_block(dec["seg_blocks"][str(j)], p, n_up) for j, (p, n_up) in enumerate(zip(pyramid, UPSAMPLES))]
    x = torch.stack(outs).sum(dim=0) if cfg.merge_policy == "add" else torch.cat(outs, dim=1)
    if train and cfg.dropout > 0:
        if key is None:
            raise ValueError("fpn: training (the decoder has dropout) needs a key (key=...), got None")
        x = channel_dropout(x, cfg.dropout, train=True, key=key)
    logits = conv2d(params["head"], x)
    return resize(logits, tuple(size), mode="bilinear", align_corners=True), state


@register_model("fpn")
def fpn(**cfg) -> Model:
    """FPN over an encoder (default: timm's resnet34, random init; see the module doc)."""
    cfg = build_cfg(FPNCfg, cfg, name="fpn")
    try:
        encoder = create_encoder(cfg.encoder, in_channels=cfg.in_channels, depth=cfg.encoder_depth)
    except EncoderError as err:
        raise ValueError(f"fpn: {err}") from None
    r = encoder.reductions[-4:]
    if len(encoder.reductions) < 4 or any(b != 2 * a for a, b in zip(r, r[1:])):
        raise ValueError(f"fpn: the encoder's last four stages must halve the size step by step, got reductions "
                         f"{encoder.reductions}")
    return encoder_decoder_model("fpn", cfg, encoder, _init_decoder, _apply_decoder)
