"""The Vision Transformer for segmentation of "Efficient Image Segmentation Using PyTorch", Part 4.

x [N, C_in, H, W] -> input BatchNorm -> non-overlapping p x p patches, each flattened channel-major
to a token of C_in*p*p values (the order of ``torch.nn.Unfold``) -> a linear patch embedding plus a
learned position embedding [L, dim] (no class token) -> ``depth`` pre-norm encoder blocks

    x = x + MHSA(LN(x))            (attention-weight dropout, as nn.MultiheadAttention(dropout=...))
    x = x + Dropout(W2 GELU(W1 LN(x)))

-> no final norm -> one linear layer shared by all tokens predicting each patch's
num_classes x p x p logits, folded back to [N, num_classes, H, W] (the order of ``nn.Fold``).
Patching, head splitting and the fold back are einops ``rearrange``s.

The position embedding is learned for the ``image_size // patch_size`` square grid. At another input
size (still divisible by the patch) it is resampled to the new grid with ``pos_interpolation``:
"bicubic" (default, as timm and the ViT/DeiT fine-tuning recipes do; align_corners=False),
"bilinear", or "none" (raise a ValueError instead).

Param tree: ``input_bn``, ``patch_embed``, ``pos_embed`` [L, dim], ``blocks.{i}.norm1``,
``blocks.{i}.attn.in_proj`` / ``.out_proj``, ``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1`` / ``.fc2``,
``head``. Default: 86,284,806 parameters, as the series.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from ..core import random as jr
from ..nn import (
    batch_norm,
    dropout,
    gelu,
    init_batch_norm,
    init_layer_norm,
    init_linear,
    init_self_attention,
    layer_norm,
    linear,
    self_attention,
)
from .base import FLAG, POSITIVE_INT, PROBABILITY, Model, build_cfg, cfg_error, one_of, register_model, validate_cfg

__all__ = ["ViTCfg", "vit"]

_INTERPOLATION = ("bicubic", "bilinear", "none")


@dataclass(frozen=True)
class ViTCfg:
    """Static hyperparameters of the segmentation ViT.

    image_size: side of the square image the position embedding is learned for.
    patch_size: side of the square patches (the model's stride).
    dim, depth, num_heads, mlp_dim: token width, number of blocks, attention heads, MLP hidden width.
    dropout: rate for attention weights and the MLP output (training only; then apply needs a key).
    input_bn: BatchNorm over the input channels first (as the series).
    pos_interpolation: how to resample the position embedding at other sizes (see the module doc).
    """

    num_classes: int = 3
    in_channels: int = 3
    image_size: int = 128
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int = 3072
    dropout: float = 0.2
    input_bn: bool = True
    pos_interpolation: str = "bicubic"

    def __post_init__(self):
        validate_cfg(self, "vit", _RULES)
        if self.image_size % self.patch_size:
            raise cfg_error("vit", "image_size", self.image_size,
                            f"divisible by patch_size {self.patch_size}")
        if self.dim % self.num_heads:
            raise cfg_error("vit", "num_heads", self.num_heads, f"a divisor of dim {self.dim}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


_RULES = {
    "num_classes": POSITIVE_INT, "in_channels": POSITIVE_INT, "image_size": POSITIVE_INT, "patch_size": POSITIVE_INT,
    "dim": POSITIVE_INT, "depth": POSITIVE_INT, "num_heads": POSITIVE_INT, "mlp_dim": POSITIVE_INT,
    "dropout": PROBABILITY, "input_bn": FLAG, "pos_interpolation": one_of(*_INTERPOLATION),
}


def _init(cfg: ViTCfg, key: torch.Tensor) -> tuple[dict, dict]:
    embed_key, pos_key, blocks_key, head_key = jr.split(key, 4)
    p = cfg.patch_size
    params: dict = {}
    state: dict = {}
    if cfg.input_bn:
        params["input_bn"], state["input_bn"] = init_batch_norm(cfg.in_channels)
    params["patch_embed"] = init_linear(embed_key, cfg.in_channels * p * p, cfg.dim)
    # torch.randn, as the series initialises it
    params["pos_embed"] = jr.normal(pos_key, (cfg.grid * cfg.grid, cfg.dim))
    params["blocks"] = {}
    for i in range(cfg.depth):
        attn_key, fc1_key, fc2_key = jr.split(jr.fold_in(blocks_key, i), 3)
        params["blocks"][str(i)] = {
            "norm1": init_layer_norm(cfg.dim),
            "attn": init_self_attention(attn_key, cfg.dim),
            "norm2": init_layer_norm(cfg.dim),
            "mlp": {"fc1": init_linear(fc1_key, cfg.dim, cfg.mlp_dim),
                    "fc2": init_linear(fc2_key, cfg.mlp_dim, cfg.dim)},
        }
    params["head"] = init_linear(head_key, cfg.dim, cfg.num_classes * p * p)
    return params, state


def _pos_embed(cfg: ViTCfg, pos: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """The [L, dim] embedding for a grid_h x grid_w token grid, resampled if it is not the trained grid."""
    if (grid_h, grid_w) == (cfg.grid, cfg.grid):
        return pos
    if cfg.pos_interpolation == "none":
        size = cfg.image_size
        raise ValueError(f"vit: trained for {size}x{size} inputs ({cfg.grid}x{cfg.grid} patches), got a "
                         f"{grid_h}x{grid_w} grid; set pos_interpolation='bicubic' to resample")
    grid = rearrange(pos, "(h w) d -> 1 d h w", h=cfg.grid)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode=cfg.pos_interpolation, align_corners=False)
    return rearrange(grid, "1 d h w -> (h w) d")


def _block(cfg: ViTCfg, params: dict, x: torch.Tensor, train: bool, key: torch.Tensor | None) -> torch.Tensor:
    attn_key, mlp_key = (None, None) if key is None else jr.split(key)
    y = layer_norm(params["norm1"], x)
    x = x + self_attention(params["attn"], y, num_heads=cfg.num_heads, dropout_rate=cfg.dropout, train=train,
                           key=attn_key)
    y = gelu(linear(params["mlp"]["fc1"], layer_norm(params["norm2"], x)))
    return x + dropout(linear(params["mlp"]["fc2"], y), cfg.dropout, train=train, key=mlp_key)


def _apply(cfg: ViTCfg, params: dict, state: dict, x: torch.Tensor, train: bool, key: torch.Tensor | None
           ) -> tuple[torch.Tensor, dict]:
    if train and cfg.dropout > 0 and key is None:
        raise ValueError(f"vit: training with dropout={cfg.dropout} needs a key (key=...), got None")
    new_state = {}
    if cfg.input_bn:
        x, new_state["input_bn"] = batch_norm(params["input_bn"], state["input_bn"], x, train=train)
    p = cfg.patch_size
    grid_h, grid_w = x.shape[-2] // p, x.shape[-1] // p
    tokens = rearrange(x, "n c (h p1) (w p2) -> n (h w) (c p1 p2)", p1=p, p2=p)
    tokens = linear(params["patch_embed"], tokens) + _pos_embed(cfg, params["pos_embed"], grid_h, grid_w)
    for i in range(cfg.depth):
        block_key = None if key is None else jr.fold_in(key, i)
        tokens = _block(cfg, params["blocks"][str(i)], tokens, train, block_key)
    logits = linear(params["head"], tokens)
    logits = rearrange(logits, "n (h w) (c p1 p2) -> n c (h p1) (w p2)", h=grid_h, p1=p, p2=p)
    return logits, (new_state if train else state)


@register_model("vit", check=lambda cfg: build_cfg(ViTCfg, cfg, name="vit"))
def vit(**cfg) -> Model:
    """The series' ViT. Default: 128px, 16x16 patches, dim 768, 12 blocks, 8 heads: 86,284,806 parameters."""
    cfg = build_cfg(ViTCfg, cfg, name="vit")
    return Model(name="vit", cfg=cfg, init_fn=_init, apply_fn=_apply, stride=cfg.patch_size,
                 in_channels=cfg.in_channels)
