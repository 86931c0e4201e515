"""Plain ``torch.nn.Module`` versions of the zoo's architectures, written the ordinary way.

They serve as references: the same widths give the same parameter counts as the pure models, their
``state_dict`` names equal the flattened names of our params and state (except
``nn.MultiheadAttention``'s fused ``in_proj_weight``/``in_proj_bias``, mapped by
:func:`load_pure`), so a pure model's weights load into its reference and the outputs can be
compared; torchinfo runs on them in the summary tests; and ``benchmarks/bench_latency.py`` times
them beside the pure models; ``benchmarks/_rows.py`` trains them for the memory and eager-step
benchmarks. They live here, not in ``tests/``, since benchmarks and experiments import them too.

``build_reference(name, cfg)`` takes a registered model's name and cfg; the lifted torchvision
models are their own reference (the module is rebuilt with the same constructor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import segmentation as tv_seg

from functional_seg.core.tree import flatten_with_names

__all__ = ["SegNet", "UNet", "EncoderUNet", "ViT", "SegFormer", "build_reference", "load_pure"]


# ----------------------------------------------------------------------------------------------
# SegNet (Parts 2 and 3)


class SeparableConv2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int):
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, k, padding=k // 2, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class ConvBNReLU(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int = 3, *, separable: bool = False, relu: bool = True):
        super().__init__()
        self.conv = SeparableConv2d(c_in, c_out, k) if separable else nn.Conv2d(c_in, c_out, k, padding=k // 2,
                                                                                bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class SegNet(nn.Module):
    """The series' SegNet: input BN, DownConv stages with pooling indices, mirrored UpConv stages."""

    def __init__(self, num_classes=3, in_channels=3, widths=(64, 128, 256, 512), convs_per_stage=(2, 2, 3, 3),
                 kernel_size=3, separable=False, input_bn=True, final_relu=True):
        super().__init__()
        self.input_bn = nn.BatchNorm2d(in_channels) if input_bn else nn.Identity()
        self.encoder = nn.ModuleList()
        c_in = in_channels
        for width, n in zip(widths, convs_per_stage):
            self.encoder.append(nn.Sequential(*[
                ConvBNReLU(c_in if j == 0 else width, width, kernel_size, separable=separable) for j in range(n)]))
            c_in = width
        self.decoder = nn.ModuleList()
        outs = (*reversed(widths[:-1]), num_classes)
        for i, (c_in, c_out, n) in enumerate(zip(reversed(widths), outs, reversed(convs_per_stage))):
            last_stage = i == len(widths) - 1
            self.decoder.append(nn.Sequential(*[
                ConvBNReLU(c_in, c_in if j < n - 1 else c_out, kernel_size, separable=separable,
                           relu=final_relu or not (last_stage and j == n - 1)) for j in range(n)]))
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)

    def forward(self, x):
        x = self.input_bn(x)
        pooled = []
        for stage in self.encoder:
            x = stage(x)
            size = x.shape[-2:]
            x, indices = self.pool(x)
            pooled.append((indices, size))
        for stage in self.decoder:
            indices, size = pooled.pop()
            x = stage(self.unpool(x, indices, output_size=size))
        return x


# ----------------------------------------------------------------------------------------------
# U-Net


