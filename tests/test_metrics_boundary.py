"""Tests for Boundary IoU (metrics.boundary_counts / boundary_iou): an independent scipy
implementation of the reference definition, hand-worked geometry, and laws (hypothesis).

The reference (bowenc0221/boundary-iou-api, boundary_utils.mask_to_boundary) erodes a binary
mask d times with a 3x3 kernel after zero padding; scipy.ndimage.binary_erosion with a 3x3
structuring element, ``iterations=d`` and ``border_value=0`` computes the same erosion.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from sample_data import SAMPLE
from scipy import ndimage

from functional_seg import metrics as M

RATIOS = (0.02, 0.05, 0.1, 0.25)


def reference_width(h: int, w: int, ratio: float) -> int:
    """The reference's band width: the ratio of the numpy diagonal, rounded, at least 1."""
    return max(int(round(ratio * np.sqrt(h**2 + w**2))), 1)


def reference_band(mask: np.ndarray, d: int) -> np.ndarray:
    eroded = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=d, border_value=0)
    return mask & ~eroded


def reference_counts(pred: np.ndarray, target: np.ndarray, c: int, ratio: float, ignore: int | None):
    """Per-class band intersection and union, each class's mask eroded on its own, ignored = outside."""
    n, h, w = target.shape
    d = reference_width(h, w, ratio)
    valid = (target >= 0) & (target < c) & (target != ignore if ignore is not None else True)
    inter, union = np.zeros(c, np.int64), np.zeros(c, np.int64)
    for i in range(n):
        for k in range(c):
            g = reference_band((target[i] == k) & valid[i], d)
            p = reference_band((pred[i] == k) & valid[i], d)
            inter[k] += (g & p).sum()
            union[k] += (g | p).sum()
    return inter, union


@st.composite
def blob_pairs(draw, max_side: int = 24):
    """(pred, target, C, ratio, ignore): blobby labels (coarse random labels, nearest-upsampled),
    so masks have interiors and not only boundaries; pred is the target with blobs relabelled."""
    n, c = draw(st.integers(1, 3)), draw(st.integers(2, 4))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    ratio = draw(st.sampled_from(RATIOS))
    ignore = draw(st.sampled_from([None, 255, 1]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))

    def blobs(k: int) -> torch.Tensor:
        coarse = torch.randint(0, k, (n, 1, 4, 4), generator=g).float()
        return torch.nn.functional.interpolate(coarse, size=(h, w), mode="nearest")[:, 0].long()

    target = blobs(c)
    pred = torch.where(blobs(2) == 1, blobs(c), target)
    if ignore is not None:
        target = torch.where(blobs(3) == 0, ignore, target)
    return pred, target, c, ratio, ignore


# ----------------------------------------------------------------------------- the reference definition


def test_boundary_width_follows_the_reference_rounding():
    # A 3 x 4 image has diagonal 5: half-way values round to even, and d is at least 1.
    assert M.boundary_width(3, 4, 0.5) == 2  # 2.5 -> 2
    assert M.boundary_width(3, 4, 0.3) == 2  # 1.5 -> 2
    assert M.boundary_width(3, 4, 0.7) == 4  # 3.5 -> 4
    assert M.boundary_width(3, 4, 0.01) == 1  # 0.05 -> 0 -> 1
    assert M.boundary_width(256, 256, 0.02) == 7  # 7.24
    for h, w, ratio in [(1, 1, 0.02), (512, 384, 0.02), (31, 17, 0.25), (100, 7, 0.05)]:
        assert M.boundary_width(h, w, ratio) == reference_width(h, w, ratio)


@given(blob_pairs())
def test_boundary_counts_match_an_independent_scipy_reference(pair):
    pred, target, c, ratio, ignore = pair
    inter, union = M.boundary_counts(pred, target, c, ignore_index=ignore, dilation_ratio=ratio)
    ref_inter, ref_union = reference_counts(pred.numpy(), target.numpy(), c, ratio, ignore)
    assert inter.dtype == union.dtype == torch.int64
    assert inter.tolist() == ref_inter.tolist() and union.tolist() == ref_union.tolist()


