"""Laws and worked examples for the pure batched augmentation in ``functional_seg.data.augment``."""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from functional_seg.core import random as jr
from functional_seg.data import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    AugmentConfig,
    augment,
    augment_preset,
    normalize,
    to_float,
)
from functional_seg.data.augmentation import _adjust_hue, _blend, _crop_boxes, _gray, _gray_mean, hsv_to_rgb, rgb_to_hsv

PROPERTY = settings(max_examples=25, deadline=None)

configs = st.builds(
    AugmentConfig,
    hflip=st.sampled_from([0.0, 0.5, 1.0]),
    brightness=st.sampled_from([0.0, 0.4]),
    contrast=st.sampled_from([0.0, 0.3]),
    saturation=st.sampled_from([0.0, 0.3]),
    hue=st.sampled_from([0.0, 0.1, 0.5]),
    crop_scale=st.sampled_from([None, (0.3, 1.0), (1.0, 1.0)]),
    crop_ratio=st.sampled_from([(3 / 4, 4 / 3), (0.2, 5.0)]),
    crop_p=st.sampled_from([1.0, 0.5]),
)
geometric_configs = st.builds(
    AugmentConfig,
    hflip=st.sampled_from([0.0, 0.5, 1.0]),
    crop_scale=st.sampled_from([(0.1, 1.0), (0.5, 1.0), (1.0, 1.0)]),
    crop_ratio=st.sampled_from([(3 / 4, 4 / 3), (0.25, 4.0)]),
    crop_p=st.sampled_from([1.0, 0.5]),
)


@st.composite
def batches(draw, labels=(0, 1, 2)):
    """(images float [N, 3, H, W] in [0, 1], masks int64 [N, H, W]) with N <= 4 and H, W <= 32."""
    n, h, w = draw(st.integers(1, 4)), draw(st.integers(1, 32)), draw(st.integers(1, 32))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    images = torch.rand((n, 3, h, w), generator=g)
    label_set = torch.tensor(
        draw(st.lists(st.sampled_from(labels), min_size=1, max_size=len(labels), unique=True))
    )
    masks = label_set[torch.randint(0, len(label_set), (n, h, w), generator=g)]
    return images, masks


keys = st.integers(0, 2**62).map(jr.key)


# ---------------------------------------------------------------------------------------------- laws


@PROPERTY
@given(keys, batches(), configs)
def test_same_key_same_output_and_inputs_untouched(key, batch, cfg):
    images, masks = batch[0].clone(), batch[1].clone()
    a_img, a_mask = augment(key, *batch, cfg)
    b_img, b_mask = augment(key.clone(), images.clone(), masks.clone(), cfg)
    assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask)
    assert torch.equal(batch[0], images) and torch.equal(batch[1], masks)


@PROPERTY
@given(keys, batches(labels=(0, 1, 2, IGNORE_INDEX)), configs)
def test_shapes_dtypes_range_and_no_new_labels(key, batch, cfg):
    images, masks = batch
    out_img, out_mask = augment(key, images, masks, cfg)
    assert out_img.shape == images.shape and out_img.dtype == images.dtype
    assert out_mask.shape == masks.shape and out_mask.dtype == masks.dtype
    assert out_img.min() >= 0.0 and out_img.max() <= 1.0
    assert set(out_mask.unique().tolist()) <= set(masks.unique().tolist())


@PROPERTY
@given(keys, batches(), st.sampled_from([0.0, 0.3, 0.5, 1.0]))
def test_flip_twice_with_the_same_key_is_identity(key, batch, p):
    cfg = AugmentConfig(hflip=p)
    once = augment(key, *batch, cfg)
    twice = augment(key, *once, cfg)
    assert torch.equal(twice[0], batch[0]) and torch.equal(twice[1], batch[1])


