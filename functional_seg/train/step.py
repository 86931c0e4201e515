"""The pure training and evaluation steps, and how to compile them.

``train_step(train_state, batch) -> (train_state, metrics)`` does, on the batch's device:

    step_key = fold_in(key, step); aug_key, model_key = split(step_key)
    images uint8 [B, 3, S, S] -> to_float -> augment(aug_key) -> normalize (-> channels_last)
    (grads, (loss, (logits, new_state))) = grad_and_value(loss_of_params, has_aux=True)(params)
    updates = -lr * schedule(step) * optimizer(grads);  params = params + updates

All out of place: neither the train state nor the batch is modified. The model, loss, optimizer
and augmentation settings are bound in Python before ``torch.compile``; everything that changes
from step to step (step, key, lr) is a tensor, so one compiled graph serves every step.

``metrics`` holds 0-d tensors ``loss`` and ``pixel_accuracy`` and the batch's int64 confusion
matrix ``confusion`` [C, C] (over the augmented masks). Nothing reads a value back to Python
inside the step; the loop calls ``.item()`` at log steps only.

For an ensemble, ``ensemble_step(step)`` is ``torch.func.vmap(step, in_dims=(0, None))``: K
stacked train states over one shared batch, metrics stacked to [K].
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Mapping

import torch
import torchopt

from ..core import random as jr
from .state import TrainState

__all__ = ["make_train_step", "make_eval_step", "ensemble_step", "compile_step", "compile_report",
           "resolve_precision"]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"auto" -> "bf16" on CUDA, "fp32" elsewhere; other values are checked and returned."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected auto, {', '.join(PRECISIONS)}")
    return precision


def _autocast(precision: str, device_type: str):
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _prepare_input(images: torch.Tensor, masks: torch.Tensor, key: torch.Tensor | None, augment_cfg,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from ..data import augment, normalize, to_float

    x = to_float(images)
    if augment_cfg is not None and key is not None:
        x, masks = augment(key, x, masks, augment_cfg)
    x = normalize(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, masks


def _pixel_accuracy(cm: torch.Tensor) -> torch.Tensor:
    total = cm.sum()
    return torch.diagonal(cm).sum().to(torch.float32) / torch.clamp(total, min=1).to(torch.float32)


def make_train_step(model, loss_fn: Callable, optimizer, *, augment_cfg=None, num_classes: int | None = None,
                    ignore_index: int | None = None, precision: str = "fp32", channels_last: bool = False,
                    compile: bool = False, fullgraph: bool = True) -> Callable:
    """Build the pure ``train_step(train_state, batch) -> (train_state, metrics)``.

    Args:
        model: a ``Model`` (static).
        loss_fn: ``loss_fn(logits float32 [B, C, S, S], masks int64 [B, S, S], **extra) -> 0-d``;
            ``extra`` are the train state's hparams other than ``lr`` (tensors, may be swept).
        optimizer: an ``Optimizer`` from ``make_optimizer`` (static).
        augment_cfg: an ``AugmentConfig`` (static) or None for no augmentation.
        num_classes: C for the confusion matrix (default ``model.num_classes``).
        ignore_index: label not counted in the metrics (the loss binds its own).
        precision: "fp32", or "bf16" (autocast around the forward only; loss in fp32).
        channels_last: feed the model a channels-last input (faster convs on CUDA).
        compile: wrap the step in ``torch.compile`` (see :func:`compile_step`).
        fullgraph: ask dynamo for one graph (falls back with a warning if it cannot).

    Returns:
        ``train_step``; batch is ``(images uint8 [B, 3, S, S], masks int64 [B, S, S])`` on the
        state's device.
    """
    from ..metrics import confusion_matrix

    precision = resolve_precision(precision, "cpu") if precision == "auto" else precision
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    num_classes = int(num_classes or model.num_classes)

    def train_step(train_state: TrainState, batch) -> tuple[TrainState, dict]:
        images, masks = batch
        step_key = jr.fold_in(train_state.key, train_state.step)
        aug_key, model_key = jr.split(step_key)
        x, target = _prepare_input(images, masks, aug_key, augment_cfg, channels_last)
        extra = {k: v for k, v in train_state.hparams.items() if k != "lr"}

        def loss_of(params):
            with _autocast(precision, x.device.type):
                logits, new_state = model.apply(params, train_state.state, x, train=True, key=model_key)
            logits = logits.float()
            loss = loss_fn(logits, target, **extra)
            return loss, (logits.detach(), new_state)

        grads, (loss, (logits, new_state)) = torch.func.grad_and_value(loss_of, has_aux=True)(train_state.params)
        updates, opt_state = optimizer.update(grads, train_state.opt_state, train_state.params,
                                              step=train_state.step, lr=train_state.hparams["lr"])
        params = torchopt.apply_updates(train_state.params, updates, inplace=False)
        cm = confusion_matrix(logits.argmax(dim=1), target, num_classes, ignore_index=ignore_index)
        metrics = {"loss": loss.detach(), "pixel_accuracy": _pixel_accuracy(cm), "confusion": cm}
        new = TrainState(params=params, state=new_state, opt_state=opt_state, step=train_state.step + 1,
                         key=train_state.key, hparams=dict(train_state.hparams))
        return new, metrics

    return compile_step(train_step, fullgraph=fullgraph) if compile else train_step


def _series_custom_iou_per_image(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None,
                                 eps: float = 1e-3) -> torch.Tensor:
    """The series' "custom IoU" of each image, float [N] (``metrics.series_custom_iou`` unaveraged)."""
    from ..metrics import soft_stats

    inter, pred_sum, true_sum = soft_stats(logits, target, ignore_index=ignore_index, per_image=True)
    inter = inter.sum(dim=-1)
    union = (pred_sum.sum(dim=-1) + true_sum.sum(dim=-1) - inter).clamp_min(0.0)
    return (inter + eps) / (union + eps)