@given(blob_pairs(max_side=40))
def test_bands_equal_opencv_erosion_where_opencv_is_installed(pair):
    # The reference's own operations: pad one pixel of zeros, cv2.erode d times with a 3 x 3
    # kernel, crop, subtract. (OpenCV is no dependency; the GPU image has it.)
    cv2 = pytest.importorskip("cv2")
    pred, target, c, ratio, ignore = pair
    d = reference_width(*target.shape[1:], ratio)
    inter, union = np.zeros(c, np.int64), np.zeros(c, np.int64)
    for i in range(target.shape[0]):
        for k in range(c):
            bands = []
            for labels in (target[i], pred[i]):
                mask = ((labels == k) & (target[i] != (-1 if ignore is None else ignore))).numpy().astype(np.uint8)
                padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
                eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:-1, 1:-1]
                bands.append((mask - eroded).astype(bool))
            inter[k] += (bands[0] & bands[1]).sum()
            union[k] += (bands[0] | bands[1]).sum()
    ours = M.boundary_counts(pred, target, c, ignore_index=ignore, dilation_ratio=ratio)
    assert ours[0].tolist() == inter.tolist() and ours[1].tolist() == union.tolist()


def test_boundary_iou_by_hand():
    # 10 x 10, d = round(0.05 * 14.14) = 1. Truth: class 1 on the 6 x 6 square rows/cols 2..7,
    # prediction: the same square one pixel to the right (cols 3..8).
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[0, 2:8, 2:8] = 1
    pred = torch.zeros_like(target)
    pred[0, 2:8, 3:9] = 1
    inter, union = M.boundary_counts(pred, target, 2, dilation_ratio=0.05)
    # Class 1: each band is the square's 20-pixel ring; the rings share 5 + 5 pixels of the top
    # and bottom rows: 10 / (20 + 20 - 10).
    # Class 0: the truth's band is the 28-pixel ring around its square plus the 36 pixels along
    # the image border (64); the prediction's ring shares its 8 column-9 pixels with the border
    # (28 + 36 - 8 = 56); both have the border (36) and rows 1 and 8 at cols 2..8 (14): 50 / 70.
    assert inter.tolist() == [50, 10] and union.tolist() == [70, 30]
    torch.testing.assert_close(M.boundary_iou(inter, union), torch.tensor([5 / 7, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(M.boundary_iou(inter, union, average="macro").item(), (5 / 7 + 1 / 3) / 2)
    torch.testing.assert_close(M.boundary_iou(inter, union, average="micro").item(), 60 / 100)
    # The mask IoU of the same pair is much higher: 30 / 42 for class 1.
    assert M.iou(M.confusion_matrix(pred, target, 2))[1].item() == pytest.approx(30 / 42)


def test_each_class_is_eroded_on_its_own_mask():
    # Two classes side by side: each class's band runs along the shared edge and the image
    # border (zero padding): a 4 x 8 block minus its 2 x 6 core, 20 pixels for BOTH classes.
    # (Eroding the label map itself, as detectron2 does, gives class 0 no band at all: a
    # minimum filter never changes the smallest label.)
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :, 4:] = 1
    inter, union = M.boundary_counts(target, target, 2, dilation_ratio=0.01)  # d = 1
    assert inter.tolist() == union.tolist() == [4 * 8 - 2 * 6, 4 * 8 - 2 * 6]


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real Oxford-IIIT Pet sample not found at {SAMPLE}")
def test_real_trimaps_match_the_reference_and_weigh_boundary_errors_more():
    # Real masks (0 pet, 1 background, 2 the trimap's uncertain ring), predicted 3 pixels to the
    # right by a model that knows pet and background only. With the ring ignored (as VOC's void)
    # and with the ring taken as background: the counts equal the scipy reference; the pet's
    # Boundary IoU loses at least 1.5x what its mask IoU loses (d = 2% of the diagonal, ~14 px);
    # errors inside the ignored ring count for neither, so ignoring it is the more lenient score.
    for path in sorted((SAMPLE / "annotations" / "trimaps").glob("*.png"))[:3]:
        with Image.open(path) as image:
            target = torch.from_numpy(np.asarray(image).astype(np.int64) - 1)[None]
        shifted = target.roll(3, dims=-1)
        pred = torch.where(shifted == 2, 1, shifted)
        pet = []
        for truth, ignore in ((target, 2), (torch.where(target == 2, 1, target), None)):
            inter, union = M.boundary_counts(pred, truth, 2, ignore_index=ignore)
            ref_inter, ref_union = reference_counts(pred.numpy(), truth.numpy(), 2, 0.02, ignore)
            assert inter.tolist() == ref_inter.tolist() and union.tolist() == ref_union.tolist(), path.name
            boundary = M.boundary_iou(inter, union)[0].item()
            mask = M.iou(M.confusion_matrix(pred, truth, 2, ignore_index=ignore))[0].item()
            assert 1 - boundary > 1.5 * (1 - mask) > 0, (path.name, ignore, boundary, mask)
            pet.append(boundary)
        assert pet[0] > pet[1], path.name


# ----------------------------------------------------------------------------- laws


@given(blob_pairs())
def test_a_perfect_prediction_scores_one_for_every_present_class(pair):
    _, target, c, ratio, ignore = pair
    g = torch.Generator().manual_seed(0)
    pred = torch.where(target == ignore if ignore is not None else torch.zeros_like(target, dtype=torch.bool),
                       torch.randint(0, c, target.shape, generator=g), target)
    scores = M.boundary_iou(*M.boundary_counts(pred, target, c, ignore_index=ignore, dilation_ratio=ratio))
    valid = (target >= 0) & (target < c) & ((target != ignore) if ignore is not None else True)
    present = torch.bincount(target[valid], minlength=c) > 0
    assert (scores[present] == 1).all() and scores[~present].isnan().all()


@given(blob_pairs(), st.integers(0, 2**31))
def test_predictions_on_ignored_pixels_never_change_the_counts(pair, seed):
    pred, target, c, ratio, ignore = pair
    if ignore is None:
        ignore = 255
    g = torch.Generator().manual_seed(seed)
    other = torch.where(target == ignore, torch.randint(-1, c + 1, pred.shape, generator=g), pred)
    kw = dict(ignore_index=ignore, dilation_ratio=ratio, per_image=True)
    for a, b in zip(M.boundary_counts(pred, target, c, **kw), M.boundary_counts(other, target, c, **kw)):
        assert torch.equal(a, b)


@given(blob_pairs(), st.data())
def test_counts_of_a_batch_are_the_sums_of_its_parts(pair, data):
    pred, target, c, ratio, ignore = pair
    kw = dict(ignore_index=ignore, dilation_ratio=ratio)
    inter, union = M.boundary_counts(pred, target, c, **kw)
    cut = data.draw(st.integers(0, pred.shape[0]))
    parts = [M.boundary_counts(pred[a:b], target[a:b], c, **kw) for a, b in ((0, cut), (cut, pred.shape[0]))]
    assert torch.equal(parts[0][0] + parts[1][0], inter) and torch.equal(parts[0][1] + parts[1][1], union)
    per_inter, per_union = M.boundary_counts(pred, target, c, per_image=True, **kw)
    assert per_inter.shape == (pred.shape[0], c)
    assert torch.equal(per_inter.sum(0), inter) and torch.equal(per_union.sum(0), union)
    assert (inter <= union).all() and (inter >= 0).all()
    # Logits give the counts of their argmax.
    logits = 9.0 * torch.nn.functional.one_hot(pred.clamp(0, c - 1), c).permute(0, 3, 1, 2).float()
    assert torch.equal(M.boundary_counts(logits, target, c, **kw)[0], inter)


@given(side=st.integers(10, 16), top=st.integers(4, 10), left=st.integers(4, 10), extra=st.integers(1, 3))
def test_a_shift_beyond_the_band_scores_below_a_one_pixel_dilation(side, top, left, extra):
    # 40 x 40 with ratio 0.04: d = round(2.26) = 2. For a side-L square, a one-pixel dilation's
    # band (thickness 2) covers the truth's outer ring: (4L - 4) / (12L - 12) = 1/3 for every L,
    # while the mask IoU L^2 / (L + 2)^2 tends to 1. A shift by s > d keeps only the top and
    # bottom strips' overlap, 4(L - s) of 16L - 32 - 4(L - s) band pixels (when L > s + 3, so
    # the side strips do not meet): below 1/3, and falling as s grows.
    d, s = 2, 2 + extra

    def square(r0: int, c0: int, size: int) -> torch.Tensor:
        m = torch.zeros(1, 40, 40, dtype=torch.long)
        m[0, r0 : r0 + size, c0 : c0 + size] = 1
        return m

    def biou(pred: torch.Tensor) -> float:
        return M.boundary_iou(*M.boundary_counts(pred, target, 2, dilation_ratio=0.04))[1].item()

    assert M.boundary_width(40, 40, 0.04) == d
    target = square(top, left, side)
    dilated = biou(square(top - 1, left - 1, side + 2))
    shifted = [biou(square(top, left + k, side)) for k in (s, s + 1)]
    assert dilated == pytest.approx(1 / 3)
    assert shifted[0] == pytest.approx((4 * side - 4 * s) / (12 * side - 32 + 4 * s))
    assert shifted[1] < shifted[0] < dilated


# ----------------------------------------------------------------------------- vmap, compile, reporting, errors


def test_boundary_counts_under_vmap_and_compile():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 4, 12, 10, generator=g)  # K = 3 members
    target = torch.randint(0, 4, (2, 12, 10), generator=g)
    target[:, :2] = 255

    def counts(lg):
        return torch.stack(M.boundary_counts(lg, target, 4, ignore_index=255, dilation_ratio=0.1))

    stacked = torch.func.vmap(counts)(logits)
    assert torch.equal(stacked, torch.stack([counts(lg) for lg in logits]))
    torch._dynamo.reset()
    compiled = torch.compile(counts, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(logits[0]), counts(logits[0]))
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_boundary_counts_on_cuda_match_cpu():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (2, 33, 47), generator=g)
    target = torch.randint(0, 3, (2, 33, 47), generator=g)
    cpu = M.boundary_counts(pred, target, 3, dilation_ratio=0.05)
    cuda = M.boundary_counts(pred.cuda(), target.cuda(), 3, dilation_ratio=0.05)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, cuda))