@PROPERTY
@given(keys, batches(), geometric_configs)
def test_geometric_ops_move_image_and_mask_together(key, batch, cfg):
    """Plant the mask in the image as a one-hot code: every output pixel's label must be one of the
    (bilinear) sources of its image value, and a pure code must decode to the mask's label."""
    _, masks = batch
    images = torch.nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float()
    out_img, out_mask = augment(key, images, masks, cfg)
    # The nearest source of a bilinear sample carries weight >= 1/4.
    weight_of_label = out_img.gather(1, out_mask.unsqueeze(1))
    assert weight_of_label.min() >= 0.25 - 1e-4
    pure = out_img.amax(1) > 1 - 1e-4
    assert torch.equal(out_img.argmax(1)[pure], out_mask[pure])


@PROPERTY
@given(keys, batches(), configs)
def test_colour_jitter_leaves_masks_alone(key, batch, cfg):
    jitter_only = AugmentConfig(
        brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation, hue=cfg.hue
    )
    _, out_mask = augment(key, *batch, jitter_only)
    assert torch.equal(out_mask, batch[1])


@PROPERTY
@given(st.integers(0, 2**31))
def test_hsv_round_trip(seed):
    x = torch.rand((2, 3, 5, 7), generator=torch.Generator().manual_seed(seed))
    x[0, :, 0, 0] = 0.5  # a grey pixel: hue undefined, must still round-trip
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- examples


def test_hflip_one_flips_every_sample_exactly(key):
    images = torch.rand((3, 3, 4, 6), generator=torch.Generator().manual_seed(0))
    masks = torch.arange(24).reshape(1, 4, 6).repeat(3, 1, 1) % 3
    out_img, out_mask = augment(key, images, masks, AugmentConfig(hflip=1.0))
    assert torch.equal(out_img, images.flip(-1)) and torch.equal(out_mask, masks.flip(-1))


def test_draws_are_per_sample(key):
    images = torch.linspace(0, 1, 8).reshape(1, 1, 1, 8).expand(64, 3, 2, 8).contiguous()
    masks = torch.zeros((64, 2, 8), dtype=torch.int64)
    out, _ = augment(key, images, masks, AugmentConfig(hflip=0.5))
    flipped = (out[:, 0, 0, 0] == 1.0).sum().item()
    assert 16 < flipped < 48  # some flipped, some not
    out, _ = augment(key, images, masks, AugmentConfig(brightness=0.5))
    assert out[:, 0, 0, 4].unique().numel() > 32  # 64 independent brightness factors


