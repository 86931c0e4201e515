"""Predict in bounded memory: the masks ``predict_files`` writes from strips equal the argmax of the
full-size logits the old path held (whole image: ``F.interpolate`` of the model's logits; tiled: a
blend over one full-size canvas), for any image size and strip height; big images are decoded
and predicted a few at a time.

The references are built here from ``model.apply`` directly, not through ``Predictor``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny_models import make_checkpoint

from functional_seg.data.sample import fit_image
from functional_seg.models import load_checkpoint
from functional_seg.predict import Predictor, predict_files
from functional_seg.runtime import resolve_runtime
from functional_seg.strips import tiling, window_weight

S = 32


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "segnet.safetensors"
    model, params, state, pre = make_checkpoint(path, "segnet", size=S)
    return path, model, params, state, pre


@pytest.fixture(scope="module")
def base(saved) -> Predictor:
    return Predictor.from_checkpoint(load_checkpoint(saved[0]), resolve_runtime("cpu", "fp32"))


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth structure plus noise, so masks have regions and boundaries."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 100 * np.sin(xx / 7.0 + seed)[..., None] * np.cos(yy / 5.0)[..., None]
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def _apply(saved, x: torch.Tensor) -> torch.Tensor:
    _, model, params, state, _ = saved
    with torch.no_grad():
        return model.apply(params, state, x, train=False)[0]


def _whole_reference(saved, image: np.ndarray) -> torch.Tensor:
    """The old whole path: fit to S, one forward, crop, ``F.interpolate`` to full size: [C, H, W]."""
    pre = saved[4]
    fitted, (x0, y0, w, h) = fit_image(Image.fromarray(image), S, pre.policy)
    x = pre.model_input(torch.from_numpy(np.array(fitted)).permute(2, 0, 1)[None])
    small = _apply(saved, x)[:, :, y0:y0 + h, x0:x0 + w]
    return F.interpolate(small, size=image.shape[:2], mode="bilinear", align_corners=False)[0]


def _tiled_reference(saved, image: np.ndarray, tile: int, overlap: float) -> torch.Tensor:
    """The old tiled path: the normalised image padded by edge replication, every window's weighted
    logits summed on one full-size canvas, divided by the summed weights: [C, H, W]."""
    plan = tiling(image.shape[:2], tile, overlap, saved[1].stride)
    (win_h, win_w), (full_h, full_w), (h, w) = plan.window, plan.canvas, plan.size
    x = saved[4].model_input(torch.from_numpy(image).permute(2, 0, 1)[None])
    x = F.pad(x, (0, full_w - w, 0, full_h - h), mode="replicate")
    weight = window_weight(win_h, win_w)
    total, norm = torch.zeros(3, full_h, full_w), torch.zeros(1, full_h, full_w)
    for y, x0 in plan.boxes:
        total[:, y:y + win_h, x0:x0 + win_w] += _apply(saved, x[:, :, y:y + win_h, x0:x0 + win_w])[0] * weight
        norm[:, y:y + win_h, x0:x0 + win_w] += weight
    return (total / norm)[:, :h, :w]


def _assert_argmax(mask: np.ndarray, logits: torch.Tensor) -> None:
    """``mask`` is the argmax of ``logits`` wherever the top two are more than float noise apart."""
    top2 = logits.topk(2, dim=0).values
    clear = (top2[0] - top2[1] > 1e-4).numpy()
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(mask[clear], logits.argmax(0).numpy()[clear])


def _predict_mask(base: Predictor, tmp_path, image: np.ndarray, **kwargs) -> np.ndarray:
    Image.fromarray(image).save(tmp_path / "img.png")
    predictor = dataclasses.replace(base, **kwargs)
    report = predict_files(predictor, [tmp_path / "img.png"], tmp_path / "out", overlay=False)
    assert report.failed == 0
    with Image.open(tmp_path / "out" / "img_mask.png") as mask:
        return np.asarray(mask)


@given(h=st.integers(4, 48), w=st.integers(4, 48), rows=st.sampled_from([1, 4, 9, 24]), seed=st.integers(0, 1000))
@settings(max_examples=6)
def test_whole_image_masks_from_strips_equal_the_full_size_argmax(saved, base, tmp_path_factory, h, w, rows, seed):
    image = _image(h, w, seed)
    mask = _predict_mask(base, tmp_path_factory.mktemp("p"), image, strip_bytes=rows * 3 * w * 4)
    _assert_argmax(mask, _whole_reference(saved, image))


@given(h=st.integers(4, 48), w=st.integers(4, 48), rows=st.sampled_from([1, 4, 9, 24]),
       tile=st.sampled_from([16, 24, 32]), overlap=st.sampled_from([0.0, 0.25, 0.5]), batch=st.integers(1, 5),
       seed=st.integers(0, 1000))
@settings(max_examples=6)
def test_tiled_masks_from_bands_equal_the_full_canvas_argmax(saved, base, tmp_path_factory, h, w, rows, tile,
                                                            overlap, batch, seed):
    image = _image(h, w, seed)
    mask = _predict_mask(base, tmp_path_factory.mktemp("p"), image, tile=tile, tile_overlap=overlap,
                         batch_size=batch, strip_bytes=rows * 3 * w * 4)
    _assert_argmax(mask, _tiled_reference(saved, image, tile, overlap))


def test_logits_of_small_images_match_the_references(saved, base):
    image = _image(45, 61, 3)
    whole = dataclasses.replace(base, strip_bytes=7 * 3 * 61 * 4).logits([image])[0]
    torch.testing.assert_close(whole, _whole_reference(saved, image), rtol=1e-5, atol=1e-5)
    tiled = dataclasses.replace(base, tile=16, strip_bytes=7 * 3 * 61 * 4).logits([image])[0]
    torch.testing.assert_close(tiled, _tiled_reference(saved, image, 16, 0.25), rtol=1e-5, atol=1e-5)


def test_big_images_are_decoded_and_predicted_a_few_at_a_time(base, tmp_path):
    """A batch stops at ``max_batch_pixels`` decoded pixels (a big image alone), whatever batch_size says."""
    sizes = [(60, 60), (40, 50), (40, 50), (10, 10), (10, 10), (40, 50)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(_image(h, w, i)).save(tmp_path / f"{i}.png")
    predictor = dataclasses.replace(base, batch_size=8)
    batches, strips = [], predictor.strips

    def recorded(images):
        batches.append([image.shape[:2] for image in images])
        return strips(images)

    predictor.strips = recorded
    report = predict_files(predictor, [tmp_path / f"{i}.png" for i in range(len(sizes))], tmp_path / "out",
                           overlay=False, max_batch_pixels=3000)
    assert report.failed == 0 and len(report.results) == len(sizes)
    assert batches == [[(60, 60)], [(40, 50), (40, 50)], [(10, 10), (10, 10), (40, 50)]]