def test_summarize_boundary_records_the_band():
    inter, union = torch.tensor([50, 10]), torch.tensor([70, 30])
    out = M.summarize_boundary(inter, union, dilation_ratio=0.02, image_size=(256, 256), class_names=["bg", "pet"])
    assert out["boundary_iou"] == pytest.approx([5 / 7, 1 / 3])
    assert out["mean_boundary_iou"] == pytest.approx((5 / 7 + 1 / 3) / 2)
    assert out["boundary_dilation_ratio"] == 0.02 and out["boundary_width_px"] == 7
    assert out["boundary_iou/pet"] == pytest.approx(1 / 3)
    empty = M.summarize_boundary(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                                 dilation_ratio=0.02)
    assert all(math.isnan(v) for v in empty["boundary_iou"]) and math.isnan(empty["mean_boundary_iou"])
    assert "boundary_width_px" not in empty


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: M.boundary_counts(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long),
                                   2, dilation_ratio=0.0), "dilation_ratio must be a positive number"),
        (lambda: M.boundary_counts(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long),
                                   2), "target must be"),
        (lambda: M.boundary_counts(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), 2),
         "C = num_classes = 2"),
        (lambda: M.boundary_iou(torch.zeros(3), torch.zeros(2)), "one shape"),
        (lambda: M.boundary_iou(torch.zeros(3), torch.zeros(3), average="weighted"), "average=None"),
    ],
)
def test_boundary_functions_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