def test_different_keys_differ(rng_key):
    images = torch.rand((4, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    masks = torch.zeros((4, 16, 16), dtype=torch.int64)
    cfg = augment_preset("flip_jitter_crop")
    a, _ = augment(rng_key(1), images, masks, cfg)
    b, _ = augment(rng_key(2), images, masks, cfg)
    assert not torch.equal(a, b)


def test_none_preset_is_identity(key):
    images = torch.rand((2, 3, 8, 8), generator=torch.Generator().manual_seed(2))
    masks = torch.ones((2, 8, 8), dtype=torch.int64)
    out = augment(key, images, masks, augment_preset("none"))
    assert out[0] is images and out[1] is masks


def test_full_area_square_crop_is_identity(key):
    images = torch.rand((3, 3, 9, 9), generator=torch.Generator().manual_seed(3))
    masks = torch.randint(0, 3, (3, 9, 9), generator=torch.Generator().manual_seed(4))
    out_img, out_mask = augment(
        key, images, masks, AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    )
    torch.testing.assert_close(out_img, images, atol=1e-5, rtol=0)
    assert torch.equal(out_mask, masks)


@PROPERTY
@given(keys, st.integers(1, 1024), st.integers(1, 1024), geometric_configs)
def test_crop_boxes_on_non_square_images_keep_area_and_pixel_aspect(key, height, width, cfg):
    """Cityscapes-like H != W: every box lies inside the image; a box from a candidate that fit has
    its area fraction in ``crop_scale`` and its aspect IN PIXELS (w W) / (h H) in ``crop_ratio``; the
    fallback box is the widest (or tallest) centred-ratio crop, as torchvision's."""
    box = _crop_boxes(key, 64, height, width, cfg).double()
    x0, y0, w, h = box.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    lo, hi = cfg.crop_scale
    aspect = (w * width) / (h * height)
    fitted = ((w * h - lo) > -1e-5) & ((w * h - hi) < 1e-5) & (aspect > cfg.crop_ratio[0] * (1 - 1e-5)) & (
        aspect < cfg.crop_ratio[1] * (1 + 1e-5))
    in_ratio = width / height
    fallback = torch.isclose(w, torch.full_like(w, min(1.0, cfg.crop_ratio[1] / in_ratio))) & torch.isclose(
        h, torch.full_like(h, min(1.0, in_ratio / cfg.crop_ratio[0])))
    assert (fitted | fallback).all()


def test_full_area_crop_of_a_wide_image_is_identity(key):
    """512x1024-like (here 6 x 12): a full-area crop at the image's own aspect 2 is the image."""
    images = torch.rand((3, 3, 6, 12), generator=torch.Generator().manual_seed(5))
    masks = torch.randint(0, 3, (3, 6, 12), generator=torch.Generator().manual_seed(6))
    out_img, out_mask = augment(key, images, masks, AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(2.0, 2.0)))
    torch.testing.assert_close(out_img, images, atol=1e-5, rtol=0)
    assert torch.equal(out_mask, masks)


def test_crop_zooms_in(key):
    """A quarter-area crop of a 2x2 checkerboard of labels magnifies it: runs of equal labels get longer."""
    masks = torch.zeros((8, 32, 32), dtype=torch.int64)
    masks[:, ::2, ::2] = 1  # period-2 pattern
    images = masks.unsqueeze(1).expand(-1, 3, -1, -1).float()
    _, out = augment(key, images, masks, AugmentConfig(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0)))
    changes_in = (masks[:, :, 1:] != masks[:, :, :-1]).sum()
    changes_out = (out[:, :, 1:] != out[:, :, :-1]).sum()
    assert changes_out < 0.75 * changes_in


def test_brightness_factor_range(key):
    images = torch.full((256, 3, 2, 2), 0.25)
    masks = torch.zeros((256, 2, 2), dtype=torch.int64)
    out, _ = augment(key, images, masks, AugmentConfig(brightness=0.5))
    factors = out[:, 0, 0, 0] / 0.25
    assert factors.min() >= 0.5 - 1e-6 and factors.max() <= 1.5 + 1e-6
    assert factors.min() < 0.6 and factors.max() > 1.4
    assert torch.equal(out, out[:, :1, :1, :1].expand_as(out))  # one factor per sample, all pixels


