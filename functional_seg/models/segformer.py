"""SegFormer (Xie et al., 2021): a Mix Transformer (MiT) encoder and an all-MLP decoder, as pure functions.

Encoder: four stages; stage i starts with an *overlapping* patch embedding (a k_i x k_i conv with
stride s_i and padding k_i // 2, then LayerNorm) and runs ``depths[i]`` pre-norm blocks

    x = x + DropPath(EfficientAttention(LN(x)))     keys/values from a sr x sr stride-sr conv + LN
    x = x + DropPath(MixFFN(LN(x)))                 fc1 -> 3x3 depthwise conv -> GELU -> fc2

then a LayerNorm; its tokens fold back to a map [N, dims[i], H / S_i, W / S_i] with S = (4, 8, 16,
32) for the default strides. Efficient attention (the paper's eq. 2) shortens the key/value sequence
by sr_i**2, and the 3x3 depthwise conv in the Mix-FFN (eq. 3) gives the position information, so
there is no position embedding and any size divisible by 32 works.

Decoder (all-MLP): each stage's map -> a linear layer to ``decoder_dim`` -> bilinear to H/4 x W/4;
the four are concatenated (deepest first, as the reference code) -> 1x1 conv (no bias) -> BN -> ReLU
-> dropout -> 1x1 conv to ``num_classes`` -> bilinear to H x W.

Param tree: ``stages.{i}.patch_embed.proj`` / ``.norm``, ``stages.{i}.blocks.{j}.norm1``,
``.attn.q`` / ``.kv`` / ``.sr`` / ``.sr_norm`` / ``.proj``, ``.norm2``, ``.ffn.fc1`` / ``.dwconv``
/ ``.fc2``, ``stages.{i}.norm``; ``decoder.linear_c.{i}``, ``decoder.fuse.conv`` / ``.bn``,
``decoder.classifier``. Defaults are MiT-B0 (3.7 M parameters with 3 classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from ..core import random as jr
from ..nn import (
    batch_norm,
    conv2d,
    dot_product_attention,
    dropout,
    gelu,
    init_batch_norm,
    init_conv2d,
    init_layer_norm,
    init_linear,
    layer_norm,
    linear,
    relu,
    resize,
)
from .base import (
    POSITIVE_INT,
    POSITIVE_INTS,
    POSITIVE_ODD_INTS,
    PROBABILITY,
    Model,
    build_cfg,
    cfg_error,
    register_model,
    validate_cfg,
)

__all__ = ["SegFormerCfg", "segformer"]


@dataclass(frozen=True)
class SegFormerCfg:
    """Static hyperparameters of SegFormer (defaults: MiT-B0 with its decoder).

    dims, depths, num_heads, sr_ratios: per stage width, blocks, heads, spatial reduction.
    patch_sizes, patch_strides: kernel and stride of each overlapping patch embedding.
    mlp_ratio: Mix-FFN hidden width / dim. decoder_dim: width of the all-MLP decoder.
    drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
    decoder_dropout: dropout before the classifier. Both need a key in training when > 0.
    """

    num_classes: int = 3
    in_channels: int = 3
    dims: tuple[int, ...] = (32, 64, 160, 256)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    patch_strides: tuple[int, ...] = (4, 2, 2, 2)
    mlp_ratio: int = 4
    decoder_dim: int = 256
    drop_path_rate: float = 0.1
    decoder_dropout: float = 0.1

    def __post_init__(self):
        validate_cfg(self, "segformer", _RULES)
        for name in _PER_STAGE[1:]:
            if len(getattr(self, name)) != len(self.dims):
                raise cfg_error("segformer", name, getattr(self, name),
                                f"of length {len(self.dims)} (one entry per stage of dims {self.dims})")
        if any(dim % heads for dim, heads in zip(self.dims, self.num_heads)):
            raise cfg_error("segformer", "num_heads", self.num_heads, f"divisors of dims {self.dims}, stage by stage")
        # The smallest input (one stride) must leave each stage a map at least sr x sr for its
        # key/value conv: sr_ratios[i] <= stride / (stride up to stage i).
        reach, limits = 1, []
        for s in self.patch_strides:
            reach *= s
            limits.append(self.stride // reach)
        if any(sr > limit for sr, limit in zip(self.sr_ratios, limits)):
            raise cfg_error("segformer", "sr_ratios", self.sr_ratios,
                            f"at most {tuple(limits)} stage by stage (the map sides at the smallest input, "
                            f"one stride {self.stride})")

    @property
    def stride(self) -> int:
        out = 1
        for s in self.patch_strides:
            out *= s
        return out

    def drop_path_rates(self) -> list[float]:
        """Stochastic-depth rate of each block, in order, linear from 0 to ``drop_path_rate``."""
        n = sum(self.depths)
        return [self.drop_path_rate * i / max(n - 1, 1) for i in range(n)]


_PER_STAGE = ("dims", "depths", "num_heads", "sr_ratios", "patch_sizes", "patch_strides")
# Odd patch kernels: padding k // 2 then gives exactly H / stride (an even k would add one row).
_RULES = {
    "num_classes": POSITIVE_INT, "in_channels": POSITIVE_INT,
    **{name: POSITIVE_INTS for name in _PER_STAGE}, "patch_sizes": POSITIVE_ODD_INTS,
    "mlp_ratio": POSITIVE_INT, "decoder_dim": POSITIVE_INT, "drop_path_rate": PROBABILITY,
    "decoder_dropout": PROBABILITY,
}


def _drop_path(x: torch.Tensor, rate: float, *, train: bool, key: torch.Tensor | None) -> torch.Tensor:
    """Stochastic depth: zero a whole sample's residual branch with probability ``rate``."""
    if not train or rate == 0.0:
        return x
    keep = jr.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.dim() - 1))
    return torch.where(keep, x / (1.0 - rate), torch.zeros_like(x))


