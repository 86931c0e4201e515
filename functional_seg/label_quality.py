"""Label audit: which pixels and images of a segmentation dataset are likely mislabelled.

From out-of-sample class probabilities (each image scored by a model that did not train on it,
e.g. the held-out fold of a K-fold ensemble) probs float [N, C, H, W] and the given labels int
[N, H, W], in two passes over the data with O(C) state, on the device:

1. ``threshold_counts`` per batch, summed: float64 [2, C] (sum of p_k over the pixels
   labelled k, and their count); ``class_thresholds`` turns the sum into the confident-learning
   thresholds t_k = mean p_k over the pixels labelled k (Northcutt et al., "Confident
   Learning", JAIR 2021).
2. ``score_batch`` per batch: per-pixel label-quality scores and likely-issue masks, per-image
   scores (softmin of the pixel scores), issue counts and an issue heat map;
   ``rank_images`` orders images from the most to the least suspicious.

Where the definitions coincide the numbers are cleanlab 2.9's: pixel scores ``"self_confidence"``,
``"normalized_margin"`` and ``"adjusted_self_confidence"`` are cleanlab.rank's
``get_label_quality_scores(method=..., adjust_pred_probs=...)`` on pixels as examples; the image
score is cleanlab.segmentation.rank's ``get_label_quality_scores(method="softmin")``; the issue
mask is cleanlab.filter's ``find_label_issues(filter_by="confident_learning")`` on pixels as
examples: pixel with label y is an issue when it lies off the confident joint's diagonal (the
class j it is confidently counted as, p_j >= t_j, is not y) and y is not the argmax. That rule
is local given t, so it runs in the second pass; cleanlab.segmentation's own
``find_label_issues`` instead marks the n lowest-self-confidence pixels of the whole dataset,
n a dataset-wide count, which needs a global sort (a third pass) and is not reproduced here.

Ignored pixels (``ignore_index`` and labels outside [0, C)) never enter a threshold, a score or
a count; their pixel scores are NaN and they are never issues. No boolean indexing and static
shapes throughout: every function here runs under ``torch.compile`` and ``torch.func.vmap``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "METHODS",
    "threshold_counts",
    "class_thresholds",
    "pixel_scores",
    "issue_mask",
    "softmin",
    "score_batch",
    "rank_images",
]

METHODS = ("self_confidence", "normalized_margin", "adjusted_self_confidence")

# cleanlab.internal.constants: thresholds are clipped below at 2e-6 and compared with a 1e-6
# tolerance; a class nobody labelled gets a threshold no probability reaches (its BIG_VALUE).
_THRESHOLD_FLOOR = 2e-6
_TOLERANCE = 1e-6
_UNREACHABLE = 2.0


def _shape(x: Tensor) -> str:
    return f"[{', '.join(str(s) for s in x.shape)}]"


def _check(probs: Tensor, labels: Tensor) -> int:
    """Validate probs float [N, C, H, W] and labels int [N, H, W]; return C."""
    if not isinstance(probs, Tensor) or not probs.dtype.is_floating_point or probs.ndim != 4:
        got = f"dtype={probs.dtype}, shape={_shape(probs)}" if isinstance(probs, Tensor) else type(probs)
        raise ValueError(f"probs must be float class probabilities [N, C, H, W]; got {got}")
    n, c, h, w = probs.shape
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool \
            or tuple(labels.shape) != (n, h, w):
        got = f"dtype={labels.dtype}, shape={_shape(labels)}" if isinstance(labels, Tensor) else type(labels)
        raise ValueError(f"labels must be an integer tensor [N, H, W] matching probs' N, H, W = [{n}, {h}, {w}]; "
                         f"got {got}")
    return c


def _valid(labels: Tensor, c: int, ignore_index: int | None) -> Tensor:
    valid = (labels >= 0) & (labels < c)
    return valid if ignore_index is None else valid & (labels != ignore_index)


def _onehot(labels: Tensor, valid: Tensor, c: int) -> Tensor:
    """bool [N, C, H, W]: pixel labelled k (and counted) in channel k."""
    classes = torch.arange(c, device=labels.device).view(1, c, 1, 1)
    return (labels.unsqueeze(1) == classes) & valid.unsqueeze(1)


def _check_thresholds(thresholds: Tensor, c: int) -> None:
    if not isinstance(thresholds, Tensor) or not thresholds.dtype.is_floating_point or tuple(thresholds.shape) != (c,):
        got = f"shape={_shape(thresholds)}" if isinstance(thresholds, Tensor) else type(thresholds)
        raise ValueError(f"thresholds must be a float tensor [C] with C = {c} (from class_thresholds); got {got}")


def threshold_counts(probs: Tensor, labels: Tensor, *, ignore_index: int | None = None) -> Tensor:
    """The first pass: per class, the sum of p_k over the pixels labelled k, and their number.

    Args:
        probs: float [N, C, H, W] out-of-sample class probabilities.
        labels: int [N, H, W] given labels.
        ignore_index: label whose pixels are left out (static).

    Returns:
        float64 [2, C] (rows: probability sum, pixel count); counts of batches add up.
    """
    c = _check(probs, labels)
    onehot = _onehot(labels.long(), _valid(labels.long(), c, ignore_index), c).to(torch.float64)
    return torch.stack([(probs.to(torch.float64) * onehot).sum(dim=(0, 2, 3)), onehot.sum(dim=(0, 2, 3))])


def class_thresholds(counts: Tensor) -> Tensor:
    """Confident-learning thresholds t_k = mean p_k over the pixels labelled k.

    Args:
        counts: float64 [2, C] from :func:`threshold_counts`, summed over the whole dataset.

    Returns:
        float64 [C], clipped below at 2e-6 as cleanlab does; NaN for a class no pixel is
        labelled with (no pixel can then be confidently counted as that class).
    """
    if not isinstance(counts, Tensor) or counts.ndim != 2 or counts.shape[0] != 2:
        got = _shape(counts) if isinstance(counts, Tensor) else type(counts)
        raise ValueError(f"counts must be threshold counts [2, C] (from threshold_counts); got {got}")
    total, count = counts.to(torch.float64)
    mean = total / torch.where(count > 0, count, torch.ones_like(count))
    return torch.where(count > 0, mean.clamp_min(_THRESHOLD_FLOOR), math.nan)


def _usable(thresholds: Tensor, dtype: torch.dtype) -> Tensor:
    return thresholds.nan_to_num(_UNREACHABLE).to(dtype).view(1, -1, 1, 1)


def _given(probs: Tensor, labels: Tensor, c: int) -> Tensor:
    """p of the given label per pixel (label clamped into [0, C) so ignored pixels index safely)."""
    return probs.gather(1, labels.clamp(0, c - 1).unsqueeze(1)).squeeze(1)


def pixel_scores(probs: Tensor, labels: Tensor, *, method: str = "self_confidence", thresholds: Tensor | None = None,
                 ignore_index: int | None = None) -> Tensor:
    """Per-pixel label quality in [0, 1]; low means the given label is likely wrong.

    - ``"self_confidence"``: p_y, the probability of the given label y.
    - ``"normalized_margin"``: (p_y - max_{j != y} p_j + 1) / 2.
    - ``"adjusted_self_confidence"`` (confident-learning style, needs ``thresholds``): p_y after
      subtracting each class's threshold, shifting by max_k t_k and renormalising,
      p'_j = (p_j - t_j + max t) / sum_k (p_k - t_k + max t), so a class the model is
      habitually confident about needs more probability to vouch for a label.

    Args:
        probs: float [N, C, H, W]; labels: int [N, H, W].
        method: one of :data:`METHODS` (static).
        thresholds: float [C] from :func:`class_thresholds` (only for the adjusted score).
        ignore_index: label whose pixels get NaN (static).

    Returns:
        float [N, H, W] in probs' dtype, NaN on ignored pixels.
    """
    c = _check(probs, labels)
    labels = labels.long()
    if method == "self_confidence":
        score = _given(probs, labels, c)
    elif method == "normalized_margin":
        others = probs.masked_fill(_onehot(labels, torch.ones_like(labels, dtype=torch.bool), c), -math.inf)
        score = (_given(probs, labels, c) - others.amax(dim=1) + 1) / 2
    elif method == "adjusted_self_confidence":
        if thresholds is None:
            raise ValueError("method='adjusted_self_confidence' needs thresholds (from class_thresholds)")
        _check_thresholds(thresholds, c)
        t = _usable(thresholds, probs.dtype)
        adjusted = probs - t + t.amax()
        score = _given(adjusted / adjusted.sum(dim=1, keepdim=True), labels, c)
    else:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    return torch.where(_valid(labels, c, ignore_index), score, math.nan)


def issue_mask(probs: Tensor, labels: Tensor, thresholds: Tensor, *, ignore_index: int | None = None) -> Tensor:
    """Pixels whose label is likely wrong, by confident learning: bool [N, H, W].

    A pixel is confidently counted as class j when p_j >= t_j - 1e-6 (as the one such class,
    or, when several qualify, as the argmax); it is an issue when that class is not its label y
    and y is not the argmax either (after adding 1e-6 to p_y, cleanlab's tie margin). Never
    true on ignored pixels.

    Args:
        probs: float [N, C, H, W]; labels: int [N, H, W].
        thresholds: float [C] from :func:`class_thresholds` over the whole dataset.
        ignore_index: label whose pixels are left out (static).
    """
    c = _check(probs, labels)
    _check_thresholds(thresholds, c)
    labels = labels.long()
    valid = _valid(labels, c, ignore_index)
    confident = probs >= _usable(thresholds, probs.dtype) - _TOLERANCE
    n_confident = confident.sum(dim=1)
    guess = torch.where(n_confident > 1, probs.max(dim=1).indices, confident.to(torch.uint8).max(dim=1).indices)
    nudged = probs + _TOLERANCE * _onehot(labels, valid, c).to(probs.dtype)
    agrees = nudged.max(dim=1).indices == labels
    return valid & (n_confident > 0) & (guess != labels) & ~agrees


def softmin(scores: Tensor, *, temperature: float = 0.1) -> Tensor:
    """Per-image softmin of pixel scores: sum_i s_i w_i with w = softmax((1 - s) / T) over the image.

    Low-scoring pixels dominate as T -> 0 (the minimum) and all count alike as T grows (the
    mean); cleanlab's default T = 0.1. NaN pixels (ignored) take no weight.

    Args:
        scores: float [N, H, W] (or [N, P]), NaN where not counted.
        temperature: T > 0 (static).

    Returns:
        float64 [N]; NaN for an image without a counted pixel.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number; got {temperature!r}")
    s = scores.flatten(1).to(torch.float64)
    counted = ~s.isnan()
    logits = torch.where(counted, (1 - s) / temperature, -math.inf)
    any_counted = counted.any(dim=1)
    logits = torch.where(any_counted.unsqueeze(1), logits, 0.0)  # an empty image: no -inf-only softmax
    weighted = (torch.softmax(logits, dim=1) * s.nan_to_num(0.0)).sum(dim=1)
    return torch.where(any_counted, weighted, math.nan)


def score_batch(probs: Tensor, labels: Tensor, thresholds: Tensor, *, method: str = "self_confidence",
                temperature: float = 0.1, ignore_index: int | None = None) -> dict[str, Tensor]:
    """The second pass over one batch: everything the audit reports about its images.

    Args:
        probs: float [N, C, H, W] out-of-sample probabilities; labels: int [N, H, W].
        thresholds: float [C] from :func:`class_thresholds` over the whole dataset (pass one).
        method: the pixel score, one of :data:`METHODS` (static).
        temperature: the softmin temperature (static).
        ignore_index: label whose pixels are left out (static).

    Returns:
        dict of
        ``image_score`` float64 [N]: softmin of the pixel scores (low = suspicious);
        ``issue_pixels``, ``valid_pixels`` int64 [N]: likely issues and counted pixels;
        ``issue_fraction`` float64 [N]: their ratio (NaN without a counted pixel);
        ``pixel_score`` float [N, H, W] (NaN on ignored pixels);
        ``issue_map`` float [N, H, W] in [0, 1]: 1 - p_y on likely issues, 0 elsewhere (how
        confidently the model disputes the label), NaN on ignored pixels, for :func:`heatmap`.
    """
    c = _check(probs, labels)
    scores = pixel_scores(probs, labels, method=method, thresholds=thresholds, ignore_index=ignore_index)
    issues = issue_mask(probs, labels, thresholds, ignore_index=ignore_index)
    valid = _valid(labels.long(), c, ignore_index)
    n_valid = valid.sum(dim=(1, 2), dtype=torch.int64)
    n_issues = issues.sum(dim=(1, 2), dtype=torch.int64)
    fraction = n_issues.double() / n_valid.clamp_min(1).double()
    heat = torch.where(issues, 1 - _given(probs, labels.long(), c), 0.0)
    return {"image_score": softmin(scores, temperature=temperature), "issue_pixels": n_issues,
            "valid_pixels": n_valid, "issue_fraction": torch.where(n_valid > 0, fraction, math.nan),
            "pixel_score": scores, "issue_map": torch.where(valid, heat, math.nan)}


def rank_images(image_scores: Tensor) -> Tensor:
    """Image indices from the most to the least suspicious: ascending score, ties in index
    order, NaN (no counted pixel) last. int64 [N]."""
    if not isinstance(image_scores, Tensor) or image_scores.ndim != 1:
        raise ValueError("image_scores must be a tensor [N] (score_batch's image_score, concatenated)")
    return torch.sort(image_scores.nan_to_num(math.inf), stable=True).indices
