"""Pure, batched, on-device augmentation for image/mask pairs, plus float conversion and normalisation.

``augment(key, images, masks, cfg)`` takes float images ``[N, 3, H, W]`` in [0, 1] and integer
masks ``[N, H, W]`` on any device and returns the same shapes, dtypes and device. Every random
quantity is drawn per sample from ``key`` (``core.random``), so the same key gives the same batch
and the function traces under ``torch.compile(fullgraph=True)``: no ``.item()``, no branching on
tensor values, no data-dependent shapes. Only the static fields of the frozen ``AugmentConfig``
decide which ops run.

Order: random resized crop (image bilinear, mask nearest, one shared sampling grid), horizontal
flip (image and mask together), then colour jitter on the image only in the fixed order
brightness, contrast, saturation, hue (torchvision's ``ColorJitter`` draws the same factors but
permutes the order per call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core import random as fr

__all__ = [
    "AugmentConfig",
    "augment",
    "augment_preset",
    "PRESETS",
    "normalize",
    "to_float",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "rgb_to_hsv",
    "hsv_to_rgb",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
_CROP_TRIES = 10  # candidates per sample, as torchvision's RandomResizedCrop.get_params


@dataclass(frozen=True)
class AugmentConfig:
    """Static augmentation settings (hashable, so ``torch.compile`` treats them as constants).

    Attributes:
        hflip: probability of a horizontal flip (image and mask together).
        brightness, contrast, saturation: jitter strength b; the factor is uniform in
            [max(0, 1 - b), 1 + b] per sample (torchvision ``ColorJitter`` semantics).
        hue: hue shift uniform in [-hue, hue] (fraction of a full turn, at most 0.5).
        crop_scale: random resized crop area range as fractions of the image, e.g. (0.5, 1.0);
            None disables the crop.
        crop_ratio: aspect-ratio (w / h) range of the crop, sampled log-uniformly.
        crop_p: probability that a sample is cropped at all.
    """

    hflip: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_p: float = 1.0

    def __post_init__(self):
        for name in ("hflip", "crop_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"AugmentConfig.{name} is a probability in [0, 1], got {v}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"AugmentConfig.hue must lie in [0, 0.5], got {self.hue}")
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(
                    f"AugmentConfig.crop_scale needs 0 < low <= high <= 1, got {self.crop_scale}"
                )
            object.__setattr__(self, "crop_scale", (float(lo), float(hi)))
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"AugmentConfig.crop_ratio needs 0 < low <= high, got {self.crop_ratio}")
        object.__setattr__(self, "crop_ratio", (float(lo), float(hi)))

    @property
    def jitter(self) -> bool:
        return any(v > 0 for v in (self.brightness, self.contrast, self.saturation, self.hue))

    @property
    def crop(self) -> bool:
        return self.crop_scale is not None and self.crop_p > 0


PRESETS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(),
    "flip": AugmentConfig(hflip=0.5),
    "flip_jitter": AugmentConfig(hflip=0.5, contrast=0.3),  # the article series' recipe
    "flip_jitter_full": AugmentConfig(hflip=0.5, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05),
    "flip_jitter_crop": AugmentConfig(
        hflip=0.5, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, crop_scale=(0.5, 1.0)
    ),
}


def augment_preset(name: str) -> AugmentConfig:
    """A named ``AugmentConfig``: "none", "flip", "flip_jitter" (the series' recipe),
    "flip_jitter_full", "flip_jitter_crop"."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown augment preset {name!r}; expected one of {', '.join(PRESETS)}") from None