def _init_block(key: torch.Tensor, dim: int, sr: int, mlp_ratio: int) -> dict:
    q_key, kv_key, sr_key, proj_key, fc1_key, dw_key, fc2_key = jr.split(key, 7)
    hidden = dim * mlp_ratio
    attn = {"q": init_linear(q_key, dim, dim), "kv": init_linear(kv_key, dim, 2 * dim)}
    if sr > 1:
        attn["sr"] = init_conv2d(sr_key, dim, dim, sr)
        attn["sr_norm"] = init_layer_norm(dim)
    attn["proj"] = init_linear(proj_key, dim, dim)
    return {
        "norm1": init_layer_norm(dim),
        "attn": attn,
        "norm2": init_layer_norm(dim),
        "ffn": {
            "fc1": init_linear(fc1_key, dim, hidden),
            "dwconv": init_conv2d(dw_key, hidden, hidden, 3, groups=hidden),
            "fc2": init_linear(fc2_key, hidden, dim),
        },
    }


def _init(cfg: SegFormerCfg, key: torch.Tensor) -> tuple[dict, dict]:
    enc_key, dec_key = jr.split(key)
    stages = {}
    c_in = cfg.in_channels
    for i, (dim, depth, sr, k) in enumerate(zip(cfg.dims, cfg.depths, cfg.sr_ratios, cfg.patch_sizes)):
        embed_key, blocks_key = jr.split(jr.fold_in(enc_key, i))
        stages[str(i)] = {
            "patch_embed": {"proj": init_conv2d(embed_key, c_in, dim, k), "norm": init_layer_norm(dim)},
            "blocks": {str(j): _init_block(jr.fold_in(blocks_key, j), dim, sr, cfg.mlp_ratio) for j in range(depth)},
            "norm": init_layer_norm(dim),
        }
        c_in = dim
    linear_key, fuse_key, cls_key = jr.split(dec_key, 3)
    fuse_bn, fuse_bn_state = init_batch_norm(cfg.decoder_dim)
    decoder = {
        "linear_c": {str(i): init_linear(jr.fold_in(linear_key, i), dim, cfg.decoder_dim)
                     for i, dim in enumerate(cfg.dims)},
        "fuse": {"conv": init_conv2d(fuse_key, len(cfg.dims) * cfg.decoder_dim, cfg.decoder_dim, 1, bias=False),
                 "bn": fuse_bn},
        "classifier": init_conv2d(cls_key, cfg.decoder_dim, cfg.num_classes, 1),
    }
    return {"stages": stages, "decoder": decoder}, {"decoder": {"fuse": {"bn": fuse_bn_state}}}


