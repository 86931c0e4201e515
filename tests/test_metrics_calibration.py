"""Tests for calibration (metrics.calibration_counts, ece, mce, reliability) and the reliability
diagram (functional_seg.reliability): synthetic calibrated and over-confident cases, a direct
numpy computation of the binned ECE, and laws (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from strategies_seg import seg_batches
from torchmetrics.functional.classification import multiclass_calibration_error

from functional_seg import metrics as M
from functional_seg.reliability import BAR, GAP, reliability_diagram, save_reliability_diagram


def sampled_labels(probs: torch.Tensor, seed: int) -> torch.Tensor:
    """Labels drawn pixel by pixel with exactly the given class probabilities [N, C, H, W]."""
    n, c, h, w = probs.shape
    g = torch.Generator().manual_seed(seed)
    flat = probs.permute(0, 2, 3, 1).reshape(-1, c)
    return torch.multinomial(flat, 1, generator=g).reshape(n, h, w)


def numpy_ece(probs: np.ndarray, target: np.ndarray, bins: int, valid: np.ndarray) -> tuple[np.ndarray, float]:
    """Guo et al.'s binned ECE, written out directly: bins (b/B, (b+1)/B], confidence 0 in bin 0."""
    conf = probs.max(axis=1)[valid].astype(np.float64)
    correct = (probs.argmax(axis=1) == target)[valid]
    rows = np.zeros((3, bins))
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        rows[:, b] = inside.sum(), conf[inside].sum(), correct[inside].sum()
    ece = sum(abs(rows[2, b] / rows[0, b] - rows[1, b] / rows[0, b]) * rows[0, b] for b in range(bins) if rows[0, b])
    return rows, ece / max(valid.sum(), 1)


def test_a_calibrated_model_has_ece_near_zero_and_an_overconfident_one_does_not():
    g = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(2, 4, 96, 96, generator=g)  # 18 432 pixels
    probs = logits.softmax(1)
    target = sampled_labels(probs, seed=1)
    calibrated = M.ece(M.calibration_counts(probs, target))
    # Sharpened probabilities, labels still drawn from the original ones: over-confident.
    overconfident = M.ece(M.calibration_counts((3.0 * logits).softmax(1), target))
    assert calibrated < 0.015
    assert overconfident > 0.15
    # Over-confidence: every populated bin's accuracy lies below its confidence.
    confidence, accuracy, _ = M.reliability(M.calibration_counts((3.0 * logits).softmax(1), target))
    populated = ~accuracy.isnan()
    assert (accuracy[populated] < confidence[populated]).sum() >= populated.sum() - 1


@given(seg_batches(ignore_labels=(None, 255, 1), max_side=8), st.sampled_from([1, 5, 15]))
def test_counts_and_ece_equal_a_direct_numpy_computation(batch, bins):
    probs = batch.logits.softmax(1)
    counts = M.calibration_counts(probs, batch.target, num_bins=bins, ignore_index=batch.ignore_index)
    rows, ece = numpy_ece(probs.numpy(), batch.target.numpy(), bins, batch.valid.numpy())
    assert counts.dtype == torch.float64 and counts.shape == (3, bins)
    np.testing.assert_allclose(counts.numpy(), rows, rtol=1e-12, atol=1e-9)
    if batch.valid.any():
        assert M.ece(counts).item() == pytest.approx(ece, abs=1e-12)
    else:
        assert M.ece(counts).isnan() and M.mce(counts).isnan()


@given(seg_batches(ignore_labels=(None, 255), max_side=8), st.sampled_from([5, 15]))
def test_ece_and_mce_match_torchmetrics(batch, bins):
    if not batch.valid.any():
        return  # torchmetrics has no value for nothing counted
    probs = batch.logits.softmax(1)
    c, ignore = batch.num_classes, batch.ignore_index
    counts = M.calibration_counts(probs, batch.target, num_bins=bins, ignore_index=ignore)
    for ours, norm in ((M.ece(counts), "l1"), (M.mce(counts), "max")):
        theirs = multiclass_calibration_error(probs, batch.target, c, n_bins=bins, norm=norm, ignore_index=ignore)
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-5), norm


@given(seg_batches(max_side=6), st.data())
def test_calibration_laws(batch, data):
    probs = batch.logits.softmax(1)
    kw = dict(num_bins=10, ignore_index=batch.ignore_index)
    counts = M.calibration_counts(probs, batch.target, **kw)
    # Counts of a batch are the sums of its parts' counts.
    cut = data.draw(st.integers(0, probs.shape[0]))
    parts = [M.calibration_counts(probs[a:b], batch.target[a:b], **kw) for a, b in ((0, cut), (cut, probs.shape[0]))]
    torch.testing.assert_close(parts[0] + parts[1], counts, rtol=1e-12, atol=1e-9)
    # Every counted pixel lands in one bin; probabilities on ignored pixels change nothing.
    assert counts[0].sum() == batch.valid.sum()
    noise = torch.rand(probs.shape, generator=torch.Generator().manual_seed(cut)).softmax(1)
    other = torch.where(batch.valid.unsqueeze(1), probs, noise)
    assert torch.equal(M.calibration_counts(other, batch.target, **kw), counts)
    # 0 <= ECE <= MCE <= 1 (ECE is a weighted mean of the bins' gaps, MCE their maximum).
    if batch.valid.any():
        assert 0 <= M.ece(counts) <= M.mce(counts) + 1e-12 <= 1 + 1e-12


