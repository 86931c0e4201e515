"""Segmentation losses as pure functions of (logits, target).

Every loss takes ``logits`` float [N, C, H, W] and ``target`` int64 [N, H, W] and returns a
0-d tensor. All share two keyword arguments:

- ``ignore_index``: pixels with this label add nothing to the value and get exactly zero
  gradient. They are masked by multiplication (never boolean indexing), so shapes stay static.
- ``weight``: optional float [C]. For the pixel-wise losses (cross-entropy, focal) a pixel of
  class c counts w_c times, normalised by the summed weight of the counted pixels (as
  ``torch.nn.functional.cross_entropy``); for the overlap losses (soft IoU, Dice, Tversky) it
  turns the mean over classes into sum_c w_c s_c / sum_c w_c.

The overlap losses sum soft counts over the whole batch, N, H and W ("batch" reduction, as in
segmentation_models_pytorch), through :func:`functional_seg.metrics.soft_stats`, and smooth
each class score additively, s_c = (I_c + eps) / (D_c + eps) with eps = 1 by default: a class
absent from both truth and prediction scores 1 (nothing to fix) instead of 0/0, and for the
millions of pixels of a real batch eps = 1 is negligible. D_c is the union for IoU,
(P_c + T_c) / 2 for Dice and I_c + alpha FP_c + beta FN_c for Tversky, so Tversky(0.5, 0.5)
is Dice and Tversky(1, 1) is soft IoU.

No loss reads a value back to Python (no ``.item()``), shapes are checked statically, and all
run under ``torch.func.grad``, ``torch.func.vmap`` and ``torch.compile(fullgraph=True)``.
Python-number arguments (``ignore_index``, ``eps``, ``gamma``, ``alpha``, ``beta``,
``label_smoothing``, ``log``) are static under compile: a new value recompiles. Half-precision
logits are upcast to float32 inside. Values stay finite for any finite logits (+/-1e4
included) and any mix of present and absent classes; a batch with every pixel ignored gives 0.

``LOSSES`` / :func:`get_loss` name the losses for configs; :func:`combine` sums weighted losses.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .metrics import _check_eps, _check_logits_target, _class_mean, _compute_dtype, soft_stats

__all__ = [
    "cross_entropy",
    "focal",
    "soft_iou",
    "dice",
    "tversky",
    "ce_dice",
    "combine",
    "LOSSES",
    "get_loss",
]

Loss = Callable[[Tensor, Tensor], Tensor]


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den == 0 (every pixel ignored, so num is 0 too)."""
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _pixel_terms(
    logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """log-probabilities [N, C, H, W], log p of the true class [N, H, W], pixel weights [N, H, W].

    Ignored pixels read class 0 (any valid index would do) and get pixel weight 0.
    """
    logp = torch.log_softmax(logits.to(_compute_dtype(logits)), dim=1)
    if ignore_index is None:
        safe_target = target
        valid = torch.ones_like(target, dtype=logp.dtype)
    else:
        keep = target != ignore_index
        safe_target = torch.where(keep, target, torch.zeros_like(target))
        valid = keep.to(logp.dtype)
    logp_true = logp.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    pixel_weight = valid if weight is None else weight.to(logp.dtype)[safe_target] * valid
    return logp, logp_true, pixel_weight


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Mean pixel-wise cross-entropy, matching ``torch.nn.functional.cross_entropy``.

    With label smoothing s the target distribution is (1 - s) one-hot + s / C uniform, and the
    class weights weigh both parts as torch does (Szegedy et al. 2016, "Rethinking the
    Inception Architecture"). The mean divides by the summed weight of the counted pixels.
    Unlike torch, a batch whose pixels are all ignored gives 0, not NaN.

    Args:
        logits: float [N, C, H, W].
        target: int64 [N, H, W], labels in [0, C) or ``ignore_index``.
        weight: optional float [C] class weights.
        ignore_index: label whose pixels are left out (static).
        label_smoothing: s in [0, 1] (static).

    Returns:
        0-d float tensor, >= 0.
    """
    c = _check_logits_target(logits, target, weight)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1]; got {label_smoothing}")
    logp, logp_true, pixel_weight = _pixel_terms(logits, target, weight, ignore_index)
    total = -(pixel_weight * logp_true).sum()
    if label_smoothing > 0.0:
        class_weight = 1.0 if weight is None else weight.to(logp.dtype).view(1, c, 1, 1)
        valid = pixel_weight if weight is None else _valid(target, ignore_index, logp.dtype)
        smooth = -(logp * class_weight).sum(dim=1)
        total = (1.0 - label_smoothing) * total + (label_smoothing / c) * (valid * smooth).sum()
    return _safe_div(total, pixel_weight.sum())


def _valid(target: Tensor, ignore_index: int | None, dtype: torch.dtype) -> Tensor:
    if ignore_index is None:
        return torch.ones_like(target, dtype=dtype)
    return (target != ignore_index).to(dtype)


def focal(
    logits: Tensor,
    target: Tensor,
    *,
    gamma: float = 2.0,
    weight: Tensor | None = None,
    ignore_index: int | None = None,
) -> Tensor:
    """Focal loss -(1 - p_t)^gamma log p_t (Lin et al. 2017), averaged like cross-entropy.

    ``gamma = 0`` is exactly :func:`cross_entropy`; ``weight`` plays the role of the paper's
    alpha. 1 - p_t is computed as -expm1(log p_t) and floored at the smallest normal float,
    so the gradient of (1 - p_t)^gamma stays finite when p_t rounds to 1, even for gamma < 1.

    Args:
        logits: float [N, C, H, W].
        target: int64 [N, H, W].
        gamma: focusing parameter, >= 0 (static).
        weight: optional float [C] class weights.
        ignore_index: label whose pixels are left out (static).

    Returns:
        0-d float tensor, >= 0.
    """
    _check_logits_target(logits, target, weight)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0; got {gamma}")
    _, logp_true, pixel_weight = _pixel_terms(logits, target, weight, ignore_index)
    one_minus_p = (-torch.expm1(logp_true)).clamp_min(torch.finfo(logp_true.dtype).tiny)
    per_pixel = -(one_minus_p**gamma) * logp_true
    return _safe_div((pixel_weight * per_pixel).sum(), pixel_weight.sum())


def _overlap(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int | None,
    eps: float,
    log: bool,
    denominator: Callable[[Tensor, Tensor, Tensor], Tensor],
) -> Tensor:
    """1 - M or -log M, M the class mean of (I + eps) / (denominator(I, P, T) + eps)."""
    _check_logits_target(logits, target, weight)
    _check_eps(eps)
    inter, pred_sum, true_sum = soft_stats(logits, target, ignore_index=ignore_index)
    score = (inter + eps) / (denominator(inter, pred_sum, true_sum).clamp_min(0.0) + eps)
    mean = _class_mean(score, weight)
    # M lies in (0, 1] up to rounding; the clamp keeps 1 - M >= 0 and -log M >= 0.
    return -torch.log(mean.clamp_max(1.0)) if log else (1.0 - mean).clamp_min(0.0)


def soft_iou(
    logits: Tensor,
    target: Tensor,
    *,
    log: bool = False,
    eps: float = 1.0,
    weight: Tensor | None = None,
    ignore_index: int | None = None,
) -> Tensor:
    """Soft IoU (Jaccard) loss from softmax probabilities: 1 - M, or -log M with ``log=True``.

    M is :func:`functional_seg.metrics.soft_iou_metric`: per class
    (I + eps) / (P + T - I + eps) over the whole batch, averaged over classes (or weighted).
    -log M is the series' loss form (Rahman & Wang 2016 motivate the soft IoU).

    Args:
        logits: float [N, C, H, W].
        target: int64 [N, H, W].
        log: return -log M instead of 1 - M (static).
        eps: additive smoothing, > 0 (static).
        weight: optional float [C] weights of the class mean.
        ignore_index: label whose pixels are left out (static).

    Returns:
        0-d float tensor, >= 0.
    """
    return _overlap(logits, target, weight, ignore_index, eps, log, _union)


def _union(inter: Tensor, pred_sum: Tensor, true_sum: Tensor) -> Tensor:
    return pred_sum + true_sum - inter


def _half_sum(inter: Tensor, pred_sum: Tensor, true_sum: Tensor) -> Tensor:
    return 0.5 * (pred_sum + true_sum)


def dice(
    logits: Tensor,
    target: Tensor,
    *,
    log: bool = False,
    eps: float = 1.0,
    weight: Tensor | None = None,
    ignore_index: int | None = None,
) -> Tensor:
    """Soft Dice loss (Milletari et al. 2016): 1 - mean_c (2 I + 2 eps) / (P + T + 2 eps).

    Written as (I + eps) / ((P + T) / 2 + eps) so the smoothing matches :func:`tversky` with
    alpha = beta = 0.5. Arguments as in :func:`soft_iou`.

    Returns:
        0-d float tensor, >= 0.
    """
    return _overlap(logits, target, weight, ignore_index, eps, log, _half_sum)


def tversky(
    logits: Tensor,
    target: Tensor,
    *,
    alpha: float = 0.3,
    beta: float = 0.7,
    log: bool = False,
    eps: float = 1.0,
    weight: Tensor | None = None,
    ignore_index: int | None = None,
) -> Tensor:
    """Tversky loss (Salehi et al. 2017): 1 - mean_c (I + eps) / (I + alpha FP + beta FN + eps).

    alpha weighs false positives (P - I), beta false negatives (T - I); the default 0.3 / 0.7
    is the paper's recall-favouring choice. alpha = beta = 0.5 is :func:`dice`, alpha = beta
    = 1 is :func:`soft_iou`. Other arguments as in :func:`soft_iou`.

    Returns:
        0-d float tensor, >= 0.
    """
    if not (alpha >= 0 and beta >= 0):
        raise ValueError(f"alpha and beta must be >= 0; got alpha={alpha}, beta={beta}")

    def denominator(inter: Tensor, pred_sum: Tensor, true_sum: Tensor) -> Tensor:
        return inter + alpha * (pred_sum - inter) + beta * (true_sum - inter)

    return _overlap(logits, target, weight, ignore_index, eps, log, denominator)


def ce_dice(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    eps: float = 1.0,
    loss_weight: float | Tensor = 1.0,
) -> Tensor:
    """Cross-entropy + ``loss_weight`` * Dice; ``weight`` and ``ignore_index`` go to both.

    ``loss_weight`` may be a 0-d tensor (a train-state hyperparameter, so an ensemble can sweep it
    under vmap without recompiling).
    """
    ce = cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
    return ce + loss_weight * dice(logits, target, eps=eps, weight=weight, ignore_index=ignore_index)


def _weighted_sum(terms: tuple[tuple[Loss, float], ...], logits: Tensor, target: Tensor, **kwargs) -> Tensor:
    total = None
    for fn, w in terms:
        value = w * fn(logits, target, **kwargs)
        total = value if total is None else total + value
    return total


def combine(losses: Mapping[Loss, float]) -> Callable[..., Tensor]:
    """Sum losses with weights: ``combine({cross_entropy: 1.0, dice: 0.5})``.

    Args:
        losses: mapping loss callable -> weight (a float). Bind per-loss options first with
            ``functools.partial`` (or :func:`get_loss`).

    Returns:
        ``fn(logits, target, **kwargs) -> 0-d``; any keyword arguments (``weight``,
        ``ignore_index``, ...) are passed to every term.
    """
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError("losses must be a non-empty mapping {loss_fn: weight}")
    for fn, w in losses.items():
        if not callable(fn) or not isinstance(w, int | float):
            raise ValueError(f"combine needs {{callable: float}} entries; got {fn!r}: {w!r}")
    return functools.partial(_weighted_sum, tuple((fn, float(w)) for fn, w in losses.items()))


LOSSES: dict[str, Callable[..., Tensor]] = {
    "ce": cross_entropy,
    "soft_iou": soft_iou,
    "soft_iou_log": functools.partial(soft_iou, log=True),
    "dice": dice,
    "tversky": tversky,
    "focal": focal,
    "ce_dice": ce_dice,
}


def get_loss(name: str, **kwargs) -> Loss:
    """The registered loss ``name`` with ``kwargs`` bound: ``get_loss("focal", gamma=1.0)``.

    Args:
        name: one of ``LOSSES`` (``ce``, ``soft_iou``, ``soft_iou_log``, ``dice``, ``tversky``,
            ``focal``, ``ce_dice``).
        **kwargs: keyword arguments of that loss (``weight``, ``ignore_index``, ``eps``, ...).

    Returns:
        ``fn(logits, target) -> 0-d`` (a ``functools.partial``, fine to pass to torch.compile).

    Raises:
        ValueError: unknown name (the message lists the valid ones).
        TypeError: a keyword the loss does not take.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    fn = LOSSES[name]
    signature = inspect.signature(fn)
    try:
        signature.bind_partial(None, None, **kwargs)
    except TypeError as err:
        accepted = [p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
        raise TypeError(f"loss {name!r} takes keywords {accepted}; got {sorted(kwargs)}") from err
    return functools.partial(fn, **kwargs)