def make_eval_step(model, *, num_classes: int | None = None, ignore_index: int | None = None,
                   precision: str = "fp32", channels_last: bool = False, compile: bool = False,
                   with_logits_metrics: bool = False) -> Callable:
    """Build ``eval_step(params, state, images uint8 [B,3,S,S], masks int64 [B,S,S])``.

    No augmentation, ``train=False`` (running batch-norm statistics), nothing returned to the
    host. Returns the batch's int64 [C, C] confusion matrix; with ``with_logits_metrics`` a dict
    ``{"confusion": [C, C], "custom_iou": float [B]}``, the second being the series' per-image
    soft IoU (average it over the real images of the split).
    """
    from ..metrics import confusion_matrix

    num_classes = int(num_classes or model.num_classes)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")

    def eval_step(params, state, images, masks):
        x, target = _prepare_input(images, masks, None, None, channels_last)
        with _autocast(precision, x.device.type):
            logits, _ = model.apply(params, state, x, train=False)
        logits = logits.float()
        cm = confusion_matrix(logits.argmax(dim=1), target, num_classes, ignore_index=ignore_index)
        if not with_logits_metrics:
            return cm
        return {"confusion": cm, "custom_iou": _series_custom_iou_per_image(logits, target, ignore_index)}

    return compile_step(eval_step, fullgraph=True) if compile else eval_step


def ensemble_step(step: Callable, *, compile: bool = False, fullgraph: bool = True) -> Callable:
    """``vmap`` a (non-compiled) train step over stacked train states sharing one batch."""
    vmapped = torch.func.vmap(step, in_dims=(0, None), randomness="error")
    if compile:
        return compile_step(vmapped, fullgraph=fullgraph)
    return vmapped


# ----------------------------------------------------------------------------------------------
# Compilation


def compile_step(fn: Callable, *, fullgraph: bool = True, dynamic: bool = False) -> Callable:
    """``torch.compile(fn, fullgraph=..., dynamic=False)``, falling back to ``fullgraph=False``.

    If dynamo cannot capture the whole step in one graph, the first call raises; we then log a
    warning naming the reason and recompile allowing graph breaks. ``fn`` is pure, so running it
    again after a failed trace is safe.
    """
    compiled = torch.compile(fn, fullgraph=fullgraph, dynamic=dynamic)
    if not fullgraph:
        return compiled
    state = {"fn": compiled, "checked": False}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if state["checked"]:
            return state["fn"](*args, **kwargs)
        try:
            out = state["fn"](*args, **kwargs)
        except torch._dynamo.exc.Unsupported as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(f"torch.compile could not capture the step in one graph ({first}); "
                          "compiling with graph breaks instead", RuntimeWarning, stacklevel=2)
            state["fn"] = torch.compile(fn, fullgraph=False, dynamic=dynamic)
            out = state["fn"](*args, **kwargs)
        state["checked"] = True
        return out

    wrapper._compiled = state  # for compile_report
    return wrapper


def compile_report(train_step: Callable, train_state: TrainState, batch, n_steps: int = 10) -> dict:
    """Run ``n_steps`` steps and count what dynamo compiled meanwhile.

    Counts are deltas of ``torch._dynamo.utils.counters`` and of dynamo's compilation metrics
    over the run: ``graphs`` (FX graphs captured), ``frames`` (frames compiled, first compile
    included), ``recompiles`` (compilations that replaced or added to an existing cache entry,
    with their reasons), ``graph_breaks`` (with reasons). Call it on a freshly built step to see
    the whole story (1 graph, 0 recompiles is the target).

    Returns:
        dict(graphs, frames, recompiles, recompile_reasons, graph_breaks, graph_break_reasons,
        steps, final_state) -- ``final_state`` is the train state after the steps.
    """
    from torch._dynamo.utils import counters

    def snapshot():
        return (counters["stats"]["unique_graphs"], counters["frames"]["ok"], dict(counters["graph_break"]))

    metrics_before = _compilation_metrics()
    graphs0, frames0, breaks0 = snapshot()
    for _ in range(n_steps):
        train_state, _metrics = train_step(train_state, batch)
    graphs1, frames1, breaks1 = snapshot()
    if metrics_before is not None:
        seen = {id(m) for m in metrics_before}
        new_metrics = [m for m in _compilation_metrics() or [] if id(m) not in seen]
    else:
        new_metrics = None
    breaks = {k: v - breaks0.get(k, 0) for k, v in breaks1.items() if v - breaks0.get(k, 0) > 0}
    if new_metrics is not None:
        reasons = [m.recompile_reason for m in new_metrics if getattr(m, "recompile_reason", None)]
    else:  # no metrics available: every frame compile beyond the first is a recompile (no breaks)
        reasons = ["unknown"] * max(frames1 - frames0 - 1 - sum(breaks.values()), 0)
    return {
        "steps": n_steps,
        "graphs": graphs1 - graphs0,
        "frames": frames1 - frames0,
        "recompiles": len(reasons),
        "recompile_reasons": reasons,
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": breaks,
        "final_state": train_state,
    }


def _compilation_metrics() -> list | None:
    try:
        from torch._dynamo.utils import get_compilation_metrics

        return list(get_compilation_metrics())
    except Exception:  # private API: absent or changed in another torch version
        return None


def describe(metrics: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Scalar metrics to Python floats (one host sync); the confusion matrix is left out."""
    return {k: float(v) for k, v in metrics.items() if v.dim() == 0}