def test_ece_by_hand_and_summary():
    # Bin (0.5, 0.75]: 4 pixels at 0.6, 1 correct; bin (0.75, 1]: 2 pixels at 0.9, both correct.
    counts = torch.tensor([[0.0, 0.0, 4.0, 2.0], [0.0, 0.0, 2.4, 1.8], [0.0, 0.0, 1.0, 2.0]], dtype=torch.float64)
    # |1 - 2.4| + |2 - 1.8| over 6 pixels; MCE = max(|0.25 - 0.6|, |1 - 0.9|).
    assert M.ece(counts).item() == pytest.approx(1.6 / 6)
    assert M.mce(counts).item() == pytest.approx(0.35)
    out = M.summarize_calibration(counts)
    assert out["calibration_bins"] == 4 and out["ece"] == pytest.approx(1.6 / 6)
    assert math.isnan(out["reliability_accuracy"][0]) and out["reliability_accuracy"][2:] == [0.25, 1.0]
    assert out["reliability_count"] == [0.0, 0.0, 4.0, 2.0]


def test_calibration_counts_under_vmap_and_compile():
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(3, 2, 4, 6, 5, generator=g).softmax(2)
    target = torch.randint(0, 4, (2, 6, 5), generator=g)
    target[0, 0] = 255

    def counts(p):
        return M.calibration_counts(p, target, num_bins=7, ignore_index=255)

    assert torch.equal(torch.func.vmap(counts)(probs), torch.stack([counts(p) for p in probs]))
    torch._dynamo.reset()
    compiled = torch.compile(counts, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(probs[0]), counts(probs[0]))
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_calibration_counts_on_cuda_match_cpu():
    g = torch.Generator().manual_seed(0)
    probs = (3 * torch.randn(4, 5, 33, 47, generator=g)).softmax(1)
    target = torch.randint(0, 5, (4, 33, 47), generator=g)
    target[:, 0] = 255
    cpu = M.calibration_counts(probs, target, ignore_index=255)
    cuda = M.calibration_counts(probs.cuda(), target.cuda(), ignore_index=255)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: M.calibration_counts(torch.rand(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long), num_bins=0),
         "num_bins must be a positive int"),
        (lambda: M.calibration_counts(torch.rand(2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long)), "probs must be"),
        (lambda: M.calibration_counts(torch.rand(1, 2, 3, 3), torch.zeros(1, 3, 4, dtype=torch.long)),
         "target must be"),
        (lambda: M.ece(torch.zeros(2, 15)), "calibration counts"),
        (lambda: M.summarize_calibration(torch.zeros(2, 3, 15)), r"\[3, B\]"),
    ],
)
def test_calibration_rejects_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- the reliability diagram


def _colour_pixels(image: Image.Image, colour) -> np.ndarray:
    return (np.asarray(image) == np.asarray(colour, dtype=np.uint8)).all(axis=-1)


def _bar_heights(bars: np.ndarray) -> list[int]:
    """The height of each run of adjacent columns holding bar pixels, left to right."""
    per_column = bars.sum(axis=0)
    heights, run = [], 0
    for value in [*per_column.tolist(), 0]:
        if value:
            run = max(run, value)
        elif run:
            heights.append(run)
            run = 0
    return heights


def _reddish(image: Image.Image) -> np.ndarray:
    """Pixels tinted by the translucent gap: red clearly above green and blue."""
    a = np.asarray(image).astype(int)
    return (a[..., 0] - a[..., 1] > 40) & (a[..., 0] - a[..., 2] > 40)


def test_the_diagram_draws_bars_at_the_bins_accuracy_and_gaps_only_where_miscalibrated():
    # Four bins; pixels in bins 1..3 with accuracy 0.3, 0.6 and 0.9. Calibrated: each bin's
    # confidence sum equals its correct count, so there is no gap to draw.
    count = torch.tensor([0.0, 100.0, 100.0, 100.0], dtype=torch.float64)
    correct = torch.tensor([0.0, 30.0, 60.0, 90.0], dtype=torch.float64)
    calibrated = reliability_diagram(torch.stack([count, correct, correct]))
    assert calibrated.mode == "RGB" and calibrated.size[0] == 480
    bars = _colour_pixels(calibrated, BAR)
    heights = _bar_heights(bars)
    # Three bars (the empty bin draws none), heights proportional to accuracy (to rounding).
    assert len(heights) == 3 and heights[0] > 20
    assert abs(heights[1] - 2 * heights[0]) <= 2 and abs(heights[2] - 3 * heights[0]) <= 2
    assert not _reddish(calibrated).any()
    # Over-confident: the same accuracy at confidence 0.95 everywhere: red gaps above the bars.
    over = reliability_diagram(torch.stack([count, 0.95 * count, correct]), title="over")
    assert _reddish(over).sum() > 1000
    assert np.array_equal(_colour_pixels(over, BAR), bars)
    assert GAP[0] > GAP[1]


def test_save_reliability_diagram_writes_a_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(1, 3, 16, 16, generator=g).softmax(1)
    counts = M.calibration_counts(probs, torch.randint(0, 3, (1, 16, 16), generator=g))
    path = save_reliability_diagram(tmp_path / "plots" / "reliability.png", counts, size=320)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] == 320
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]  # no temporary left behind
    empty = reliability_diagram(torch.zeros(3, 15, dtype=torch.float64))  # nothing counted: axes only
    assert not _colour_pixels(empty, BAR).any()
    with pytest.raises(ValueError, match="calibration counts"):
        reliability_diagram(torch.zeros(4, 15))
    with pytest.raises(ValueError, match="size"):
        reliability_diagram(counts, size=50)
