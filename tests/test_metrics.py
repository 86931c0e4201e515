"""Tests for functional_seg.metrics: hand-worked values, laws (hypothesis), cross-checks against
torchmetrics, and compile / device behaviour.

The hand-worked labels are one 2x3 image with three classes:
truth [[0, 0, 1], [1, 2, 2]] and prediction [[0, 1, 1], [1, 2, 0]], so the (truth, pred)
pairs are (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) and the confusion matrix (rows = truth) is
[[1, 1, 0], [0, 2, 0], [1, 0, 1]]: tp = (1, 2, 1), truth counts (2, 2, 2), predicted (2, 3, 1).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies_seg import SegBatch, perfect_logits, seg_batches
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_jaccard_index,
    multiclass_precision,
    multiclass_recall,
)
from torchmetrics.functional.segmentation import dice_score

from functional_seg import losses as L
from functional_seg import metrics as M

LN3 = math.log(3.0)
NAN = math.nan


@pytest.fixture
def hand() -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
    pred = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
    return pred, target


def assert_values(actual: torch.Tensor, expected, tol: float = 1e-12) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.dtype == torch.float64 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol, equal_nan=True)


# ----------------------------------------------------------------------------- hand-worked values


def test_confusion_matrix_by_hand(hand):
    pred, target = hand
    cm = M.confusion_matrix(pred, target, 3)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # Ignoring label 2 drops the last two pixels; per image adds a leading axis.
    assert M.confusion_matrix(pred, target, 3, ignore_index=2).tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert M.confusion_matrix(pred, target, 3, per_image=True).tolist() == [cm.tolist()]
    # Logits give the same counts as their argmax.
    logits = 5.0 * torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    assert torch.equal(M.confusion_matrix(logits, target, 3), cm)


def test_reductions_by_hand(hand):
    cm = M.confusion_matrix(*hand, 3)
    assert_values(M.pixel_accuracy(cm), 4 / 6)
    assert_values(M.iou(cm), [1 / 3, 2 / 3, 1 / 2])  # tp / (truth + pred - tp)
    assert_values(M.mean_iou(cm), 0.5)
    assert_values(M.mean_iou(cm, average="micro"), 4 / 8)
    assert_values(M.dice(cm), [2 / 4, 4 / 5, 2 / 3])  # 2 tp / (truth + pred)
    assert_values(M.mean_dice(cm), (0.5 + 0.8 + 2 / 3) / 3)
    assert_values(M.precision(cm), [1 / 2, 2 / 3, 1])  # tp / pred
    assert_values(M.recall(cm), [1 / 2, 1, 1 / 2])  # tp / truth
    assert_values(M.precision(cm, average="micro"), 4 / 6)  # micro precision is accuracy
    # Series IoU: drop truth = 1, pool classes 0 and 2: tp 1 + 1, tp + fp + fn 3 + 2.
    assert_values(M.series_iou(cm), 2 / 5)


def test_weighted_and_absent_classes_by_hand():
    # Truth counts (4, 2, 2): IoU (3/5, 2/3, 1/2), weighted by 4 : 2 : 2.
    cm = torch.tensor([[3, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert_values(M.mean_iou(cm, average="weighted"), (4 * 0.6 + 2 * 2 / 3 + 2 * 0.5) / 8)
    assert_values(M.mean_iou(cm), (0.6 + 2 / 3 + 0.5) / 3)
    # Class 2 absent from truth and prediction: undefined (NaN), left out of every mean.
    cm = torch.tensor([[2, 1, 0], [0, 3, 0], [0, 0, 0]])
    assert_values(M.iou(cm), [2 / 3, 3 / 4, NAN])
    assert_values(M.mean_iou(cm), (2 / 3 + 3 / 4) / 2)
    assert_values(M.dice(cm), [4 / 5, 6 / 7, NAN])
    assert_values(M.precision(cm), [1, 3 / 4, NAN])
    assert_values(M.recall(cm, average="macro"), (2 / 3 + 1) / 2)
    # A class predicted but never true has IoU 0 (defined) and recall NaN.
    cm = torch.tensor([[2, 1], [0, 0]])
    assert_values(M.iou(cm), [2 / 3, 0.0])
    assert_values(M.recall(cm), [2 / 3, NAN])
    # Nothing counted at all: every mean is NaN.
    empty = torch.zeros(3, 3, dtype=torch.int64)
    for value in (M.pixel_accuracy(empty), M.mean_iou(empty), M.series_iou(empty)):
        assert value.isnan()


def test_imagewise_mean_iou_by_hand(hand):
    pred, target = hand
    # Image 0 is the hand example (mean IoU 1/2); image 1 is perfect on classes 0 and 1 (1.0).
    pred = torch.cat([pred, torch.tensor([[[0, 0, 1], [1, 1, 1]]])])
    target = torch.cat([target, pred[1:]])
    cm = M.confusion_matrix(pred, target, 3, per_image=True)
    assert_values(M.mean_iou(cm), [0.5, 1.0])
    assert_values(M.imagewise_mean_iou(cm), 0.75)
    # Batch-level mean IoU is not the mean of the images' means.
    assert_values(M.mean_iou(cm.sum(0)), (3 / 5 + 6 / 7 + 1 / 2) / 3)


def test_soft_metrics_by_hand():
    # Pixel A: target 1, p = (1/4, 3/4); pixel B: target 0, p = (1/2, 1/2).
    logits = torch.tensor([[[[0.0, 0.0]], [[LN3, 0.0]]]], dtype=torch.float64)
    target = torch.tensor([[[1, 0]]])
    inter, pred_sum, true_sum = M.soft_stats(logits, target)
    torch.testing.assert_close(inter, torch.tensor([0.5, 0.75], dtype=torch.float64))
    torch.testing.assert_close(pred_sum, torch.tensor([0.75, 1.25], dtype=torch.float64))
    torch.testing.assert_close(true_sum, torch.tensor([1.0, 1.0], dtype=torch.float64))
    # eps = 1: (0.5 + 1) / (1.25 + 1) and (0.75 + 1) / (1.5 + 1).
    torch.testing.assert_close(M.soft_iou_metric(logits, target).item(), (2 / 3 + 0.7) / 2)
    torch.testing.assert_close(1 - M.soft_iou_metric(logits, target), L.soft_iou(logits, target))
    # Series custom IoU, classes pooled: I = 1.25, U = 2 + 2 - 1.25 = 2.75 for this image; a
    # second image of two p = (1/2, 1/2) pixels with targets 0 and 1 has I = 1, U = 3.
    two = torch.cat([logits, torch.zeros_like(logits)])
    targets = torch.cat([target, torch.tensor([[[0, 1]]])])
    expected = ((1.25 + 1e-3) / (2.75 + 1e-3) + (1 + 1e-3) / (3 + 1e-3)) / 2
    torch.testing.assert_close(M.series_custom_iou(two, targets).item(), expected)


def test_summarize_and_format_table(hand):
    cm = M.confusion_matrix(*hand, 3)
    names = ["pet", "background", "border"]
    summary = M.summarize(cm, names, series=True)
    assert "series_iou" not in M.summarize(cm, names)  # the series' figure only where asked (Oxford)
    assert summary["pixel_accuracy"] == pytest.approx(4 / 6)
    assert summary["mean_iou"] == pytest.approx(0.5)
    assert summary["iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert summary["dice"] == pytest.approx([0.5, 0.8, 2 / 3])
    assert summary["precision"] == pytest.approx([0.5, 2 / 3, 1.0])
    assert summary["recall"] == pytest.approx([0.5, 1.0, 0.5])
    assert summary["weighted_iou"] == pytest.approx(0.5)
    assert summary["series_iou"] == pytest.approx(0.4)
    assert summary["iou/border"] == pytest.approx(0.5)
    for value in summary.values():
        assert type(value) is float or all(type(v) is float for v in value)
    json.dumps(summary)
    per_image = M.summarize(M.confusion_matrix(*hand, 3, per_image=True))
    assert per_image["imagewise_mean_iou"] == pytest.approx(0.5)
    table = M.format_table(summary, names)
    assert "background" in table and "0.6667" in table and "series IoU" in table
    assert len(table.splitlines()) == 1 + 3 + 1 + 5
    with pytest.raises(ValueError, match="class_names"):
        M.summarize(cm, ["a", "b"])


# ----------------------------------------------------------------------------- laws


@given(seg_batches(max_c=5))
def test_counts_sum_to_the_non_ignored_pixels(batch):
    cm = M.confusion_matrix(batch.logits, batch.target, batch.num_classes, ignore_index=batch.ignore_index)
    assert cm.dtype == torch.int64 and cm.shape == (batch.num_classes,) * 2
    assert (cm >= 0).all()
    assert cm.sum() == batch.valid.sum()
    assert torch.equal(cm.sum(dim=1), torch.bincount(batch.target[batch.valid], minlength=batch.num_classes))


@given(seg_batches(ignore_labels=(None, 255)))
def test_confusion_matrix_matches_torchmetrics(batch):
    c = batch.num_classes
    cm = M.confusion_matrix(batch.logits, batch.target, c, ignore_index=batch.ignore_index)
    theirs = multiclass_confusion_matrix(batch.logits, batch.target, c, ignore_index=batch.ignore_index)
    assert torch.equal(cm, theirs)


@given(seg_batches(), st.data())
def test_streaming_equals_one_pass(batch, data):
    c, n = batch.num_classes, batch.logits.shape[0]
    whole = M.confusion_matrix(batch.logits, batch.target, c, ignore_index=batch.ignore_index)
    cut = data.draw(st.integers(0, n))
    parts = [
        M.confusion_matrix(batch.logits[a:b], batch.target[a:b], c, ignore_index=batch.ignore_index)
        for a, b in ((0, cut), (cut, n))
    ]
    assert torch.equal(parts[0] + parts[1], whole)
    per_image = M.confusion_matrix(batch.logits, batch.target, c, ignore_index=batch.ignore_index, per_image=True)
    assert torch.equal(per_image.sum(dim=0), whole)
    assert torch.equal(
        M.confusion_matrix(batch.logits.argmax(1), batch.target, c, ignore_index=batch.ignore_index), whole
    )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cut))
    assert torch.equal(
        M.confusion_matrix(batch.logits[perm], batch.target[perm], c, ignore_index=batch.ignore_index), whole
    )


@given(seg_batches(max_c=5))
def test_scores_lie_in_unit_interval(batch):
    cm = M.confusion_matrix(batch.logits, batch.target, batch.num_classes, ignore_index=batch.ignore_index)
    for fn in (M.iou, M.dice, M.precision, M.recall):
        for average in M.AVERAGES:
            value = fn(cm, average=average)
            defined = value[~value.isnan()]
            assert ((defined >= 0) & (defined <= 1)).all(), (fn.__name__, average)
    for value in (M.pixel_accuracy(cm), M.series_iou(cm)):
        assert value.isnan() or 0 <= value <= 1
    # A class's IoU is defined exactly when it appears in truth or prediction.
    present = (cm.sum(0) + cm.sum(1)) > 0
    assert torch.equal(~M.iou(cm).isnan(), present)
    # Dice = 2 IoU / (1 + IoU), class by class.
    scores = M.iou(cm)
    torch.testing.assert_close(M.dice(cm), 2 * scores / (1 + scores), equal_nan=True)


@given(seg_batches(max_c=5))
def test_perfect_predictions_score_one(batch):
    c = batch.num_classes
    cm = M.confusion_matrix(perfect_logits(batch), batch.target, c, ignore_index=batch.ignore_index)
    if not batch.valid.any():
        assert M.pixel_accuracy(cm).isnan() and M.mean_iou(cm).isnan()
        return
    assert M.pixel_accuracy(cm) == 1
    for average in ("macro", "weighted", "micro"):
        for fn in (M.iou, M.dice, M.precision, M.recall):
            assert fn(cm, average=average) == 1
    present = torch.bincount(batch.target[batch.valid], minlength=c) > 0
    assert (M.iou(cm)[present] == 1).all() and M.iou(cm)[~present].isnan().all()
    per_image = M.confusion_matrix(
        perfect_logits(batch), batch.target, c, ignore_index=batch.ignore_index, per_image=True
    )
    assert M.imagewise_mean_iou(per_image) == 1
    # Soft metrics approach 1 as the margin grows (+ eps keeps absent classes at 1).
    soft = M.soft_iou_metric(perfect_logits(batch), batch.target, ignore_index=batch.ignore_index)
    assert 1 - 1e-5 < soft <= 1
    custom = M.series_custom_iou(perfect_logits(batch), batch.target, ignore_index=batch.ignore_index)
    assert 1 - 1e-5 < custom <= 1


@given(seg_batches())
def test_hard_logits_make_soft_counts_equal_the_confusion_counts(batch):
    # With a 1e4 margin softmax is exactly one-hot in float32, so I = tp, P = predicted, T = truth.
    c = batch.num_classes
    pred = batch.logits.argmax(1)
    hard = 1e4 * torch.nn.functional.one_hot(pred, c).permute(0, 3, 1, 2).float()
    inter, pred_sum, true_sum = M.soft_stats(hard, batch.target, ignore_index=batch.ignore_index)
    cm = M.confusion_matrix(pred, batch.target, c, ignore_index=batch.ignore_index).float()
    assert torch.equal(inter, cm.diagonal()) and torch.equal(pred_sum, cm.sum(0)) and torch.equal(true_sum, cm.sum(1))


@given(seg_batches())
def test_soft_metrics_lie_in_unit_interval_and_ignore_batch_order(batch):
    soft = M.soft_iou_metric(batch.logits, batch.target, ignore_index=batch.ignore_index)
    custom = M.series_custom_iou(batch.logits, batch.target, ignore_index=batch.ignore_index)
    assert 0 < soft <= 1 and 0 < custom <= 1
    flipped = SegBatch(batch.logits.flip(0), batch.target.flip(0), batch.ignore_index)
    torch.testing.assert_close(M.soft_iou_metric(flipped.logits, flipped.target, ignore_index=batch.ignore_index), soft)
    torch.testing.assert_close(
        M.series_custom_iou(flipped.logits, flipped.target, ignore_index=batch.ignore_index), custom
    )


@given(seg_batches())
def test_imagewise_mean_iou_is_the_mean_over_single_images(batch):
    c, n = batch.num_classes, batch.logits.shape[0]
    kw = dict(ignore_index=batch.ignore_index)
    per_image = M.confusion_matrix(batch.logits, batch.target, c, per_image=True, **kw)
    singles = [
        M.mean_iou(M.confusion_matrix(batch.logits[i : i + 1], batch.target[i : i + 1], c, **kw)) for i in range(n)
    ]
    singles = torch.stack(singles)
    assert_values(M.mean_iou(per_image), singles)
    expected = singles[~singles.isnan()].mean() if (~singles.isnan()).any() else torch.tensor(NAN, dtype=torch.float64)
    assert_values(M.imagewise_mean_iou(per_image), expected, tol=1e-12)


# ----------------------------------------------------------------------------- torchmetrics cross-checks


@given(seg_batches(ignore_labels=(None, 255), max_c=5))
def test_jaccard_accuracy_precision_recall_match_torchmetrics(batch):
    c, ignore = batch.num_classes, batch.ignore_index
    cm = M.confusion_matrix(batch.logits, batch.target, c, ignore_index=ignore)
    args = (batch.logits, batch.target, c)
    if not batch.valid.any():
        return  # torchmetrics returns 0 where we say NaN for an empty matrix
    for average in ("macro", "micro", "weighted"):
        theirs = multiclass_jaccard_index(*args, average=average, ignore_index=ignore)
        torch.testing.assert_close(M.iou(cm, average=average).float(), theirs, rtol=1e-6, atol=1e-6)
    theirs = multiclass_accuracy(*args, average="micro", ignore_index=ignore)
    torch.testing.assert_close(M.pixel_accuracy(cm).float(), theirs, rtol=1e-6, atol=1e-6)
    # Per class, torchmetrics writes 0 for an undefined score where we write NaN.
    for ours, theirs in (
        (M.iou(cm), multiclass_jaccard_index(*args, average="none", ignore_index=ignore)),
        (M.precision(cm), multiclass_precision(*args, average="none", ignore_index=ignore)),
        (M.recall(cm), multiclass_recall(*args, average="none", ignore_index=ignore)),
    ):
        torch.testing.assert_close(ours.nan_to_num(0.0).float(), theirs, rtol=1e-6, atol=1e-6)


@given(seg_batches(ignore_labels=(None,), max_c=5))
def test_dice_matches_torchmetrics_dice_score(batch):
    c = batch.num_classes
    cm = M.confusion_matrix(batch.logits, batch.target, c)
    pred = batch.logits.argmax(1)
    kw = dict(num_classes=c, input_format="index", aggregation_level="global")
    # torchmetrics marks an undefined class NaN too, and its macro mean skips it.
    torch.testing.assert_close(
        M.dice(cm).float(), dice_score(pred, batch.target, average="none", **kw)[0], equal_nan=True
    )
    torch.testing.assert_close(M.mean_dice(cm).float(), dice_score(pred, batch.target, average="macro", **kw)[0])


@given(seg_batches(min_c=3, max_c=3, ignore_labels=(None,)))
def test_series_iou_matches_torchmetrics_micro_with_background_ignored(batch):
    # The series' "IoU": MulticlassJaccardIndex(3, average="micro", ignore_index=1).
    cm = M.confusion_matrix(batch.logits, batch.target, 3)
    theirs = multiclass_jaccard_index(batch.logits, batch.target, 3, average="micro", ignore_index=1)
    ours = M.series_iou(cm)
    torch.testing.assert_close(ours.nan_to_num(0.0).float(), theirs, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- compile, devices, validation


def test_confusion_matrix_compiles_fullgraph():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    target = torch.randint(0, 3, (2, 4, 5), generator=g)
    target[0, 0] = 255

    def step(logits, target):
        cm = M.confusion_matrix(logits, target, 3, ignore_index=255)
        return cm, M.mean_iou(cm), M.series_custom_iou(logits, target, ignore_index=255)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(compiled(logits, target), step(logits, target)):
        torch.testing.assert_close(got, want)
    per_image = torch.compile(
        lambda p, t: M.confusion_matrix(p, t, 3, per_image=True), fullgraph=True, backend="aot_eager"
    )
    assert torch.equal(
        per_image(logits.argmax(1), target), M.confusion_matrix(logits.argmax(1), target, 3, per_image=True)
    )
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_confusion_matrix_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 16, 16, generator=g)
    target = torch.randint(0, 3, (4, 16, 16), generator=g)
    target[:, 0] = 255
    cpu = M.confusion_matrix(logits, target, 3, ignore_index=255, per_image=True)
    cuda = M.confusion_matrix(logits.cuda(), target.cuda(), 3, ignore_index=255, per_image=True)
    assert cuda.device.type == "cuda" and torch.equal(cuda.cpu(), cpu)
    assert_values(M.mean_iou(cuda).cpu(), M.mean_iou(cpu))


def test_out_of_range_labels_are_not_counted():
    target = torch.tensor([[[0, 1, 3, -2]]])
    pred = torch.tensor([[[0, 5, 1, 1]]])
    assert M.confusion_matrix(pred, target, 3).tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (torch.randn(2, 4, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long), "C = num_classes = 3"),
        (torch.zeros(2, 3, 3, dtype=torch.bool), torch.zeros(2, 3, 3, dtype=torch.long), "pred must be"),
        (torch.zeros(2, 3, 3, dtype=torch.long), torch.zeros(2, 3, 4, dtype=torch.long), "target must be"),
        (torch.zeros(2, 3, 3, dtype=torch.long), torch.zeros(2, 3, 3), "target must be an integer tensor"),
    ],
)
def test_confusion_matrix_rejects_bad_arguments(pred, target, match):
    with pytest.raises(ValueError, match=match):
        M.confusion_matrix(pred, target, 3)


def test_reductions_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"cm must be a confusion matrix"):
        M.iou(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="average must be one of"):
        M.iou(torch.zeros(3, 3), average="samples")
    with pytest.raises(ValueError, match=r"per-image confusion matrices \[N, C, C\]"):
        M.imagewise_mean_iou(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="ignore_class"):
        M.series_iou(torch.zeros(1, 1))
