"""Segmentation metrics: counts first, reductions second.

Hard metrics go through one confusion matrix. ``confusion_matrix`` turns predictions (logits
float [N, C, H, W] or labels int [N, H, W]) and ``target`` int [N, H, W] into int64 counts
[C, C] with rows = truth and columns = prediction, or [N, C, C] with ``per_image=True``. Every
reduction (``pixel_accuracy``, ``iou``, ``dice``, ``precision``, ``recall``, ``series_iou``)
takes such a matrix, batched over any leading axes ([..., C, C]), and returns float64 [...]
or [..., C]. Counts add up: the matrix of a dataset is the sum of its batches' matrices, so
a validation loop sums matrices and reduces once at the end.

Undefined scores are NaN, never a silent 0 or 1: a class's IoU or Dice is undefined when the
class is absent from both truth and prediction, its precision when it is never predicted, its
recall when it is absent from the truth. Means (``average="macro"``) are taken over the
classes whose score is defined, so absent classes neither help nor hurt; ``"weighted"``
weights defined classes by their share of the true pixels; ``"micro"`` pools the counts of
all classes first. A mean with no defined class at all (an empty matrix) is NaN.

Two more count kernels follow the same pattern. ``boundary_counts`` gives per-class Boundary
IoU counts (intersection, union) int64 [C] over each class's boundary band, a width
d = :func:`boundary_width` (a ``dilation_ratio`` of the image diagonal) inside its mask
(Cheng et al., CVPR 2021); ``boundary_iou`` reduces them, ``summarize_boundary`` reports them
with the ratio and width. ``calibration_counts`` gives float64 [3, B] per-bin sums (pixels,
confidence, correct) of the top-label confidence; ``ece``, ``mce`` and ``reliability`` reduce
them (drawn by :mod:`functional_seg.reliability`). Both ignore ``ignore_index`` pixels and run
under vmap and ``torch.compile``.

Soft metrics work on softmax probabilities and stay differentiable: ``soft_stats`` gives the
per-class soft intersection and sums that the overlap losses in :mod:`functional_seg.losses`
are built on, ``soft_iou_metric`` the soft IoU itself.

The article series' own figures (see ``SERIES.md``) are ``series_iou`` (micro Jaccard with
class 1, BACKGROUND, ignored) and ``series_custom_iou`` (soft IoU per image, all classes
pooled, +0.001 smoothing). ``summarize`` turns a matrix into plain Python floats for logs and
JSON; ``format_table`` prints them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "confusion_matrix",
    "pixel_accuracy",
    "iou",
    "mean_iou",
    "imagewise_mean_iou",
    "dice",
    "mean_dice",
    "precision",
    "recall",
    "series_iou",
    "boundary_width",
    "boundary_counts",
    "boundary_iou",
    "summarize_boundary",
    "CALIBRATION_ROWS",
    "calibration_counts",
    "reliability",
    "ece",
    "mce",
    "summarize_calibration",
    "soft_stats",
    "soft_iou_metric",
    "series_custom_iou",
    "summarize",
    "format_table",
]

AVERAGES = (None, "macro", "weighted", "micro")


# ----------------------------------------------------------------------------- validation


def _shape(x: Tensor) -> str:
    return f"[{', '.join(str(s) for s in x.shape)}]"


def _check_target(target: Tensor, n: int, h: int, w: int, *, int64: bool) -> None:
    ok_dtype = target.dtype == torch.int64 if int64 else _is_int(target)
    if not isinstance(target, Tensor) or not ok_dtype or tuple(target.shape) != (n, h, w):
        want = "int64" if int64 else "an integer tensor"
        got = f"dtype={target.dtype}, shape={_shape(target)}" if isinstance(target, Tensor) else type(target)
        raise ValueError(f"target must be {want} [N, H, W] matching logits' N, H, W = [{n}, {h}, {w}]; got {got}")


def _is_int(x: Tensor) -> bool:
    return not x.dtype.is_floating_point and not x.dtype.is_complex and x.dtype != torch.bool


def _check_logits_target(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> int:
    """Validate the (logits, target[, weight]) triple every loss and soft metric takes.

    Only shapes and dtypes are checked (static under ``torch.compile`` and ``vmap``), never
    values: a label outside [0, C) that is not the ignore index is the caller's error.

    Returns:
        The number of classes C.
    """
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point or logits.ndim != 4:
        got = f"dtype={logits.dtype}, shape={_shape(logits)}" if isinstance(logits, Tensor) else type(logits)
        raise ValueError(f"logits must be a float tensor [N, C, H, W]; got {got}")
    n, c, h, w = logits.shape
    _check_target(target, n, h, w, int64=True)
    if weight is not None:
        if not isinstance(weight, Tensor) or not weight.dtype.is_floating_point or tuple(weight.shape) != (c,):
            got = f"dtype={weight.dtype}, shape={_shape(weight)}" if isinstance(weight, Tensor) else type(weight)
            raise ValueError(f"weight must be a float tensor [C] with C = {c} (logits' classes); got {got}")
    return c


def _check_cm(cm: Tensor) -> None:
    if not isinstance(cm, Tensor) or cm.ndim < 2 or cm.shape[-1] != cm.shape[-2]:
        got = _shape(cm) if isinstance(cm, Tensor) else type(cm)
        raise ValueError(f"cm must be a confusion matrix [..., C, C] (rows = truth); got {got}")


def _check_average(average: str | None) -> None:
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}; got {average!r}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Half-precision logits are upcast: softmax sums over a whole batch need float32."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


# ----------------------------------------------------------------------------- confusion matrix


def confusion_matrix(
    pred: Tensor,
    target: Tensor,
    num_classes: int,
    *,
    ignore_index: int | None = None,
    per_image: bool = False,
    method: str = "bincount",
) -> Tensor:
    """Count (truth, prediction) label pairs with a single ``bincount`` (or, vmap-safe, by comparison).

    Labels are shifted by one and clamped to [0, C + 1], so every label below 0 lands in row
    (or column) 0 and every label >= C in row C + 1; each pixel then maps to one flat bin
    ``row * columns + column`` (offset per image when ``per_image``), one ``bincount`` counts
    them, and the border rows and columns are sliced off (argmax labels of logits need no
    border columns). Ignored pixels (an ``ignore_index`` inside [0, C) is first moved below
    0) and labels outside [0, C) are thus never counted, as in torchvision's reference
    ConfusionMatrix. No boolean indexing and a static output shape (``minlength`` covers
    every bin), so it runs under ``torch.compile(fullgraph=True)`` and on any device. (On
    CUDA, torch's ``bincount`` itself reads its input's min and max back to the host: two
    small syncs per call, measured on an H200; a ``scatter_add_`` into fixed bins avoids them
    but was 3x slower there, atomics on few bins.)

    Args:
        pred: logits float [N, C, H, W] (argmax over C, first maximum on ties) or labels
            int [N, H, W].
        target: int [N, H, W] true labels.
        num_classes: C (static under compile).
        ignore_index: label in ``target`` whose pixels are not counted (static).
        per_image: return one matrix per image, [N, C, C] (static).
        method: "bincount" (above), or "compare" for code under ``torch.func.vmap`` (the train
            and eval steps, which ensembles vmap): ``bincount`` has no vmap batching rule, and
            under ``torch.compile(vmap(...))`` its fallback needs a data-dependent size. "compare"
            tests every pixel's flat bin against the C*C bin ids and sums, per image along the
            innermost axis (N*C*C parallel sums; one C*C reduction over every pixel measured
            0.6 ms per step on an H200): exact int64 arithmetic that inductor fuses into one
            reduction, no atomics. Static.

    Returns:
        int64 [C, C] (or [N, C, C]); ``cm[t, p]`` counts pixels of true class t predicted p.
    """
    labels, from_logits = _pred_labels(pred, target, num_classes)
    n = labels.shape[0]
    if method == "compare":
        return _confusion_by_comparison(labels, target, num_classes, ignore_index, per_image)
    if method != "bincount":
        raise ValueError(f"unknown confusion method {method!r}; expected 'bincount' or 'compare'")

    c = num_classes
    truth = target.long()
    if ignore_index is not None and 0 <= ignore_index < c:
        truth = torch.where(truth == ignore_index, -1, truth)
    rows = c + 2
    # In-place ops below only touch fresh intermediates, never the arguments.
    row = (truth + 1).clamp_(0, c + 1)
    if from_logits:  # argmax labels are in range: no border columns needed
        cols, col_slice = c, slice(None)
        flat = torch.add(labels, row, alpha=cols)
    else:
        cols, col_slice = c + 2, slice(1, -1)
        flat = torch.add((labels + 1).clamp_(0, c + 1), row, alpha=cols)
    bins = rows * cols
    if per_image:
        flat = flat.add_(bins * torch.arange(n, device=flat.device).view(n, 1, 1))
        bins = n * bins
    counts = torch.bincount(flat.reshape(-1), minlength=bins).view(-1, rows, cols)[:, 1:-1, col_slice]
    return counts if per_image else counts.reshape(c, c)


def _pred_labels(pred: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, bool]:
    """Validate (pred, target, num_classes); return int64 labels [N, H, W] and whether pred was logits."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    if not isinstance(pred, Tensor):
        raise ValueError(f"pred must be a tensor; got {type(pred)}")
    if pred.dtype.is_floating_point:
        if pred.ndim != 4 or pred.shape[1] != num_classes:
            raise ValueError(
                f"pred as logits must be float [N, C, H, W] with C = num_classes = {num_classes}; "
                f"got shape {_shape(pred)}"
            )
        # max().indices is argmax with the same first-maximum tie rule, and on CPU several
        # times faster than argmax over a non-innermost dimension.
        labels = pred.max(dim=1).indices
        from_logits = True
    elif _is_int(pred) and pred.ndim == 3:
        labels = pred.long()
        from_logits = False
    else:
        raise ValueError(
            f"pred must be logits float [N, C, H, W] or labels int [N, H, W]; "
            f"got dtype={pred.dtype}, shape={_shape(pred)}"
        )
    _check_target(target, *labels.shape, int64=False)
    return labels, from_logits