class UpBlock(nn.Module):
    def __init__(self, c_deep: int, c_skip: int, upsample: str):
        super().__init__()
        if upsample == "transposed":
            self.up = nn.ConvTranspose2d(c_deep, c_skip, 2, stride=2)
            c_cat = 2 * c_skip
        else:
            self.up = None
            c_cat = c_deep + c_skip
        self.convs = nn.Sequential(ConvBNReLU(c_cat, c_skip), ConvBNReLU(c_skip, c_skip))

    def forward(self, x, skip):
        if self.up is not None:
            x = self.up(x)
        else:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    def __init__(self, num_classes=3, in_channels=3, base_width=64, depth=4, upsample="transposed"):
        super().__init__()
        widths = [base_width * 2**level for level in range(depth + 1)]
        self.encoder = nn.ModuleList()
        for level, width in enumerate(widths):
            c_in = in_channels if level == 0 else widths[level - 1]
            self.encoder.append(nn.Sequential(ConvBNReLU(c_in, width), ConvBNReLU(width, width)))
        self.decoder = nn.ModuleList(UpBlock(widths[level], widths[level - 1], upsample)
                                     for level in range(depth, 0, -1))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        skips = []
        for level, stage in enumerate(self.encoder):
            x = stage(x if level == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for block in self.decoder:
            x = block(x, skips.pop())
        return self.head(x)


# ----------------------------------------------------------------------------------------------
# U-Net over a timm encoder (SMP's decoder), the nn.Module twin of unet(encoder=...)


class EncoderUNetBlock(nn.Module):
    def __init__(self, c_in: int, c_skip: int, c_out: int):
        super().__init__()
        self.conv1 = ConvBNReLU(c_in + c_skip, c_out)
        self.conv2 = ConvBNReLU(c_out, c_out)

    def forward(self, x, size, skip=None):
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class EncoderUNet(nn.Module):
    """timm's ``features_only`` encoder and SMP's U-Net decoder, written the ordinary way (trained with
    ``torch.optim``); state_dict names equal the pure model's flattened params and state."""

    def __init__(self, num_classes=3, in_channels=3, encoder="efficientnet_lite0",
                 decoder_channels=(256, 128, 64, 32, 16), **unused):
        import timm

        super().__init__()
        depth = len(decoder_channels)
        self.encoder = timm.create_model(encoder, features_only=True, pretrained=False, in_chans=in_channels,
                                         out_indices=tuple(range(depth)))
        deep_first = self.encoder.feature_info.channels()[::-1]
        c_in = [deep_first[0], *decoder_channels[:-1]]
        c_skip = [*deep_first[1:], 0]
        self.decoder = nn.Module()
        self.decoder.blocks = nn.ModuleList(EncoderUNetBlock(*c) for c in zip(c_in, c_skip, decoder_channels))
        self.head = nn.Conv2d(decoder_channels[-1], num_classes, 3, padding=1)

    def forward(self, x):
        features = self.encoder(x)
        sizes = [f.shape[-2:] for f in features[-2::-1]] + [x.shape[-2:]]
        skips = features[-2::-1]
        x = features[-1]
        for i, block in enumerate(self.decoder.blocks):
            x = block(x, sizes[i], skips[i] if i < len(skips) else None)
        return self.head(x)


# ----------------------------------------------------------------------------------------------
# ViT (Part 4), as the series' notebook builds it: Unfold, Linear, nn.MultiheadAttention, Fold


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dropout)

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, num_classes=3, in_channels=3, image_size=128, patch_size=16, dim=768, depth=12, num_heads=8,
                 mlp_dim=3072, dropout=0.2, input_bn=True, pos_interpolation="bicubic"):
        super().__init__()
        del pos_interpolation  # the reference runs at image_size only
        grid = image_size // patch_size
        self.input_bn = nn.BatchNorm2d(in_channels) if input_bn else nn.Identity()
        self.unfold = nn.Unfold(patch_size, stride=patch_size)
        self.patch_embed = nn.Linear(in_channels * patch_size**2, dim)
        self.pos_embed = nn.Parameter(torch.randn(grid * grid, dim))
        self.blocks = nn.ModuleList(EncoderBlock(dim, num_heads, mlp_dim, dropout) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes * patch_size**2)
        self.fold = nn.Fold((image_size, image_size), patch_size, stride=patch_size)

    def forward(self, x):
        x = self.unfold(self.input_bn(x)).transpose(1, 2)
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.fold(self.head(x).transpose(1, 2))


# ----------------------------------------------------------------------------------------------
# SegFormer


class EfficientAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, sr: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, stride=sr)
            self.sr_norm = nn.LayerNorm(dim)
        else:
            self.sr = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, h, w):
        n, length, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(n, length, heads, c // heads).transpose(1, 2)
        if self.sr is not None:
            x = self.sr(x.transpose(1, 2).reshape(n, c, h, w)).flatten(2).transpose(1, 2)
            x = self.sr_norm(x)
        k, v = self.kv(x).reshape(n, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, c))


class MixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, h, w):
        y = self.fc1(x)
        n, _, c = y.shape
        y = self.dwconv(y.transpose(1, 2).reshape(n, c, h, w)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(y))


class MiTBlock(nn.Module):
    def __init__(self, dim, num_heads, sr, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientAttention(dim, num_heads, sr)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x, h, w):  # stochastic depth left out: the reference is for eval and timing
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.ffn(self.norm2(x), h, w)


