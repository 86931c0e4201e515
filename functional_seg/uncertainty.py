"""Per-pixel predictive uncertainty from several predictions of the same images, and its pictures.

The input is logits float [K, N, C, H, W]: K ensemble members, K test-time views
(:func:`flip_views`), or both flattened into one axis; one model is ``logits[None]``. With
p_k = softmax(logits_k) and the mean p = mean_k p_k (all in nats, natural logarithms):

- ``predictive_entropy`` H[p] = -sum_c p_c log p_c: total uncertainty, 0 for a one-hot mean
  and log C for a uniform one;
- ``expected_entropy`` mean_k H[p_k]: the part each member already has (aleatoric);
- ``mutual_information`` H[p] - mean_k H[p_k] >= 0 (Jensen): how much the members disagree
  (epistemic; Depeweg et al. 2018, "BALD" of Houlsby et al. 2011), 0 when they agree.

Each map is float [N, H, W]. ``to_uint16`` stores a map in 16-bit PNG units of a fixed scale,
:data:`UINT16_PER_NAT` per nat, so files from any model, dataset or run compare directly;
``heatmap`` colours a map (uint8 RGB) and ``overlay`` blends colours onto an image. Everything
is a pure tensor function (vmap- and compile-safe) except the PNG writer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .core.files import write_atomic
from .options import TTA_MODES

__all__ = [
    "UINT16_PER_NAT",
    "mean_probs",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "uncertainty_maps",
    "flip_views",
    "check_tta",
    "to_uint16",
    "from_uint16",
    "write_uint16_png",
    "heatmap",
    "overlay",
]

#: 16-bit units per nat: 1 unit = 1e-4 nats, saturating at 6.5535 nats (log C for C up to 701).
UINT16_PER_NAT = 10_000

# An inferno-like ramp (anchors after matplotlib's "inferno" at 0, 1/8, ..., 1): black through
# purple, red and orange to pale yellow, luminance rising monotonically, readable in grey.
_RAMP = (
    (0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
    (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164),
)
_NAN_COLOUR = (128, 128, 128)  # pixels without a value (ignored, NaN): mid grey


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point or logits.ndim != 5:
        got = f"dtype={logits.dtype}, shape={list(logits.shape)}" if isinstance(logits, Tensor) else type(logits)
        raise ValueError(f"logits must be a float tensor [K, N, C, H, W] (K members or views); got {got}")


def _upcast(logits: Tensor) -> Tensor:
    """Half-precision logits are upcast: log-probabilities near 0 need float32."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _entropy(probs: Tensor) -> Tensor:
    """-sum_c p_c log p_c over the class axis (-3), with 0 log 0 = 0 (xlogy: no NaN when saturated)."""
    return -torch.special.xlogy(probs, probs).sum(dim=-3)


def _probs(logits: Tensor) -> Tensor:
    _check_logits(logits)
    return torch.softmax(_upcast(logits), dim=2)


def mean_probs(logits: Tensor) -> Tensor:
    """The mean of the K softmax distributions: float [N, C, H, W] (the ensemble's prediction)."""
    return _probs(logits).mean(dim=0)


def predictive_entropy(logits: Tensor) -> Tensor:
    """H[mean_k softmax(logits_k)] per pixel, nats in [0, log C]: float [N, H, W]."""
    return _entropy(mean_probs(logits))


def expected_entropy(logits: Tensor) -> Tensor:
    """mean_k H[softmax(logits_k)] per pixel, nats in [0, log C]: float [N, H, W]."""
    return _entropy(_probs(logits)).mean(dim=0)