def _efficient_attention(params: dict, x: torch.Tensor, h: int, w: int, num_heads: int) -> torch.Tensor:
    """x [N, L = h*w, dim] -> [N, L, dim]; keys and values from the sr-reduced map."""
    q = rearrange(linear(params["q"], x), "n l (heads d) -> n heads l d", heads=num_heads)
    if "sr" in params:
        stride = params["sr"]["weight"].shape[-1]
        x = rearrange(x, "n (h w) c -> n c h w", h=h, w=w)
        x = rearrange(conv2d(params["sr"], x, stride=stride), "n c h w -> n (h w) c")
        x = layer_norm(params["sr_norm"], x)
    k, v = rearrange(linear(params["kv"], x), "n l (two heads d) -> two n heads l d", two=2, heads=num_heads)
    out = dot_product_attention(q, k, v)
    return linear(params["proj"], rearrange(out, "n heads l d -> n l (heads d)"))


def _mix_ffn(params: dict, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    y = linear(params["fc1"], x)
    y = rearrange(y, "n (h w) c -> n c h w", h=h, w=w)
    y = conv2d(params["dwconv"], y, padding=1, groups=y.shape[1])
    y = gelu(rearrange(y, "n c h w -> n (h w) c"))
    return linear(params["fc2"], y)


def _apply(cfg: SegFormerCfg, params: dict, state: dict, x: torch.Tensor, train: bool, key: torch.Tensor | None
           ) -> tuple[torch.Tensor, dict]:
    if train and max(cfg.drop_path_rate, cfg.decoder_dropout) > 0 and key is None:
        raise ValueError("segformer: training with drop_path_rate / decoder_dropout > 0 needs a key (key=...)")
    size = (x.shape[-2], x.shape[-1])
    rates = cfg.drop_path_rates()
    block_index = 0
    features = []
    for i, (depth, heads, k, s) in enumerate(zip(cfg.depths, cfg.num_heads, cfg.patch_sizes, cfg.patch_strides)):
        stage = params["stages"][str(i)]
        x = conv2d(stage["patch_embed"]["proj"], x, stride=s, padding=k // 2)
        h, w = x.shape[-2], x.shape[-1]
        x = layer_norm(stage["patch_embed"]["norm"], rearrange(x, "n c h w -> n (h w) c"))
        for j in range(depth):
            p = stage["blocks"][str(j)]
            attn_key = ffn_key = None
            if key is not None:
                attn_key, ffn_key = jr.split(jr.fold_in(key, block_index))
            rate = rates[block_index]
            y = _efficient_attention(p["attn"], layer_norm(p["norm1"], x), h, w, heads)
            x = x + _drop_path(y, rate, train=train, key=attn_key)
            y = _mix_ffn(p["ffn"], layer_norm(p["norm2"], x), h, w)
            x = x + _drop_path(y, rate, train=train, key=ffn_key)
            block_index += 1
        x = rearrange(layer_norm(stage["norm"], x), "n (h w) c -> n c h w", h=h, w=w)
        features.append(x)

    dec = params["decoder"]
    quarter = (features[0].shape[-2], features[0].shape[-1])
    maps = []
    for i, f in reversed(list(enumerate(features))):
        y = linear(dec["linear_c"][str(i)], rearrange(f, "n c h w -> n h w c"))
        y = rearrange(y, "n h w c -> n c h w")
        maps.append(y if i == 0 else resize(y, quarter))
    y = conv2d(dec["fuse"]["conv"], torch.cat(maps, dim=1))
    y, bn_state = batch_norm(dec["fuse"]["bn"], state["decoder"]["fuse"]["bn"], y, train=train)
    drop_key = None if key is None else jr.fold_in(key, block_index)
    y = dropout(relu(y), cfg.decoder_dropout, train=train, key=drop_key)
    logits = resize(conv2d(dec["classifier"], y), size)
    return logits, ({"decoder": {"fuse": {"bn": bn_state}}} if train else state)


@register_model("segformer", check=lambda cfg: build_cfg(SegFormerCfg, cfg, name="segformer"))
def segformer(**cfg) -> Model:
    """SegFormer, MiT-B0 sizes by default (stride 32; logits upsampled to the input size)."""
    cfg = build_cfg(SegFormerCfg, cfg, name="segformer")
    return Model(name="segformer", cfg=cfg, init_fn=_init, apply_fn=_apply, stride=cfg.stride,
                 in_channels=cfg.in_channels)