class PatchEmbed(nn.Module):
    def __init__(self, c_in, dim, k, stride):
        super().__init__()
        self.proj = nn.Conv2d(c_in, dim, k, stride=stride, padding=k // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class MiTStage(nn.Module):
    def __init__(self, c_in, dim, depth, num_heads, sr, k, stride, mlp_ratio):
        super().__init__()
        self.patch_embed = PatchEmbed(c_in, dim, k, stride)
        self.blocks = nn.ModuleList(MiTBlock(dim, num_heads, sr, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x, h, w = self.patch_embed(x)
        for block in self.blocks:
            x = block(x, h, w)
        return self.norm(x).transpose(1, 2).reshape(x.shape[0], -1, h, w)


class FuseConv(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class SegFormer(nn.Module):
    def __init__(self, num_classes=3, in_channels=3, dims=(32, 64, 160, 256), depths=(2, 2, 2, 2),
                 num_heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1), patch_sizes=(7, 3, 3, 3), patch_strides=(4, 2, 2, 2),
                 mlp_ratio=4, decoder_dim=256, drop_path_rate=0.1, decoder_dropout=0.1):
        super().__init__()
        del drop_path_rate
        c_ins = (in_channels, *dims[:-1])
        self.stages = nn.ModuleList(
            MiTStage(*args, mlp_ratio) for args in zip(c_ins, dims, depths, num_heads, sr_ratios, patch_sizes,
                                                       patch_strides))
        self.decoder = nn.Module()
        self.decoder.linear_c = nn.ModuleList(nn.Linear(dim, decoder_dim) for dim in dims)
        self.decoder.fuse = FuseConv(len(dims) * decoder_dim, decoder_dim)
        self.decoder.dropout = nn.Dropout(decoder_dropout)
        self.decoder.classifier = nn.Conv2d(decoder_dim, num_classes, 1)

    def forward(self, x):
        size = x.shape[-2:]
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        quarter = features[0].shape[-2:]
        maps = []
        for i in reversed(range(len(features))):
            y = self.decoder.linear_c[i](features[i].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            maps.append(y if i == 0 else F.interpolate(y, size=quarter, mode="bilinear", align_corners=False))
        y = self.decoder.dropout(self.decoder.fuse(torch.cat(maps, dim=1)))
        return F.interpolate(self.decoder.classifier(y), size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------
# Building and loading


class _TorchvisionOut(nn.Module):
    """A torchvision segmentation model returning its ``"out"`` logits (what the lifted model returns)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


_TORCHVISION = {
    "fcn_resnet50": lambda n: tv_seg.fcn_resnet50(weights=None, weights_backbone=None, num_classes=n,
                                                  aux_loss=False),
    "deeplabv3_mobilenet": lambda n: tv_seg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                         num_classes=n, aux_loss=False),
    "lraspp_mobilenet": lambda n: tv_seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                   num_classes=n),
}


def build_reference(name: str, cfg) -> nn.Module:
    """The plain-module twin of registered model ``name`` with cfg ``cfg`` (a cfg dataclass)."""
    fields = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    if name in ("segnet", "segnet_dsc"):
        return SegNet(**fields)
    if name == "unet" and fields.get("encoder"):
        return EncoderUNet(**fields)
    if name == "unet":
        return UNet(**{k: fields[k] for k in ("num_classes", "in_channels", "base_width", "depth", "upsample")})
    if name == "vit":
        return ViT(**fields)
    if name == "segformer":
        return SegFormer(**fields)
    if name in _TORCHVISION:
        return _TorchvisionOut(_TORCHVISION[name](cfg.num_classes))
    raise KeyError(f"no reference module for {name!r}")


def _torch_name(name: str) -> str:
    for part in ("weight", "bias"):
        name = name.replace(f".attn.in_proj.{part}", f".attn.in_proj_{part}")
    return name


def load_pure(module: nn.Module, params: dict, state: dict) -> nn.Module:
    """Copy a pure model's params and state into its reference module (strict names and shapes)."""
    flat = {_torch_name(n): t for n, t in {**flatten_with_names(params), **flatten_with_names(state)}.items()}
    module.load_state_dict(flat, strict=True)
    return module