def uncertainty_maps(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(predictive entropy, mutual information), float [N, H, W] each, from one softmax.

    Both entropies use one formula, so members that agree give 0 up to the rounding of their
    mean; mutual information, >= 0 in exact arithmetic, is clamped at 0 against that rounding.
    """
    p = _probs(logits)
    total = _entropy(p.mean(dim=0))
    return total, (total - _entropy(p).mean(dim=0)).clamp_min(0.0)


def mutual_information(logits: Tensor) -> Tensor:
    """H[mean_k p_k] - mean_k H[p_k] per pixel (disagreement between the K), float [N, H, W]."""
    return uncertainty_maps(logits)[1]


def flip_views(predict: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """Logits of the images and of their mirror images (flipped back): two test-time views.

    Args:
        predict: images float [N, 3, H, W] -> logits [N, C, H, W], or [K, N, C, H, W] for an
            ensemble (a bound, eval-mode ``apply``).
        images: float [N, 3, H, W].

    Returns:
        float [2, N, C, H, W] (or [2K, N, C, H, W]: the K members on the images, then on the
        mirrors), aligned pixel for pixel, ready for the functions above.
    """
    plain = predict(images)
    mirrored = predict(images.flip(-1)).flip(-1)
    if plain.ndim == 4:
        return torch.stack([plain, mirrored])
    if plain.ndim == 5:
        return torch.cat([plain, mirrored])
    raise ValueError(f"predict must return logits [N, C, H, W] or [K, N, C, H, W]; got shape {list(plain.shape)}")


def check_tta(tta: str) -> None:
    """Refuse a test-time view mode other than ``options.TTA_MODES`` ("none"; "flip": ``flip_views``)."""
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta {tta!r}; expected one of {', '.join(TTA_MODES)}")


def to_uint16(nats: Tensor) -> Tensor:
    """A map in nats as 16-bit PNG units: round(nats x :data:`UINT16_PER_NAT`), clamped to [0, 65535].

    Args:
        nats: float [..., H, W]; NaN (no value, e.g. an ignored pixel) becomes 0.

    Returns:
        torch.uint16 [..., H, W]: ``.numpy()`` is a uint16 array that PIL saves as a 16-bit
        PNG (:func:`write_uint16_png`). torch implements few operations on uint16; convert
        with ``.int()`` for arithmetic.
    """
    scaled = torch.nan_to_num(nats.double() * UINT16_PER_NAT, nan=0.0).round().clamp(0, 65535)
    return scaled.to(torch.int32).to(torch.uint16)


def from_uint16(units: Tensor) -> Tensor:
    """The inverse of :func:`to_uint16`: units [..., H, W] -> nats float32 (to 5e-5 nats)."""
    return units.to(torch.int32).to(torch.float32) / UINT16_PER_NAT


def write_uint16_png(path: str | os.PathLike, units: Tensor) -> Path:
    """Write one map of :func:`to_uint16` units, uint16 [H, W], as a 16-bit greyscale PNG, atomically,
    with the library's PNG mark (``render.MARK``)."""
    from PIL import Image

    from .render import png_bytes

    if not isinstance(units, Tensor) or units.ndim != 2 or units.dtype != torch.uint16:
        got = f"dtype={units.dtype}, shape={list(units.shape)}" if isinstance(units, Tensor) else type(units)
        raise ValueError(f"units must be a torch.uint16 tensor [H, W] from to_uint16; got {got}")
    return write_atomic(path, png_bytes(Image.fromarray(units.cpu().numpy())))  # marked as ours (render.MARK)


def heatmap(values: Tensor, *, vmax: float, vmin: float = 0.0) -> Tensor:
    """Colour a map with an inferno-like ramp: uint8 RGB [..., H, W, 3].

    Values are scaled linearly from [vmin, vmax] to [0, 1] and clamped; colours interpolate
    linearly between nine anchors. Use a fixed ``vmax`` (``math.log(C)`` for entropies) so
    colours compare across images. NaN pixels are mid grey.

    Args:
        values: float [..., H, W].
        vmax, vmin: the values shown as the brightest and the darkest colour.
    """
    if not isinstance(vmax, int | float) or not isinstance(vmin, int | float) or not vmax > vmin:
        raise ValueError(f"heatmap needs vmax > vmin; got vmin={vmin!r}, vmax={vmax!r}")
    ramp = torch.tensor(_RAMP, dtype=torch.float32, device=values.device)
    t = ((values.float() - vmin) / (vmax - vmin)).clamp(0.0, 1.0) * (len(_RAMP) - 1)
    low = t.floor().clamp(max=len(_RAMP) - 2)
    frac = (t - low).nan_to_num(0.0).unsqueeze(-1)
    low = low.nan_to_num(0.0).long()
    rgb = ramp[low] * (1 - frac) + ramp[low + 1] * frac
    nan = torch.tensor(_NAN_COLOUR, dtype=torch.float32, device=values.device)
    return torch.where(values.isnan().unsqueeze(-1), nan, rgb).round().to(torch.uint8)


def overlay(image: Tensor, colours: Tensor, *, alpha: float = 0.5) -> Tensor:
    """Blend colours onto an image: round((1 - alpha) image + alpha colours), uint8 [..., H, W, 3]."""
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise ValueError(f"alpha must lie in [0, 1]; got {alpha!r}")
    if image.shape != colours.shape or image.dtype != torch.uint8 or colours.dtype != torch.uint8:
        raise ValueError(f"image and colours must be uint8 [..., H, W, 3] of one shape; got "
                         f"{image.dtype} {list(image.shape)} and {colours.dtype} {list(colours.shape)}")
    return ((1 - alpha) * image.float() + alpha * colours.float()).round().to(torch.uint8)
