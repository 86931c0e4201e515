"""Tests for functional_seg.label_quality: cleanlab 2.9 cross-checks on random out-of-sample
probabilities (segmentation image and pixel scores; classification scores, thresholds and the
confident-learning filter with pixels as examples), ignore handling, two-pass accumulation and
a synthetic audit where one image has a relabelled region."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cleanlab.count import get_confident_thresholds
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores as classification_scores
from cleanlab.segmentation.rank import get_label_quality_scores as segmentation_scores
from hypothesis import assume, given
from hypothesis import strategies as st

from functional_seg import label_quality as Q


@st.composite
def audits(draw, ignore_labels=(None,), max_side: int = 7):
    """(probs float64 [N, C, H, W], labels int64 [N, H, W], ignore_index): Dirichlet probabilities
    (concentration 0.3 to 3, peaked to flat) and labels that follow them loosely, so every kind
    of pixel occurs (confident and right, confident and wrong, unsure)."""
    n, c = draw(st.integers(1, 4)), draw(st.integers(2, 5))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    alpha = draw(st.sampled_from([0.3, 1.0, 3.0]))
    probs = rng.dirichlet(np.full(c, alpha), size=(n, h, w)).transpose(0, 3, 1, 2)
    argmax = probs.argmax(axis=1)
    labels = np.where(rng.random((n, h, w)) < 0.7, argmax, rng.integers(0, c, (n, h, w)))
    ignore = draw(st.sampled_from(ignore_labels))
    if ignore is not None:
        labels = np.where(rng.random((n, h, w)) < 0.25, ignore, labels)
    return torch.from_numpy(np.ascontiguousarray(probs)), torch.from_numpy(labels), ignore


def thresholds_of(probs, labels, ignore=None):
    return Q.class_thresholds(Q.threshold_counts(probs, labels, ignore_index=ignore))


def pixels_as_examples(probs: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    c = probs.shape[1]
    return labels.reshape(-1).numpy(), probs.permute(0, 2, 3, 1).reshape(-1, c).numpy()


# ----------------------------------------------------------------------------- cleanlab cross-checks


@given(audits(), st.sampled_from([0.1, 0.5, 1.0]), st.booleans())
def test_image_and_pixel_scores_equal_cleanlab_segmentation_softmin(audit, temperature, single):
    probs, labels, _ = audit
    if single:
        probs = probs.float()
    image, pixel = segmentation_scores(labels.numpy(), probs.numpy(), method="softmin", temperature=temperature,
                                       verbose=False)
    out = Q.score_batch(probs, labels, thresholds_of(probs, labels), temperature=temperature)
    np.testing.assert_allclose(out["image_score"].numpy(), image, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["pixel_score"].numpy(), pixel, rtol=0, atol=1e-6)


@given(audits())
def test_thresholds_scores_and_issues_equal_cleanlab_with_pixels_as_examples(audit):
    probs, labels, _ = audit
    flat_labels, flat_probs = pixels_as_examples(probs, labels)
    present = np.bincount(flat_labels, minlength=probs.shape[1]) > 0
    assume(present.sum() >= 2)  # cleanlab's classification functions refuse a single class
    t = thresholds_of(probs, labels)
    # Thresholds: cleanlab gives an absent class 2 (no probability reaches it); we say NaN.
    np.testing.assert_allclose(t.numpy()[present], get_confident_thresholds(flat_labels, flat_probs)[present],
                               rtol=1e-12)
    assert t[~torch.from_numpy(present)].isnan().all()
    for method, kwargs in [("self_confidence", {}), ("normalized_margin", {}),
                           ("adjusted_self_confidence", {"adjust_pred_probs": True})]:
        theirs = classification_scores(flat_labels, flat_probs, method=method.removeprefix("adjusted_"), **kwargs)
        ours = Q.pixel_scores(probs, labels, method=method, thresholds=t).reshape(-1).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9, err_msg=method)
    theirs = find_label_issues(flat_labels, flat_probs, filter_by="confident_learning")
    assert np.array_equal(Q.issue_mask(probs, labels, t).reshape(-1).numpy(), theirs)


@given(audits(ignore_labels=(255, 1)))
def test_ignored_pixels_enter_nothing(audit):
    probs, labels, ignore = audit
    c = probs.shape[1]
    valid = (labels != ignore) & (labels >= 0) & (labels < c)
    t = thresholds_of(probs, labels, ignore)
    # Thresholds equal cleanlab's over the counted pixels only.
    counted_labels, counted_probs = labels[valid].numpy(), probs.permute(0, 2, 3, 1)[valid].numpy()
    present = np.bincount(counted_labels, minlength=c) > 0
    if present.any():
        theirs = get_confident_thresholds(counted_labels, counted_probs)
        np.testing.assert_allclose(t.numpy()[present], theirs[present], rtol=1e-12)
    assert t[~torch.from_numpy(present)].isnan().all()
    # Whatever the probabilities on ignored pixels, nothing else changes.
    noise = torch.rand(probs.shape, generator=torch.Generator().manual_seed(0), dtype=probs.dtype)
    other = torch.where(valid.unsqueeze(1), probs, noise / noise.sum(1, keepdim=True))
    out = Q.score_batch(probs, labels, t, ignore_index=ignore)
    again = Q.score_batch(other, labels, thresholds_of(other, labels, ignore), ignore_index=ignore)
    for key in out:
        torch.testing.assert_close(out[key], again[key], equal_nan=True, rtol=0, atol=0, msg=key)
    assert out["pixel_score"][~valid].isnan().all() and out["issue_map"][~valid].isnan().all()
    assert out["valid_pixels"].tolist() == valid.sum(dim=(1, 2)).tolist()
    # Each image's score is cleanlab's softmin over that image's counted pixels alone.
    for i in range(probs.shape[0]):
        m = valid[i]
        if not m.any():
            assert out["image_score"][i].isnan() and out["issue_fraction"][i].isnan()
            continue
        image, _ = segmentation_scores(labels[i][m].view(1, 1, -1).numpy(), probs[i][:, m].view(1, c, 1, -1).numpy(),
                                       method="softmin", verbose=False)
        assert out["image_score"][i].item() == pytest.approx(image[0], abs=1e-6)


@given(audits(ignore_labels=(None, 255)), st.data())
def test_the_first_pass_accumulates_over_batches(audit, data):
    probs, labels, ignore = audit
    n = probs.shape[0]
    cut = data.draw(st.integers(0, n))
    parts = [Q.threshold_counts(probs[a:b], labels[a:b], ignore_index=ignore) for a, b in ((0, cut), (cut, n))]
    whole = Q.threshold_counts(probs, labels, ignore_index=ignore)
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-12, atol=1e-12)
    # The second pass is per image: a batch's results are its images' results.
    t = Q.class_thresholds(whole)
    out = Q.score_batch(probs, labels, t, ignore_index=ignore)
    halves = [Q.score_batch(probs[a:b], labels[a:b], t, ignore_index=ignore) for a, b in ((0, cut), (cut, n))]
    for key in out:
        torch.testing.assert_close(torch.cat([halves[0][key], halves[1][key]]), out[key], equal_nan=True)


# ----------------------------------------------------------------------------- the audit finds the flipped region


def test_a_relabelled_region_ranks_its_image_first():
    # Six 24 x 24 images of three classes in vertical stripes; the "model" is right with
    # probability ~0.85 everywhere. Image 4's given labels have a 6 x 6 region relabelled.
    g = torch.Generator().manual_seed(0)
    truth = (torch.arange(24).view(1, 1, 24).expand(6, 24, 24) // 8 + torch.arange(6).view(6, 1, 1)) % 3
    logits = 4.0 * torch.nn.functional.one_hot(truth, 3).permute(0, 3, 1, 2).double()
    probs = (logits + 0.5 * torch.randn(logits.shape, generator=g, dtype=torch.float64)).softmax(1)
    labels = truth.clone()
    labels[4, 10:16, 2:8] = (truth[4, 10:16, 2:8] + 1) % 3
    t = thresholds_of(probs, labels)
    out = Q.score_batch(probs, labels, t)
    ranking = Q.rank_images(out["image_score"])
    assert ranking[0].item() == 4
    assert out["issue_fraction"].argmax().item() == 4
    # Issues lie in image 4's region only. Confident learning flags a pixel when the true class's
    # probability reaches that class's threshold, its MEAN probability on its labelled pixels:
    # about half of the region here (the noise spreads p around the mean), never less than a third.
    region = torch.zeros(6, 24, 24, dtype=torch.bool)
    region[4, 10:16, 2:8] = True
    heat = out["issue_map"]
    assert (heat[~region] == 0).all()
    assert out["issue_pixels"].tolist()[:4] == [0] * 4 and out["issue_pixels"][4] >= 12
    flagged = heat[region][heat[region] > 0]
    assert flagged.numel() == out["issue_pixels"][4] and (flagged > 0.9).all()  # disputed with confidence
    for method in Q.METHODS:
        scores = Q.score_batch(probs, labels, t, method=method)["image_score"]
        assert Q.rank_images(scores)[0].item() == 4, method


def test_softmin_and_ranking_by_hand():
    # Scores (1, 0): weights softmax((0, 1) / T); T = 1: 0 * e / (1 + e) + 1 * 1 / (1 + e).
    s = torch.tensor([[1.0, 0.0], [0.5, math.nan], [math.nan, math.nan]])
    got = Q.softmin(s, temperature=1.0)
    assert got[0].item() == pytest.approx(1 / (1 + math.e)) and got[1].item() == 0.5 and got[2].isnan()
    assert Q.rank_images(torch.tensor([0.5, math.nan, 0.2, 0.5])).tolist() == [2, 0, 3, 1]


def test_label_quality_under_compile_and_vmap():
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(2, 3, 4, 5, 6, generator=g).softmax(2)  # 2 folds
    labels = torch.randint(0, 4, (3, 5, 6), generator=g)
    labels[0, 0] = 255

    def audit(p):
        t = Q.class_thresholds(Q.threshold_counts(p, labels, ignore_index=255))
        return Q.score_batch(p, labels, t, method="adjusted_self_confidence", ignore_index=255)

    stacked = torch.func.vmap(audit)(probs)
    for key, value in audit(probs[1]).items():
        torch.testing.assert_close(stacked[key][1], value, equal_nan=True)
    torch._dynamo.reset()
    compiled = torch.compile(audit, fullgraph=True, backend="aot_eager")
    for key, value in audit(probs[0]).items():
        torch.testing.assert_close(compiled(probs[0])[key], value, equal_nan=True)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_label_audit_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    probs = (3 * torch.randn(4, 5, 33, 47, generator=g)).softmax(1)
    labels = torch.randint(0, 5, (4, 33, 47), generator=g)
    labels[:, 0] = 255
    t = thresholds_of(probs, labels, 255)
    t_cuda = thresholds_of(probs.cuda(), labels.cuda(), 255)
    torch.testing.assert_close(t_cuda.cpu(), t, rtol=1e-12, atol=1e-12)
    cpu = Q.score_batch(probs, labels, t, ignore_index=255)
    cuda = Q.score_batch(probs.cuda(), labels.cuda(), t_cuda, ignore_index=255)
    for key, value in cpu.items():
        assert cuda[key].device.type == "cuda"
        torch.testing.assert_close(cuda[key].cpu(), value, equal_nan=True, msg=key)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: Q.threshold_counts(torch.rand(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long)), "labels must be"),
        (lambda: Q.threshold_counts(torch.rand(3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)), "probs must be"),
        (lambda: Q.class_thresholds(torch.zeros(3, 4)), "threshold counts"),
        (lambda: Q.pixel_scores(torch.rand(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), method="margin"),
         "method must be one of"),
        (lambda: Q.pixel_scores(torch.rand(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long),
                                method="adjusted_self_confidence"), "needs thresholds"),
        (lambda: Q.issue_mask(torch.rand(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(2)),
         "thresholds must be"),
        (lambda: Q.softmin(torch.zeros(2, 3), temperature=0), "temperature"),
    ],
)
def test_label_quality_rejects_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