def to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, 3, H, W] in 0..255 -> float [N, 3, H, W] in [0, 1]."""
    return images.to(dtype) * (1.0 / 255.0)


def normalize(
    images: torch.Tensor,
    mean: tuple[float, ...] | torch.Tensor = IMAGENET_MEAN,
    std: tuple[float, ...] | torch.Tensor = IMAGENET_STD,
) -> torch.Tensor:
    """(images - mean) / std per channel.

    Args:
        images: float [N, C, H, W] in [0, 1].
        mean, std: C values each (ImageNet's by default; ``PreparedData.mean_std()`` gives the
            dataset's own).

    Returns:
        float [N, C, H, W], same dtype and device.
    """
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    return (images - mean) / std


def _gray(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> luma [N, 1, H, W]."""
    r, g, b = images.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _gray_mean(images: torch.Tensor) -> torch.Tensor:
    """Mean luma per image, [N, 1, 1, 1]: the luma of the channel means, one reduction pass."""
    m = images.mean(dim=(2, 3))
    return (_GRAY[0] * m[:, 0] + _GRAY[1] * m[:, 1] + _GRAY[2] * m[:, 2]).reshape(-1, 1, 1, 1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * images + (1 - factor) * other, clamped to [0, 1]; ``factor`` is per sample [N]."""
    f = factor.to(images.dtype).reshape(-1, 1, 1, 1)
    # One fused kernel, then an in-place clamp of that fresh tensor (the inputs are never written).
    return torch.lerp(other.expand_as(images), images, f).clamp(0.0, 1.0)


def _hue_sector(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue in sixths of a turn, [N, 1, H, W] in [-1, 5), with max and chroma (max - min) alike."""
    r, g, b = images[:, 0:1], images[:, 1:2], images[:, 2:3]
    maxc = images.amax(1, keepdim=True)
    chroma = maxc - images.amin(1, keepdim=True)
    d = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    sector = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    return sector, maxc, chroma


_HSV_OFFSETS = (5.0, 3.0, 1.0)  # R, G, B in the branch-free HSV -> RGB formula


def _from_sector(sector: torch.Tensor, maxc: torch.Tensor, chroma: torch.Tensor) -> torch.Tensor:
    """RGB from hue sector, value and chroma: c_n = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.

    The closed form of HSV -> RGB without the six-way case split (gives the same values).
    """
    offsets = torch.tensor(_HSV_OFFSETS, dtype=sector.dtype, device=sector.device).reshape(1, 3, 1, 1)
    k = torch.remainder(sector + offsets, 6.0)
    return maxc - chroma * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """RGB [N, 3, H, W] in [0, 1] -> HSV [N, 3, H, W], hue in [0, 1) (branch-free, as torchvision's)."""
    sector, maxc, chroma = _hue_sector(images)
    s = chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    return torch.cat([torch.remainder(sector / 6.0, 1.0), s, maxc], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV [N, 3, H, W] (hue in [0, 1)) -> RGB [N, 3, H, W] in [0, 1]."""
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    return _from_sector(h * 6.0, v, v * s)


def _adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` turns per sample [N]: RGB -> (hue, V, C) -> RGB, no S division needed."""
    sector, maxc, chroma = _hue_sector(images)
    return _from_sector(sector + 6.0 * shift.to(images.dtype).reshape(-1, 1, 1, 1), maxc, chroma)


def _color_jitter(key: torch.Tensor, images: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    n = images.shape[0]
    b_key, c_key, s_key, h_key = fr.split(key, 4)
    if cfg.brightness > 0:
        f = fr.uniform(b_key, (n,), low=max(0.0, 1.0 - cfg.brightness), high=1.0 + cfg.brightness)
        images = (images * f.to(images.dtype).reshape(-1, 1, 1, 1)).clamp(0.0, 1.0)
    if cfg.contrast > 0:
        f = fr.uniform(c_key, (n,), low=max(0.0, 1.0 - cfg.contrast), high=1.0 + cfg.contrast)
        images = _blend(images, _gray_mean(images), f)
    if cfg.saturation > 0:
        f = fr.uniform(s_key, (n,), low=max(0.0, 1.0 - cfg.saturation), high=1.0 + cfg.saturation)
        images = _blend(images, _gray(images), f)
    if cfg.hue > 0:
        images = _adjust_hue(images, fr.uniform(h_key, (n,), low=-cfg.hue, high=cfg.hue))
    return images


def _crop_boxes(key: torch.Tensor, n: int, height: int, width: int, cfg: AugmentConfig) -> torch.Tensor:
    """Per-sample crop boxes (x0, y0, w, h) as fractions of the image, float [N, 4].

    torchvision's RandomResizedCrop rejection loop made static: draw ``_CROP_TRIES`` (area, ratio)
    candidates per sample, keep the first that fits, fall back to the whole image (clamped to
    the ratio range) when none does. Boxes are continuous, not rounded to whole pixels.
    """
    area_key, ratio_key, x_key, y_key = fr.split(key, 4)
    lo, hi = cfg.crop_scale
    area = fr.uniform(area_key, (n, _CROP_TRIES), low=lo, high=hi)
    log_r = fr.uniform(
        ratio_key, (n, _CROP_TRIES), low=math.log(cfg.crop_ratio[0]), high=math.log(cfg.crop_ratio[1])
    )
    ratio = torch.exp(log_r)
    aspect = height / width
    w = torch.sqrt(area * ratio * aspect)  # crop width / image width, for crop w/h = ratio in pixels
    h = torch.sqrt(area / ratio / aspect)
    fits = (w <= 1.0) & (h <= 1.0)
    first = torch.argmax(fits.to(torch.int32), dim=1, keepdim=True)  # index of the first fit
    any_fit = fits.any(dim=1)
    w = w.gather(1, first)[:, 0]
    h = h.gather(1, first)[:, 0]
    in_ratio = width / height
    fb_w = min(1.0, cfg.crop_ratio[1] / in_ratio)
    fb_h = min(1.0, in_ratio / cfg.crop_ratio[0])
    w = torch.where(any_fit, w, torch.full_like(w, fb_w))
    h = torch.where(any_fit, h, torch.full_like(h, fb_h))
    x0 = fr.uniform(x_key, (n,)) * (1.0 - w)
    y0 = fr.uniform(y_key, (n,)) * (1.0 - h)
    return torch.stack([x0, y0, w, h], dim=1)


def _random_resized_crop(
    key: torch.Tensor, images: torch.Tensor, masks: torch.Tensor, cfg: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    n, _, height, width = images.shape
    box_key, apply_key = fr.split(key, 2)
    box = _crop_boxes(box_key, n, height, width, cfg).to(images.dtype)
    x0, y0, w, h = box.unbind(1)
    # Output coords in [-1, 1] map to the box: x_in = w * x_out + (2 x0 + w - 1), same for y; the
    # output pixel centres (align_corners=False) are (2 j + 1) / W - 1. Written out instead of
    # F.affine_grid, which has no vmap batching rule (the step vmaps augmentation per sample).
    xs = (2.0 * torch.arange(width, device=images.device, dtype=images.dtype) + 1.0) / width - 1.0
    ys = (2.0 * torch.arange(height, device=images.device, dtype=images.dtype) + 1.0) / height - 1.0
    gx = w[:, None, None] * xs[None, None, :] + (2.0 * x0 + w - 1.0)[:, None, None]
    gy = h[:, None, None] * ys[None, :, None] + (2.0 * y0 + h - 1.0)[:, None, None]
    grid = torch.stack([gx.expand(n, height, width), gy.expand(n, height, width)], dim=-1)
    cropped = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # One grid for both: nearest on the float labels picks an existing label, never a blend.
    mask_f = masks.unsqueeze(1).to(images.dtype)
    cropped_mask = F.grid_sample(mask_f, grid, mode="nearest", padding_mode="border", align_corners=False)
    cropped_mask = cropped_mask[:, 0].round().to(masks.dtype)
    if cfg.crop_p >= 1.0:
        return cropped, cropped_mask
    apply = fr.bernoulli(apply_key, cfg.crop_p, (n,))
    return (
        torch.where(apply.reshape(-1, 1, 1, 1), cropped, images),
        torch.where(apply.reshape(-1, 1, 1), cropped_mask, masks),
    )


def augment(
    key: torch.Tensor, images: torch.Tensor, masks: torch.Tensor, cfg: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly crop, flip and colour-jitter a batch, with independent draws per sample.

    Args:
        key: random key (int64 [2]); the same key gives the same output.
        images: float [N, 3, H, W] in [0, 1], any device.
        masks: integer [N, H, W] labels (int64 usually); only geometric ops touch them.
        cfg: static settings; bind it (``functools.partial``) before ``torch.compile``.

    Returns:
        (images, masks) with the input shapes, dtypes and device; images stay in [0, 1] and masks
        only hold labels present in the input.
    """
    fr._check_key(key, "augment")
    if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
        raise TypeError(
            f"augment: images must be float [N, 3, H, W] in [0, 1] (use to_float on uint8), "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if masks.is_floating_point() or masks.shape != (images.shape[0], *images.shape[2:]):
        raise TypeError(
            f"augment: masks must be integer {(images.shape[0], *images.shape[2:])}, "
            f"got {masks.dtype} {tuple(masks.shape)}"
        )
    key = key.to(images.device)
    crop_key, flip_key, jitter_key = fr.split(key, 3)
    n = images.shape[0]
    if cfg.crop:
        images, masks = _random_resized_crop(crop_key, images, masks, cfg)
    if cfg.hflip > 0:
        flip = fr.bernoulli(flip_key, cfg.hflip, (n,))
        images = torch.where(flip.reshape(-1, 1, 1, 1), images.flip(-1), images)
        masks = torch.where(flip.reshape(-1, 1, 1), masks.flip(-1), masks)
    if cfg.jitter:
        images = _color_jitter(jitter_key, images, cfg)
    return images, masks
