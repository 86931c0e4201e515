"""The pure training and evaluation steps, and how to compile them.

``train_step(train_state, batch) -> (train_state, metrics)`` does, on the batch's device:

    step_key = fold_in(key, step); aug_key, model_key = split(step_key)
    images uint8 [B, 3, S, S] -> to_float -> augment(aug_key) -> preprocess.model_input
    (grads, (loss, (logits, new_state))) = grad_and_value(loss_of_params, has_aux=True)(params)
    updates = -lr * schedule(step) * optimizer(grads);  params = params + updates

All out of place: neither the train state nor the batch is modified. The model, loss, optimizer,
preprocessing and augmentation settings are bound in Python before ``torch.compile``; everything
that changes from step to step (step, key, lr) is a tensor, so one compiled graph serves every
step.

``metrics`` holds 0-d tensors ``loss`` and ``pixel_accuracy`` (``metrics.pixel_accuracy`` of the
batch) and the batch's int64 confusion matrix ``confusion`` [C, C] (over the augmented masks).
Nothing reads a value back to Python inside the step; the loop calls ``.item()`` at log steps.

For an ensemble, ``ensemble_step(step)`` is ``torch.func.vmap(step, in_dims=(0, None))``: K
stacked train states over one shared batch, metrics stacked to [K].
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Mapping

import torch
import torchopt

from .. import metrics as M
from ..core import random as jr
from ..data.augment import augment, to_float
from ..data.preprocess import Preprocess
from ..runtime import autocast
from .state import TrainState

__all__ = ["make_train_step", "make_eval_step", "ensemble_step", "compile_step", "compile_report"]

log = logging.getLogger(__name__)

_DEFAULT = Preprocess()


def _confusion(logits: torch.Tensor, target: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    return M.confusion_matrix(logits.argmax(dim=1), target, logits.shape[1], ignore_index=pre.ignore_index,
                              method="compare")


def _ordered_like(template, tree):
    """``tree`` with its dict keys in ``template``'s order.

    A model may return its new state with keys in another order than it was given; the next
    compiled call would then fail the guard on the input's tree structure and recompile.
    """
    if isinstance(template, dict) and isinstance(tree, dict) and template.keys() == tree.keys():
        return {k: _ordered_like(template[k], tree[k]) for k in template}
    return tree


def make_train_step(model, loss_fn: Callable, optimizer, *, preprocess: Preprocess | None = None,
                    augment_cfg=None, compile: bool = False, fullgraph: bool = True,
                    backend: str = "inductor") -> Callable:
    """Build the pure ``train_step(train_state, batch) -> (train_state, metrics)``.

    Args:
        model: a ``Model`` (static).
        loss_fn: ``loss_fn(logits float32 [B, C, S, S], masks int64 [B, S, S], **extra) -> 0-d``;
            ``extra`` are the train state's hparams other than ``lr`` (tensors, may be swept).
        optimizer: an ``Optimizer`` from ``make_optimizer`` (static).
        preprocess: the ``Preprocess`` contract (static): normalisation, channels-last, precision
            (bf16 autocasts the forward only; the loss is computed in fp32) and the ignored label.
            Default: ImageNet normalisation, fp32, NCHW, ignore 255.
        augment_cfg: an ``AugmentConfig`` (static) or None for no augmentation.
        compile: wrap the step in ``torch.compile`` (see :func:`compile_step`).
        fullgraph: ask dynamo for one graph (falls back with a warning if it cannot).
        backend: the ``torch.compile`` backend ("aot_eager" traces the same graph without code
            generation: what the CPU tests use, as inductor's C++ build takes minutes there).

    Returns:
        ``train_step``; batch is ``(images uint8 [B, 3, S, S], masks int64 [B, S, S])`` on the
        state's device.
    """
    pre = preprocess or _DEFAULT

    def train_step(train_state: TrainState, batch) -> tuple[TrainState, dict]:
        images, masks = batch
        step_key = jr.fold_in(train_state.key, train_state.step)
        aug_key, model_key = jr.split(step_key)
        x, target = to_float(images), masks
        if augment_cfg is not None:
            x, target = augment(aug_key, x, target, augment_cfg)
        x = pre.model_input(x)
        extra = {k: v for k, v in train_state.hparams.items() if k != "lr"}

        def loss_of(params):
            with autocast(pre.precision, x.device.type):
                logits, new_state = model.apply(params, train_state.state, x, train=True, key=model_key)
            logits = logits.float()
            loss = loss_fn(logits, target, **extra)
            return loss, (logits.detach(), new_state)

        grads, (loss, (logits, new_state)) = torch.func.grad_and_value(loss_of, has_aux=True)(train_state.params)
        updates, opt_state = optimizer.update(grads, train_state.opt_state, train_state.params,
                                              step=train_state.step, lr=train_state.hparams["lr"])
        params = torchopt.apply_updates(train_state.params, updates, inplace=False)
        cm = _confusion(logits, target, pre)
        metrics = {"loss": loss.detach(), "pixel_accuracy": M.pixel_accuracy(cm).float(), "confusion": cm}
        new = train_state._replace(params=params, state=_ordered_like(train_state.state, new_state),
                                   opt_state=opt_state, step=train_state.step + 1, hparams=dict(train_state.hparams))
        return new, metrics

    return compile_step(train_step, fullgraph=fullgraph, backend=backend) if compile else train_step


def make_eval_step(model, *, preprocess: Preprocess | None = None, compile: bool = False,
                   backend: str = "inductor") -> Callable:
    """Build ``eval_step(params, state, images uint8 [B,3,S,S], masks int64 [B,S,S]) -> dict``.

    No augmentation, ``train=False`` (running batch-norm statistics), nothing returned to the
    host: ``{"confusion": int64 [C, C], "custom_iou": float [B]}``, the second being the series'
    per-image soft IoU (``metrics.series_custom_iou(..., reduction="none")``; average it over
    the real images of the split).
    """
    pre = preprocess or _DEFAULT

    def eval_step(params, state, images, masks):
        x = pre.model_input(images)
        with autocast(pre.precision, x.device.type):
            logits, _ = model.apply(params, state, x, train=False)
        logits = logits.float()
        return {"confusion": _confusion(logits, masks, pre),
                "custom_iou": M.series_custom_iou(logits, masks, ignore_index=pre.ignore_index, reduction="none")}

    return compile_step(eval_step, fullgraph=True, backend=backend) if compile else eval_step


def ensemble_step(step: Callable, *, compile: bool = False, fullgraph: bool = True,
                  backend: str = "inductor") -> Callable:
    """``vmap`` a (non-compiled) train step over stacked train states sharing one batch.

    Each member folds its own key, so members draw different augmentations unless their keys
    are equal. Metrics come out stacked: loss [K], pixel_accuracy [K], confusion [K, C, C].
    """
    vmapped = torch.func.vmap(step, in_dims=(0, None), randomness="error")
    if compile:
        return compile_step(vmapped, fullgraph=fullgraph, backend=backend)
    return vmapped


# ----------------------------------------------------------------------------------------------
# Compilation


def compile_step(fn: Callable, *, fullgraph: bool = True, dynamic: bool = False,
                 backend: str = "inductor") -> Callable:
    """``torch.compile(fn, fullgraph=..., dynamic=False)``, falling back to ``fullgraph=False``.

    If dynamo cannot capture the whole step in one graph, the first call raises; we then log a
    warning naming the reason and recompile allowing graph breaks. ``fn`` is pure, so running it
    again after a failed trace is safe.
    """
    compiled = torch.compile(fn, fullgraph=fullgraph, dynamic=dynamic, backend=backend)
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
            state["fn"] = torch.compile(fn, fullgraph=False, dynamic=dynamic, backend=backend)
            out = state["fn"](*args, **kwargs)
        state["checked"] = True
        return out

    wrapper._compiled = state  # for compile_report
    return wrapper


def compile_report(train_step: Callable, train_state: TrainState, batch, n_steps: int = 10) -> dict:
    """Run ``n_steps`` steps and count what dynamo compiled meanwhile.

    Counts are deltas of ``torch._dynamo.utils.counters`` and of dynamo's compilation metrics
    over the run: ``graphs`` (FX graphs captured, the first compile included), ``recompiles``
    (compilations that replaced or added to an existing cache entry, with their reasons),
    ``graph_breaks`` (with reasons). Call it on a freshly built step to see the whole story
    (1 graph, 0 recompiles is the target).

    Returns:
        dict(graphs, recompiles, recompile_reasons, graph_breaks, graph_break_reasons,
        steps, final_state) -- ``final_state`` is the train state after the steps.
    """
    from torch._dynamo.utils import counters

    def snapshot():
        return counters["stats"]["unique_graphs"], dict(counters["graph_break"])

    metrics_before = _compilation_metrics()
    graphs0, breaks0 = snapshot()
    for _ in range(n_steps):
        train_state, _metrics = train_step(train_state, batch)
    graphs1, breaks1 = snapshot()
    if metrics_before is not None:
        seen = {id(m) for m in metrics_before}
        new_metrics = [m for m in _compilation_metrics() or [] if id(m) not in seen]
    else:
        new_metrics = None
    breaks = {k: v - breaks0.get(k, 0) for k, v in breaks1.items() if v - breaks0.get(k, 0) > 0}
    if new_metrics is not None:
        reasons = [m.recompile_reason for m in new_metrics if getattr(m, "recompile_reason", None)]
    else:  # no metrics in this torch: without graph breaks, every graph beyond the first is a recompile
        reasons = ["unknown"] * max(graphs1 - graphs0 - 1 - sum(breaks.values()), 0)
    return {
        "steps": n_steps,
        "graphs": graphs1 - graphs0,
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