@pytest.mark.parametrize("factor", [0.0, 0.7, 1.3])
def test_contrast_and_saturation_match_torchvision(factor):
    x = torch.rand((2, 3, 6, 5), generator=torch.Generator().manual_seed(5))
    f = torch.full((2,), factor)
    ours_c = _blend(x, _gray_mean(x), f)
    ours_s = _blend(x, _gray(x), f)
    for i in range(2):
        torch.testing.assert_close(ours_c[i], TF.adjust_contrast(x[i], factor), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours_s[i], TF.adjust_saturation(x[i], factor), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift", [-0.5, -0.1, 0.0, 0.25, 0.5])
def test_hue_matches_torchvision(shift):
    x = torch.rand((2, 3, 6, 5), generator=torch.Generator().manual_seed(6))
    x[0, :, 0, 0] = 0.5  # grey
    x[1, :, 0, 0] = torch.tensor([0.2, 0.2, 0.7])  # two channels tie
    want = TF.adjust_hue(x, shift)
    torch.testing.assert_close(_adjust_hue(x, torch.full((2,), shift)), want, atol=1e-5, rtol=0)
    hsv = rgb_to_hsv(x)
    hsv = torch.cat([torch.remainder(hsv[:, :1] + shift, 1.0), hsv[:, 1:]], 1)
    torch.testing.assert_close(hsv_to_rgb(hsv), want, atol=1e-5, rtol=0)


def test_hsv_matches_torchvision_internals():
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

    x = torch.rand((2, 3, 6, 5), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(rgb_to_hsv(x), _rgb_to_hsv(x), atol=1e-6, rtol=0)
    hsv = rgb_to_hsv(x)
    torch.testing.assert_close(hsv_to_rgb(hsv), _hsv_to_rgb(hsv), atol=1e-6, rtol=0)


def test_compile_fullgraph_matches_eager(key):
    """The whole augmentation traces as one graph (aot_eager: the tracing check without a C++ build)."""
    images = torch.rand((4, 3, 16, 16), generator=torch.Generator().manual_seed(7))
    masks = torch.randint(0, 3, (4, 16, 16), generator=torch.Generator().manual_seed(8))
    fn = functools.partial(augment, cfg=augment_preset("flip_jitter_crop"))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for seed in (0, 1):
        k = jr.fold_in(key, seed)
        got, want = compiled(k, images, masks), fn(k, images, masks)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(got[1], want[1])


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("FSEG_SLOW_TESTS"),
    reason="cold inductor C++ build takes minutes on 2 cores; FSEG_SLOW_TESTS=1",
)
def test_compile_inductor_matches_eager(key):
    images = torch.rand((4, 3, 16, 16), generator=torch.Generator().manual_seed(7))
    masks = torch.randint(0, 3, (4, 16, 16), generator=torch.Generator().manual_seed(8))
    fn = functools.partial(augment, cfg=augment_preset("flip_jitter_crop"))
    got, want = torch.compile(fn, fullgraph=True)(key, images, masks), fn(key, images, masks)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(got[1], want[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_batch_device(key):
    images = torch.rand((4, 3, 16, 16), device="cuda")
    masks = torch.randint(0, 3, (4, 16, 16), device="cuda")
    cfg = augment_preset("flip_jitter_crop")
    out_img, out_mask = augment(key, images, masks, cfg)  # key on the CPU, batch on the GPU
    assert out_img.device == images.device and out_mask.device == masks.device
    cpu = augment(key, images.cpu(), masks.cpu(), cfg)
    torch.testing.assert_close(out_img.cpu(), cpu[0], atol=1e-4, rtol=1e-4)
    assert (out_mask.cpu() != cpu[1]).float().mean() < 0.01  # nearest ties may round differently


def test_normalize_and_to_float():
    u8 = torch.tensor([0, 255, 51], dtype=torch.uint8).reshape(1, 3, 1, 1)
    x = to_float(u8)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.flatten(), torch.tensor([0.0, 1.0, 0.2]))
    y = normalize(x)
    want = (x.flatten() - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(y.flatten(), want)
    torch.testing.assert_close(normalize(x, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), x)


def test_presets_and_config_validation():
    assert set(PRESETS) == {"none", "flip", "flip_jitter", "flip_jitter_full", "flip_jitter_crop"}
    assert augment_preset("flip_jitter") == AugmentConfig(hflip=0.5, contrast=0.3)
    assert augment_preset("flip_jitter_crop").crop_scale == (0.5, 1.0)
    with pytest.raises(ValueError, match="flip_jitter_full"):
        augment_preset("nope")
    for bad in (
        dict(hflip=1.5),
        dict(hue=0.6),
        dict(contrast=-1),
        dict(crop_scale=(0.0, 1.0)),
        dict(crop_p=2),
    ):
        with pytest.raises(ValueError):
            AugmentConfig(**bad)


def test_bad_arguments(key):
    images, masks = torch.rand((1, 3, 4, 4)), torch.zeros((1, 4, 4), dtype=torch.int64)
    with pytest.raises(ValueError, match="key"):
        augment(None, images, masks, AugmentConfig())
    with pytest.raises(TypeError, match="to_float"):
        augment(key, (images * 255).to(torch.uint8), masks, AugmentConfig())
    with pytest.raises(TypeError, match="masks"):
        augment(key, images, masks[:, :2], AugmentConfig())
