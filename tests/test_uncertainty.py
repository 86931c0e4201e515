"""Tests for functional_seg.uncertainty: entropy bounds, mutual-information laws, a numpy
cross-check, flip views, the 16-bit scale and the heat-map colouring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from functional_seg import uncertainty as U


@st.composite
def member_logits(draw, max_k: int = 4, max_c: int = 5, max_side: int = 5) -> torch.Tensor:
    """float32 [K, N, C, H, W], scales up to 1e4 to probe saturated softmax."""
    k, n, c = draw(st.integers(1, max_k)), draw(st.integers(1, 2)), draw(st.integers(2, max_c))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 1e4]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    return scale * torch.randn(k, n, c, h, w, generator=g)


def numpy_maps(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entropy of the mean and mutual information, in float64 numpy, straight from the definitions."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)

    def entropy(q):
        return -np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(axis=-3)

    total = entropy(p.mean(axis=0))
    return total, total - entropy(p).mean(axis=0)


def test_entropy_is_zero_for_one_hot_and_log_c_for_uniform():
    c = 5
    one_hot = 1e4 * torch.nn.functional.one_hot(torch.tensor([[[0, 3], [4, 1]]]), c).permute(0, 3, 1, 2).float()
    assert torch.equal(U.predictive_entropy(one_hot[None]), torch.zeros(1, 2, 2))
    assert torch.equal(U.expected_entropy(one_hot[None]), torch.zeros(1, 2, 2))
    uniform = torch.full((3, 1, c, 2, 2), 7.0)
    torch.testing.assert_close(U.predictive_entropy(uniform), torch.full((1, 2, 2), math.log(c)))
    # Two confident members that disagree: the mean is (1/2, 1/2, 0, ...): entropy log 2, all of it
    # mutual information (each member alone is certain).
    disagree = torch.stack([one_hot, one_hot.roll(1, dims=1)])
    total, mi = U.uncertainty_maps(disagree)
    torch.testing.assert_close(total, torch.full((1, 2, 2), math.log(2)))
    torch.testing.assert_close(mi, torch.full((1, 2, 2), math.log(2)))


@given(member_logits())
def test_entropy_bounds_and_mutual_information_laws(logits):
    k, _, c = logits.shape[:3]
    total, mi = U.uncertainty_maps(logits)
    aleatoric = U.expected_entropy(logits)
    tol = 1e-5
    assert total.shape == mi.shape == logits.shape[1:2] + logits.shape[3:]
    assert (total >= -tol).all() and (total <= math.log(c) + tol).all()
    assert (aleatoric >= -tol).all() and (aleatoric <= total + tol).all()
    assert (mi >= 0).all() and (mi <= min(math.log(k), math.log(c)) + tol).all()
    torch.testing.assert_close(U.predictive_entropy(logits), total)
    torch.testing.assert_close(U.mutual_information(logits), mi)
    # Members that agree carry no mutual information.
    same = logits[:1].expand(3, *logits.shape[1:])
    assert (U.mutual_information(same) <= 1e-6).all()
    ref_total, ref_mi = numpy_maps(logits.numpy())
    np.testing.assert_allclose(total.numpy(), ref_total, atol=2e-5)
    np.testing.assert_allclose(mi.numpy(), np.maximum(ref_mi, 0.0), atol=2e-5)


def test_flip_views():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 4, 6, generator=g)
    weight = torch.randn(5, 3, generator=g)

    def per_pixel(x):  # commutes with flips: both views agree exactly
        return torch.einsum("kc,nchw->nkhw", weight, x)

    views = U.flip_views(per_pixel, images)
    assert views.shape == (2, 2, 5, 4, 6) and torch.equal(views[0], views[1])
    assert (U.mutual_information(views) <= 1e-6).all()
    ramp = torch.linspace(-3, 3, 6)

    def position_aware(x):  # favours class 0 on the right: the mirrored view disagrees
        logits = per_pixel(x)
        return torch.cat([logits[:, :1] + ramp, logits[:, 1:]], dim=1)

    views = U.flip_views(position_aware, images)
    torch.testing.assert_close(views[1], position_aware(images.flip(-1)).flip(-1))
    assert (U.mutual_information(views) > 1e-3).any()
    ensemble = U.flip_views(lambda x: torch.stack([per_pixel(x), position_aware(x)]), images)
    assert ensemble.shape == (4, 2, 5, 4, 6)
    torch.testing.assert_close(ensemble[3], position_aware(images.flip(-1)).flip(-1))
    with pytest.raises(ValueError, match="predict must return logits"):
        U.flip_views(lambda x: x[:, 0], images)


def test_uint16_scale_round_trip_and_png(tmp_path):
    nats = torch.tensor([[0.0, math.log(3), math.nan], [1e-4, 6.5535, 10.0]])
    units = U.to_uint16(nats)
    assert units.dtype == torch.uint16
    # 10 000 units per nat: log 3 = 1.098612 nats -> 10986; NaN -> 0; saturation at 65535.
    assert units.int().tolist() == [[0, 10986, 0], [1, 65535, 65535]]
    back = U.from_uint16(units)
    assert abs(back[0, 1].item() - math.log(3)) <= 0.5 / U.UINT16_PER_NAT
    path = U.write_uint16_png(tmp_path / "u.png", units)
    with Image.open(path) as image:
        assert image.mode == "I;16"
        assert np.asarray(image).astype(int).tolist() == units.int().tolist()
    with pytest.raises(ValueError, match="torch.uint16"):
        U.write_uint16_png(tmp_path / "bad.png", nats)


def test_heatmap_ramps_up_in_luminance_and_overlays():
    values = torch.linspace(0, 2, 101).view(1, 101)
    rgb = U.heatmap(values, vmax=2.0)
    assert rgb.dtype == torch.uint8 and rgb.shape == (1, 101, 3)
    luma = (rgb.double() @ torch.tensor([0.2126, 0.7152, 0.0722], dtype=torch.float64))[0]
    assert (luma[1:] >= luma[:-1]).all() and luma[-1] - luma[0] > 200
    assert rgb[0, 0].tolist() == [0, 0, 4] and rgb[0, -1].tolist() == [252, 255, 164]
    # Clamped outside [vmin, vmax]; NaN (no value) is mid grey.
    outside = U.heatmap(torch.tensor([[-1.0, 5.0, math.nan]]), vmax=2.0)
    assert outside[0].tolist() == [[0, 0, 4], [252, 255, 164], [128, 128, 128]]
    image = torch.full((1, 101, 3), 200, dtype=torch.uint8)
    assert torch.equal(U.overlay(image, rgb, alpha=0.0), image)
    assert torch.equal(U.overlay(image, rgb, alpha=1.0), rgb)
    half = U.overlay(image, rgb, alpha=0.5)
    assert (half.int() - (image.int() + rgb.int()) / 2).abs().max() <= 0.5
    with pytest.raises(ValueError, match="vmax > vmin"):
        U.heatmap(values, vmax=0.0)


def test_uncertainty_under_vmap_and_compile_and_bad_input():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 1, 4, 5, 5, generator=g)  # vmapped over 2 groups of K = 3 members
    maps = torch.func.vmap(lambda lg: torch.stack(U.uncertainty_maps(lg)))(logits)
    torch.testing.assert_close(maps, torch.stack([torch.stack(U.uncertainty_maps(lg)) for lg in logits]))
    torch._dynamo.reset()
    compiled = torch.compile(lambda lg: U.uncertainty_maps(lg), fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(logits[0]), U.uncertainty_maps(logits[0])):
        torch.testing.assert_close(got, want)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"\[K, N, C, H, W\]"):
        U.predictive_entropy(torch.zeros(1, 3, 4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_uncertainty_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 2, 5, 17, 23, generator=g)
    for got, want in zip(U.uncertainty_maps(logits.cuda()), U.uncertainty_maps(logits)):
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
    nats = U.predictive_entropy(logits)
    assert torch.equal(U.heatmap(nats.cuda(), vmax=math.log(5)).cpu(), U.heatmap(nats, vmax=math.log(5)))