def _confusion_by_comparison(labels: Tensor, target: Tensor, c: int, ignore_index: int | None,
                             per_image: bool) -> Tensor:
    truth = target.long()
    valid = (truth >= 0) & (truth < c)
    if ignore_index is not None:
        valid = valid & (truth != ignore_index)
    flat = torch.where(valid & (labels >= 0) & (labels < c), truth * c + labels, c * c)  # c * c: no bin
    bins = torch.arange(c * c, device=flat.device)
    counts = (flat.reshape(flat.shape[0], 1, -1) == bins[:, None]).sum(dim=-1, dtype=torch.int64)
    counts = counts.reshape(-1, c, c)
    return counts if per_image else counts.sum(dim=0)


# ----------------------------------------------------------------------------- reductions


def _stats(cm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(true positives, truth counts = tp + fn, predicted counts = tp + fp), each float64 [..., C]."""
    _check_cm(cm)
    cm = cm.to(torch.float64)  # exact integer counts up to 2**53
    tp = torch.diagonal(cm, dim1=-2, dim2=-1)
    return tp, cm.sum(dim=-1), cm.sum(dim=-2)


def _divide(num: Tensor, den: Tensor) -> Tensor:
    """num / den, NaN where den == 0 (an undefined score), without a 0/0 in the graph."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.full_like(num, math.nan))


def _reduce(num: Tensor, den: Tensor, support: Tensor, average: str | None) -> Tensor:
    """Per-class scores num / den [..., C], or their macro / weighted / micro mean [...]."""
    _check_average(average)
    if average == "micro":
        return _divide(num.sum(dim=-1), den.sum(dim=-1))
    scores = _divide(num, den)
    if average is None:
        return scores
    defined = den > 0
    weights = defined.to(num.dtype) if average == "macro" else torch.where(defined, support, 0.0)
    total = (weights * torch.where(defined, scores, 0.0)).sum(dim=-1)
    return _divide(total, weights.sum(dim=-1))


def pixel_accuracy(cm: Tensor) -> Tensor:
    """Fraction of counted pixels whose predicted label is the true one (micro accuracy).

    Args:
        cm: confusion matrix [..., C, C].

    Returns:
        float64 [...]; NaN for an empty matrix.
    """
    tp, support, _ = _stats(cm)
    return _divide(tp.sum(dim=-1), support.sum(dim=-1))


def iou(cm: Tensor, *, average: str | None = None) -> Tensor:
    """Intersection over union (Jaccard index) tp / (tp + fp + fn).

    Args:
        cm: confusion matrix [..., C, C].
        average: None for per-class scores; ``"macro"`` (mean over classes present in truth or
            prediction), ``"weighted"`` (by true-pixel frequency, the "frequency weighted IoU"
            of Long et al. 2015) or ``"micro"`` (pooled counts).

    Returns:
        float64 [..., C] (NaN for a class absent from truth and prediction), or [...] if averaged.
    """
    tp, support, predicted = _stats(cm)
    return _reduce(tp, support + predicted - tp, support, average)


def mean_iou(cm: Tensor, *, average: str = "macro") -> Tensor:
    """Mean IoU; by default the macro mean over classes present in truth or prediction.

    A class absent from both is left out of the mean (its IoU is undefined), as torchmetrics'
    ``MulticlassJaccardIndex(average="macro")`` does. A batched matrix [N, C, C] gives one
    mean per image, [N].
    """
    if average is None:
        raise ValueError("mean_iou needs average='macro', 'weighted' or 'micro'; use iou() per class")
    return iou(cm, average=average)


def imagewise_mean_iou(cm: Tensor) -> Tensor:
    """Mean over images of each image's macro mean IoU (classes present in that image).

    Args:
        cm: per-image confusion matrices int [N, C, C] (``confusion_matrix(..., per_image=True)``).

    Returns:
        float64 0-d; images with no counted pixel are left out (NaN if all are empty).
    """
    _check_cm(cm)
    if cm.ndim != 3:
        raise ValueError(f"cm must be per-image confusion matrices [N, C, C]; got {_shape(cm)}")
    per_image = mean_iou(cm)
    defined = ~per_image.isnan()
    return _divide(torch.where(defined, per_image, 0.0).sum(), defined.sum().to(per_image.dtype))


def dice(cm: Tensor, *, average: str | None = None) -> Tensor:
    """Dice score (F1) 2 tp / (2 tp + fp + fn); ``average`` as in :func:`iou`.

    Returns:
        float64 [..., C] (NaN for a class absent from truth and prediction), or [...] if averaged.
    """
    tp, support, predicted = _stats(cm)
    return _reduce(2 * tp, support + predicted, support, average)


def mean_dice(cm: Tensor, *, average: str = "macro") -> Tensor:
    """Mean Dice over classes present in truth or prediction (by default macro)."""
    if average is None:
        raise ValueError("mean_dice needs average='macro', 'weighted' or 'micro'; use dice() per class")
    return dice(cm, average=average)


def precision(cm: Tensor, *, average: str | None = None) -> Tensor:
    """Precision tp / (tp + fp); NaN for a class never predicted. ``average`` as in :func:`iou`."""
    tp, support, predicted = _stats(cm)
    return _reduce(tp, predicted, support, average)


def recall(cm: Tensor, *, average: str | None = None) -> Tensor:
    """Recall tp / (tp + fn); NaN for a class absent from the truth. ``average`` as in :func:`iou`."""
    tp, support, _ = _stats(cm)
    return _reduce(tp, support, support, average)


def series_iou(cm: Tensor, *, ignore_class: int = 1) -> Tensor:
    """The article series' "IoU": micro Jaccard with one class (BACKGROUND = 1) ignored.

    Equals torchmetrics' ``MulticlassJaccardIndex(C, average="micro", ignore_index=1)`` on the
    same pixels: pixels whose truth is ``ignore_class`` are dropped, then tp and tp + fp + fn
    are pooled over the other classes (pixels *predicted* as ``ignore_class`` still count as
    misses of their true class). The series computed it per batch; from an accumulated matrix
    this is the dataset-level figure.

    Args:
        cm: confusion matrix [..., C, C], C >= 2.
        ignore_class: the class left out (static).

    Returns:
        float64 [...]; NaN when no pixel is left.
    """
    _check_cm(cm)
    c = cm.shape[-1]
    if not 0 <= ignore_class < c:
        raise ValueError(f"ignore_class must lie in [0, {c}); got {ignore_class}")
    keep = torch.arange(c, device=cm.device) != ignore_class
    tp, support, predicted = _stats(cm * keep.unsqueeze(-1).to(cm.dtype))
    keep = keep.to(tp.dtype)
    return _divide((tp * keep).sum(dim=-1), ((support + predicted - tp) * keep).sum(dim=-1))


# ----------------------------------------------------------------------------- boundary IoU


def boundary_width(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """The boundary band's width d in pixels: round(dilation_ratio x image diagonal), at least 1.

    As in the reference ``mask_to_boundary`` (Cheng et al., "Boundary IoU", CVPR 2021;
    ``bowenc0221/boundary-iou-api``): ``int(round(ratio * sqrt(h**2 + w**2)))``, rounding half
    to even, and never below one pixel. The default 0.02 gives d = 7 for 256 x 256 images.
    """
    _check_ratio(dilation_ratio)
    return max(1, int(round(dilation_ratio * math.sqrt(height * height + width * width))))


def _check_ratio(dilation_ratio: float) -> None:
    if isinstance(dilation_ratio, bool) or not isinstance(dilation_ratio, int | float) or not dilation_ratio > 0:
        raise ValueError(f"dilation_ratio must be a positive number (of the image diagonal); got {dilation_ratio!r}")


def _inner_band(masks: Tensor, d: int) -> Tensor:
    """The pixels of bool masks [B, H, W] within d of their outside: mask minus its erosion.

    The reference erodes d times with a 3x3 kernel and zero padding (``cv2.erode`` after a
    one-pixel ``copyMakeBorder``): pixels outside the image count as outside the mask, so a
    mask cut by the image border has a band along it. Erosion composes by Minkowski sums, so d
    3x3 erosions are one erosion by the (2d + 1) square, which is a max-pool of the complement
    (padded with 1 = outside), separable into a column pool and a row pool: O(H W d) per mask,
    vmap- and compile-safe, exact on {0, 1} values in any float dtype.
    """
    outside = F.pad((~masks).to(torch.float32).unsqueeze(1), (d, d, d, d), value=1.0)
    outside = F.max_pool2d(outside, (2 * d + 1, 1), stride=1)
    outside = F.max_pool2d(outside, (1, 2 * d + 1), stride=1)
    return masks & (outside.squeeze(1) > 0)


def boundary_counts(
    pred: Tensor,
    target: Tensor,
    num_classes: int,
    *,
    ignore_index: int | None = None,
    dilation_ratio: float = 0.02,
    per_image: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-class Boundary IoU counts: |G_d n P_d| and |G_d u P_d| over each class's boundary band.

    For every class k, G = (target == k) and P = (pred == k) are binary masks and X_d is X's
    inner band of width d = :func:`boundary_width` (X minus its erosion, see the reference
    definition in :func:`boundary_width`); the counts are |G_d n P_d| and |G_d u P_d|. Each
    class is eroded on its own binary mask (detectron2's semantic evaluator erodes the
    multi-class label map instead, which mixes classes' bands). Counts add up over images and
    batches like the confusion matrix; :func:`boundary_iou` divides them once at the end.

    Ignored pixels (``ignore_index``, and any target label outside [0, C)) are outside every
    class in both masks, the prediction there being replaced: they erode their neighbours, as
    the image border does in the reference (a void ring around an object, as in VOC, is where
    its true contour lies), and they are never counted. So a prediction that is right on every
    counted pixel scores 1, and predictions on ignored pixels never change a count. Predicted
    labels outside [0, C) belong to no class.

    Args:
        pred: logits float [N, C, H, W] (argmax over C) or labels int [N, H, W].
        target: int [N, H, W] true labels.
        num_classes: C (static under compile).
        ignore_index: label in ``target`` whose pixels are left out (static).
        dilation_ratio: band width as a fraction of the image diagonal (static); record it with
            the scores, they depend on it.
        per_image: counts per image, [N, C] (static).

    Returns:
        (intersection, union), int64 [C] each (or [N, C]). Memory: a few bool and one float32
        tensor of N x C x H x W.
    """
    labels, _ = _pred_labels(pred, target, num_classes)
    c, (n, h, w) = num_classes, labels.shape
    d = boundary_width(h, w, dilation_ratio)
    truth = target.long()
    valid = (truth >= 0) & (truth < c)
    if ignore_index is not None:
        valid = valid & (truth != ignore_index)
    classes = torch.arange(c, device=truth.device).view(1, c, 1, 1)
    valid = valid.unsqueeze(1)
    masks = torch.cat([(truth.unsqueeze(1) == classes) & valid, (labels.unsqueeze(1) == classes) & valid])
    bands = _inner_band(masks.reshape(2 * n * c, h, w), d).reshape(2, n, c, h, w)
    inter = (bands[0] & bands[1]).sum(dim=(2, 3), dtype=torch.int64)
    union = (bands[0] | bands[1]).sum(dim=(2, 3), dtype=torch.int64)
    return (inter, union) if per_image else (inter.sum(dim=0), union.sum(dim=0))


def boundary_iou(intersection: Tensor, union: Tensor, *, average: str | None = None) -> Tensor:
    """Boundary IoU from :func:`boundary_counts`: intersection / union per class, or a mean.

    Args:
        intersection, union: int [..., C] (summed over any number of batches).
        average: None for per-class scores, ``"macro"`` (mean over classes with a non-empty
            union) or ``"micro"`` (pooled counts).

    Returns:
        float64 [..., C] (NaN where the union is empty: the class has no band in truth or
        prediction), or [...] if averaged.
    """
    pair = (intersection, union)
    if not all(isinstance(x, Tensor) for x in pair) or intersection.shape != union.shape or intersection.ndim < 1:
        raise ValueError("intersection and union must be tensors of one shape [..., C] (from boundary_counts)")
    if average == "weighted":
        raise ValueError("boundary_iou takes average=None, 'macro' or 'micro'; got 'weighted'")
    inter, union = intersection.to(torch.float64), union.to(torch.float64)
    return _reduce(inter, union, union, average)


# ----------------------------------------------------------------------------- calibration

CALIBRATION_ROWS = ("count", "confidence_sum", "correct_sum")
CALIBRATION_BINS = 15  # the default B of calibration_counts (Guo et al.'s 15 bins)


def calibration_counts(
    probs: Tensor,
    target: Tensor,
    *,
    num_bins: int = CALIBRATION_BINS,
    ignore_index: int | None = None,
) -> Tensor:
    """Per-bin counts of top-label confidence and correctness, for ECE and reliability diagrams.

    Every counted pixel falls in bin b = ceil(B x confidence) - 1 of B equal-width bins, bin b
    covering (b / B, (b + 1) / B] (confidence 0 goes to bin 0), with confidence = max_c p_c and
    correct = (argmax_c p_c == target) (Guo et al., "On Calibration of Modern Neural Networks",
    ICML 2017). Rows add up over batches like confusion counts; float64 keeps integer counts
    exact up to 2**53 pixels. Ignored pixels (``ignore_index`` and labels outside [0, C)) are
    not counted. One ``scatter_add`` into fixed bins: vmap- and compile-safe.

    Args:
        probs: float [N, C, H, W] class probabilities: ``softmax(logits, 1)``, or an ensemble's
            mean probabilities.
        target: int [N, H, W] true labels.
        num_bins: B (static).
        ignore_index: label whose pixels are left out (static).

    Returns:
        float64 [3, B], rows :data:`CALIBRATION_ROWS`: pixel count, sum of confidences, number
        of correct pixels.
    """
    if not isinstance(probs, Tensor) or not probs.dtype.is_floating_point or probs.ndim != 4:
        got = f"dtype={probs.dtype}, shape={_shape(probs)}" if isinstance(probs, Tensor) else type(probs)
        raise ValueError(f"probs must be a float tensor [N, C, H, W]; got {got}")
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int; got {num_bins!r}")
    n, c, h, w = probs.shape
    _check_target(target, n, h, w, int64=False)
    confidence, pred = probs.max(dim=1)
    confidence = confidence.to(torch.float64)
    truth = target.long()
    valid = (truth >= 0) & (truth < c)
    if ignore_index is not None:
        valid = valid & (truth != ignore_index)
    weight = valid.to(torch.float64)
    bins = (confidence * num_bins).ceil().long().sub(1).clamp(0, num_bins - 1)
    rows = torch.stack([weight, confidence * weight, (pred == truth).to(torch.float64) * weight]).reshape(3, -1)
    out = torch.zeros(3, num_bins, dtype=torch.float64, device=probs.device)
    return out.scatter_add(1, bins.reshape(1, -1).expand(3, -1), rows)


def _check_calibration(counts: Tensor) -> None:
    if not isinstance(counts, Tensor) or counts.ndim < 2 or counts.shape[-2] != 3:
        got = _shape(counts) if isinstance(counts, Tensor) else type(counts)
        raise ValueError(f"counts must be calibration counts [..., 3, B] (from calibration_counts); got {got}")


def reliability(counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin mean confidence, accuracy and share of the pixels: the reliability diagram's data.

    Args:
        counts: float [..., 3, B] from :func:`calibration_counts`.

    Returns:
        (confidence, accuracy, fraction), float64 [..., B] each; confidence and accuracy are
        NaN in empty bins, fraction is NaN when nothing was counted.
    """
    _check_calibration(counts)
    count, conf, correct = counts.to(torch.float64).unbind(dim=-2)
    return _divide(conf, count), _divide(correct, count), _divide(count, count.sum(dim=-1, keepdim=True))


def ece(counts: Tensor) -> Tensor:
    """Expected calibration error sum_b (n_b / n) |accuracy_b - confidence_b|.

    Equal to sum_b |correct_b - confidence sum_b| / n, so no empty bin divides by zero.

    Args:
        counts: float [..., 3, B] from :func:`calibration_counts`.

    Returns:
        float64 [...] in [0, 1]; NaN when nothing was counted.
    """
    _check_calibration(counts)
    count, conf, correct = counts.to(torch.float64).unbind(dim=-2)
    return _divide((correct - conf).abs().sum(dim=-1), count.sum(dim=-1))


def mce(counts: Tensor) -> Tensor:
    """Maximum calibration error max_b |accuracy_b - confidence_b| over the non-empty bins.

    Returns:
        float64 [...]; NaN when nothing was counted.
    """
    confidence, accuracy, _ = reliability(counts)
    gap = (accuracy - confidence).abs()
    worst = torch.where(gap.isnan(), -1.0, gap).amax(dim=-1)
    return torch.where(worst < 0, math.nan, worst)


def summarize_calibration(counts: Tensor) -> dict[str, float | list[float]]:
    """``ece``, ``mce``, ``calibration_bins`` (B) and the per-bin ``reliability_confidence``,
    ``reliability_accuracy`` and ``reliability_count`` of counts [3, B], as plain Python floats."""
    _check_calibration(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be [3, B] (sum any batch axes first); got {_shape(counts)}")
    confidence, accuracy, _ = reliability(counts)
    return {"ece": _floats(ece(counts)), "mce": _floats(mce(counts)), "calibration_bins": counts.shape[-1],
            "reliability_confidence": _floats(confidence), "reliability_accuracy": _floats(accuracy),
            "reliability_count": _floats(counts[0])}


# ----------------------------------------------------------------------------- soft metrics


def soft_stats(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int | None = None,
    per_image: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Soft counts from softmax probabilities: the kernel of soft IoU, Dice and Tversky.

    With p = softmax(logits) and t the one-hot target, sums over the batch and pixels give
    the soft intersection I = sum p t, the predicted mass P = sum p and the true count
    T = sum t per class; soft fp = P - I and fn = T - I. Ignored pixels are masked out of
    all three (by multiplication, so they get exactly zero gradient).

    Args:
        logits: float [N, C, H, W].
        target: int64 [N, H, W], labels in [0, C) or ``ignore_index``.
        ignore_index: label whose pixels are left out (static).
        per_image: sum per image instead of over the whole batch (static).

    Returns:
        (I, P, T), each float [C] (or [N, C] when ``per_image``), in the logits' dtype
        (float32 for half-precision logits).
    """
    c = _check_logits_target(logits, target)
    probs = torch.softmax(logits.to(_compute_dtype(logits)), dim=1)
    classes = torch.arange(c, device=target.device).view(1, c, 1, 1)
    onehot = (target.unsqueeze(1) == classes).to(probs.dtype)
    if ignore_index is not None:
        valid = (target != ignore_index).unsqueeze(1).to(probs.dtype)
        probs = probs * valid
        onehot = onehot * valid
    dims = (2, 3) if per_image else (0, 2, 3)
    return (probs * onehot).sum(dim=dims), probs.sum(dim=dims), onehot.sum(dim=dims)


def _class_mean(scores: Tensor, weight: Tensor | None) -> Tensor:
    """Macro mean over the last (class) axis, or the ``weight``-weighted mean."""
    if weight is None:
        return scores.mean(dim=-1)
    weight = weight.to(scores.dtype)
    den = weight.sum()
    return (scores * weight).sum(dim=-1) / torch.where(den > 0, den, torch.ones_like(den))


def soft_iou_metric(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int | None = None,
    eps: float = 1.0,
) -> Tensor:
    """Differentiable soft IoU M = mean_c (I_c + eps) / (U_c + eps), U = P + T - I.

    Sums run over the whole batch ("batch" reduction, as in segmentation_models_pytorch).
    The additive ``eps`` (Laplace smoothing) keeps every class finite: a class absent from the
    truth and (softly) from the prediction scores 1, a correct "not here"; for classes
    present in a real batch (millions of pixels) eps = 1 is negligible. ``soft_iou(log=False)``
    is 1 - M and ``soft_iou(log=True)`` is -log M.

    Args:
        logits: float [N, C, H, W].
        target: int64 [N, H, W].
        weight: optional float [C]; the mean over classes becomes sum w_c M_c / sum w_c.
        ignore_index: label whose pixels are left out (static).
        eps: smoothing, > 0 (static).

    Returns:
        0-d float tensor in (0, 1].
    """
    _check_logits_target(logits, target, weight)
    _check_eps(eps)
    inter, pred_sum, true_sum = soft_stats(logits, target, ignore_index=ignore_index)
    union = (pred_sum + true_sum - inter).clamp_min(0.0)
    return _class_mean((inter + eps) / (union + eps), weight)


def _check_eps(eps: float) -> None:
    if not isinstance(eps, int | float) or not eps > 0:
        raise ValueError(f"eps must be a positive number (it keeps absent classes finite); got {eps!r}")


SERIES_EPS = 1e-3  # the series' smoothing of its custom IoU


def series_custom_iou(logits: Tensor, target: Tensor, *, ignore_index: int | None = None, eps: float = SERIES_EPS,
                      reduction: str = "mean") -> Tensor:
    """The article series' "custom IoU": per-image soft IoU, classes pooled, averaged over images.

    For each image, (sum_{c,h,w} p t + eps) / (sum_{c,h,w} (p + t - p t) + eps) with the
    series' eps = 0.001, then the mean over the N images. Differentiable (the series' loss was
    ``-log`` of it).

    Args:
        logits: float [N, C, H, W].
        target: int64 [N, H, W].
        ignore_index: label whose pixels are left out (static).
        eps: smoothing added to numerator and denominator (static).
        reduction: "mean" over the images, or "none" for each image's value (float [N]), to
            average over the real images of a padded evaluation batch.

    Returns:
        0-d float tensor (float [N] with ``reduction="none"``).
    """
    _check_eps(eps)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    inter, pred_sum, true_sum = soft_stats(logits, target, ignore_index=ignore_index, per_image=True)
    inter = inter.sum(dim=-1)
    union = (pred_sum.sum(dim=-1) + true_sum.sum(dim=-1) - inter).clamp_min(0.0)
    per_image = (inter + eps) / (union + eps)
    return per_image.mean() if reduction == "mean" else per_image


# ----------------------------------------------------------------------------- reporting


def _floats(x: Tensor) -> float | list[float]:
    return x.detach().to("cpu", torch.float64).tolist()


def summarize(cm: Tensor, class_names: Sequence[str] | None = None, *, series: bool = False
              ) -> dict[str, float | list[float]]:
    """Every metric of a confusion matrix as plain Python floats (for logs and JSON).

    Keys: ``pixel_accuracy``, ``mean_iou`` (macro over present classes), ``weighted_iou``,
    ``micro_iou``, ``iou`` (per class), ``dice`` (per class), ``mean_dice``, ``precision`` and
    ``recall`` (per class), ``mean_precision``, ``mean_recall``, ``series_iou`` (class 1
    ignored; only with ``series=True``: the article series' figure, which means something for the
    Oxford trimaps only, where class 1 is the background), and ``imagewise_mean_iou`` when ``cm`` is per image
    [N, C, C] (the other figures then use the summed matrix). With ``class_names``, each
    per-class value is also given flat as ``"iou/<name>"``, ``"dice/<name>"``, ... for loggers
    that want scalars. Undefined values are ``nan`` (see the module docstring).

    Args:
        cm: confusion matrix int [C, C] or per image [N, C, C].
        class_names: optional C names.

    Returns:
        dict of str -> float or list[float] (length C).
    """
    _check_cm(cm)
    if cm.ndim not in (2, 3):
        raise ValueError(f"cm must be [C, C] or per image [N, C, C]; got {_shape(cm)}")
    total = cm.sum(dim=0) if cm.ndim == 3 else cm
    c = total.shape[-1]
    if class_names is not None and len(class_names) != c:
        raise ValueError(f"class_names must name all {c} classes; got {len(class_names)}")
    out: dict[str, float | list[float]] = {
        "pixel_accuracy": _floats(pixel_accuracy(total)),
        "mean_iou": _floats(mean_iou(total)),
        "weighted_iou": _floats(mean_iou(total, average="weighted")),
        "micro_iou": _floats(mean_iou(total, average="micro")),
        "iou": _floats(iou(total)),
        "dice": _floats(dice(total)),
        "mean_dice": _floats(mean_dice(total)),
        "precision": _floats(precision(total)),
        "recall": _floats(recall(total)),
        "mean_precision": _floats(precision(total, average="macro")),
        "mean_recall": _floats(recall(total, average="macro")),
    }
    if series and c >= 2:
        out["series_iou"] = _floats(series_iou(total))
    if cm.ndim == 3:
        out["imagewise_mean_iou"] = _floats(imagewise_mean_iou(cm))
    if class_names is not None:
        for key in _PER_CLASS:
            for name, value in zip(class_names, out[key]):
                out[f"{key}/{name}"] = value
    return out


def summarize_boundary(intersection: Tensor, union: Tensor, *, dilation_ratio: float,
                       image_size: tuple[int, int] | None = None,
                       class_names: Sequence[str] | None = None) -> dict[str, float | list[float]]:
    """Boundary IoU as plain Python floats, with the band it was measured on.

    Scores depend on the band width, so it travels with them: ``boundary_dilation_ratio``
    always, ``boundary_width_px`` (:func:`boundary_width`) when the evaluated ``image_size``
    (H, W) is given. Other keys: ``boundary_iou`` (per class, NaN where undefined),
    ``mean_boundary_iou`` (macro over defined classes) and, with ``class_names``,
    ``"boundary_iou/<name>"``.

    Args:
        intersection, union: int [C] from :func:`boundary_counts`, summed over the split.
    """
    scores = boundary_iou(intersection, union)
    if scores.ndim != 1:
        raise ValueError(f"intersection and union must be [C] (sum any batch axes first); got {_shape(scores)}")
    if class_names is not None and len(class_names) != scores.shape[0]:
        raise ValueError(f"class_names must name all {scores.shape[0]} classes; got {len(class_names)}")
    out: dict[str, float | list[float]] = {
        "boundary_iou": _floats(scores),
        "mean_boundary_iou": _floats(boundary_iou(intersection, union, average="macro")),
        "boundary_dilation_ratio": float(dilation_ratio),
    }
    if image_size is not None:
        out["boundary_width_px"] = boundary_width(*image_size, dilation_ratio)
    for name, value in zip(class_names or (), out["boundary_iou"]):
        out[f"boundary_iou/{name}"] = value
    return out


_PER_CLASS = ("iou", "dice", "precision", "recall")
_HEADERS = {"iou": "IoU", "dice": "Dice", "precision": "Precision", "recall": "Recall"}
_MEANS = {"iou": "mean_iou", "dice": "mean_dice", "precision": "mean_precision", "recall": "mean_recall"}
_SCALARS = {
    "pixel_accuracy": "pixel accuracy",
    "mean_iou": "mean IoU (macro)",
    "weighted_iou": "weighted IoU",
    "micro_iou": "micro IoU",
    "series_iou": "series IoU (class 1 ignored)",
    "imagewise_mean_iou": "imagewise mean IoU",
    "mean_boundary_iou": "mean Boundary IoU",
    "ece": "expected calibration error",
    "series_custom_iou": "series custom IoU",
}


def format_table(summary: Mapping[str, float | list[float]], class_names: Sequence[str] | None = None) -> str:
    """A small plain-text table of a :func:`summarize` dict: one row per class, then the means.

    Args:
        summary: the dict from :func:`summarize`.
        class_names: optional names for the rows (default ``class 0``, ``class 1``, ...).

    Returns:
        the table as one string (no trailing newline).
    """
    c = len(summary["iou"])
    names = list(class_names) if class_names is not None else [f"class {i}" for i in range(c)]
    if len(names) != c:
        raise ValueError(f"class_names must name all {c} classes; got {len(names)}")
    width = max(len(name) for name in [*names, "mean"])
    lines = [f"{'':<{width}}" + "".join(f"{_HEADERS[k]:>11}" for k in _PER_CLASS)]
    for i, name in enumerate(names):
        lines.append(f"{name:<{width}}" + "".join(f"{_cell(summary[k][i]):>11}" for k in _PER_CLASS))
    lines.append(f"{'mean':<{width}}" + "".join(f"{_cell(summary[_MEANS[k]]):>11}" for k in _PER_CLASS))
    label_width = max(len(label) for label in _SCALARS.values())
    for key, label in _SCALARS.items():
        if key in summary:
            lines.append(f"{label:<{label_width}} {_cell(summary[key])}")
    return "\n".join(lines)


def _cell(value) -> str:
    """A figure to 4 decimals; "-" where undefined (NaN, or None as strict JSON stores it)."""
    return "-" if value is None or value != value else f"{value:.4f}"
