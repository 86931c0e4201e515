"""The pure training and evaluation steps, and how to compile them.

``train_step(train_state, batch) -> (train_state, metrics)`` does, on the batch's device:

    step_key = fold_in(key, step); aug_key, model_key = split(step_key)
    images uint8 [B, 3, S, S] -> to_float -> augment(aug_key) -> preprocess.model_input
    (grads, (loss, (logits, new_state))) = grad_and_value(loss_of_params, has_aux=True)(params)
    params = params - lr * schedule(step) * optimizer(grads)   (Optimizer.apply, one pass a leaf)

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

import dataclasses
import functools
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from .. import metrics as M
from ..core import random as jr
from ..core.autodiff import eager_outside, grad_and_value
from ..core.tree import tree_map
from ..data.augmentation import augment, to_float
from ..data.preprocess import Preprocess
from ..nn.norm import batch_stats_reducer
from ..runtime import autocast
from .distributed import SINGLE, World, all_reduce_sum, all_reduce_sum_autograd
from .state import TrainState

__all__ = ["make_train_step", "make_eval_step", "ensemble_step", "compile_step", "compile_report"]

log = logging.getLogger(__name__)

_DEFAULT = Preprocess()


def _confusion(logits: torch.Tensor, target: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    # the logits themselves: confusion_matrix takes their max().indices, several times faster on CPU
    # than argmax over dim 1 (26 ms of a 0.67 s step at SegNet 16..64, batch 64, 64 px)
    return M.confusion_matrix(logits, target, logits.shape[1], ignore_index=pre.ignore_index, method="compare")


def _ordered_like(template, tree):
    """``tree`` with its dict keys in ``template``'s order.

    A model may return its new state with keys in another order than it was given; the next
    compiled call would then fail the guard on the input's tree structure and recompile.
    """
    if isinstance(template, dict) and isinstance(tree, dict) and template.keys() == tree.keys():
        return {k: _ordered_like(template[k], tree[k]) for k in template}
    return tree


def _augment_samples(aug_key: torch.Tensor, x: torch.Tensor, target: torch.Tensor, cfg, offset: int):
    """Augment sample i of the batch with ``fold_in(aug_key, offset + i)``, its GLOBAL index.

    A sample's draw then depends on the step and on where it sits in the global batch only, not
    on how the batch is split over processes or micro-batches. ``vmap`` turns the per-sample calls
    back into batched kernels (the crop's ``affine_grid`` has no batching rule and loops).
    """
    keys = jr.fold_in(aug_key, offset + torch.arange(x.shape[0], device=x.device))

    def one(k, xi, mi):
        xa, ma = augment(k, xi[None], mi[None], cfg)
        return xa[0], ma[0]

    return torch.func.vmap(one, randomness="error")(keys, x, target)


def _is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def make_train_step(model, loss_fn: Callable, optimizer, *, preprocess: Preprocess | None = None,
                    augment_cfg=None, compile: bool = False, fullgraph: bool = True,
                    backend: str = "inductor", accumulate: int = 1, ema: float | None = None,
                    world: World | None = None, ensemble: bool = False, sync_bn: bool = False,
                    folds: int | None = None, encoder_lr: float = 1.0, frozen_encoder: bool = False,
                    donate: bool = False) -> Callable:
    """Build the pure ``train_step(train_state, batch) -> (train_state, metrics)``.

    Args:
        model: a ``Model`` (static).
        loss_fn: ``loss_fn(logits float32 [B, C, S, S], masks int64 [B, S, S], **extra) -> 0-d``;
            ``extra`` are the train state's hparams other than ``lr`` (tensors, may be swept).
        optimizer: an ``Optimizer`` from ``make_optimizer`` (static).
        preprocess: the ``Preprocess`` contract (static): normalisation, channels-last, precision
            (bf16 autocasts the forward only; the loss is computed in fp32) and the ignored label.
            Default: ImageNet normalisation, fp32, NCHW, ignore 255.
        augment_cfg: an ``AugmentConfig`` (static) or None for no augmentation. Sample i of the
            global batch draws from ``fold_in(aug_key, i)``.
        compile: wrap the step in ``torch.compile`` (see :func:`compile_step`).
        fullgraph: ask dynamo for one graph (falls back with a warning if it cannot).
        backend: the ``torch.compile`` backend ("aot_eager" traces the same graph without code
            generation: what the CPU tests use, as inductor's C++ build takes minutes there).
        accumulate: K (static): the batch is split into K equal micro-batches, each forward and
            backward separately (peak activation memory of B/K images); gradients are summed
            weighted by each micro-batch's labelled pixels, then one optimizer update. For
            pixel-mean losses (ce, focal without class weights) this is one step on the whole
            batch up to float reduction order; the overlap losses (batch-wide soft counts) are
            then averaged over micro-batches instead. Batch-norm layers normalise each
            micro-batch by itself and the K new running statistics are averaged (as K ranks).
        ema: decay d in (0, 1) (static) or None: ``ema <- d * ema + (1 - d) * new`` over params
            and model state after every update (``train_state.ema`` must be set: ``with_ema``).
        world: a ``distributed.World`` (static); the batch is then this rank's slice of the
            global batch, and gradients, averaged model state, loss and confusion are summed over
            the ranks inside the step.
        ensemble: the train state is K stacked members (``vmap`` over them; collectives stay
            outside the ``vmap``, so each reduces the K members at once).
        sync_bn: with a distributed ``world``, batch norm normalises with the statistics of the
            whole global (micro-)batch (``nn.norm.batch_stats_reducer``).
        folds: K-fold training (static): the batch carries each sample's fold int64 [b] as a third
            element, and a member whose ``hparams["fold"]`` is k never learns from the labels of
            fold k (their pixels become ``ignore_index`` for it; the images still pass through its
            batch norm, as unlabelled images would).
        encoder_lr: multiplier of the learning rate of the params under ``"encoder"`` (static; 0
            leaves them unchanged).
        frozen_encoder: the encoder runs in eval mode (running batch-norm statistics, kept
            unchanged) with no gradient, and its params are not updated: the first epochs of a
            fine-tuning run.
        donate: the caller gives up the train state it passes (a loop that keeps only the returned
            one): in plain eager mode the new params and optimizer state are copied into the old
            state's tensors, which are returned, so the persistent trees keep their memory from
            step to step instead of a second generation alternating with the first in the heap
            (CPU, freed memory kept for reuse: +3 x the params for Adam, see
            benchmarks/bench_pretrained_step.py). The passed state is then overwritten; ignored
            under compile and vmap, where the step stays pure.

    Returns:
        ``train_step``; batch is ``(images uint8 [b, 3, S, S], masks int64 [b, S, S])`` on the
        state's device, b = B / world size.
    """
    if ensemble and preprocess is not None and preprocess.channels_last:
        # each member augments its own copy of the batch, so the input is batched under vmap, and
        # torch 2.11's vmap cannot make a batched tensor channels-last (NYI): members' inputs stay NCHW
        preprocess = dataclasses.replace(preprocess, channels_last=False)
    spec = _StepSpec.checked(model, loss_fn, optimizer, preprocess, augment_cfg, accumulate, ema, world, folds,
                             encoder_lr, frozen_encoder)

    def train_step(train_state: TrainState, batch) -> tuple[TrainState, dict]:
        if spec.ema is not None and not train_state.ema:
            raise ValueError("the step keeps an EMA but train_state.ema is empty; start from state.with_ema(...)")
        local, update = functools.partial(_local, spec), functools.partial(_update, spec)
        if ensemble:
            out = torch.func.vmap(local, in_dims=(0, None), randomness="error")(train_state, batch)
        else:
            out = local(train_state, batch)
        if spec.world.distributed:
            out = _reduce(spec.world, *out)
        if ensemble:
            return torch.func.vmap(update, randomness="error")(train_state, *out)
        new, metrics = update(train_state, *out)
        if donate and eager_outside():
            new = new._replace(params=_into(train_state.params, new.params),
                               opt_state=_into(train_state.opt_state, new.opt_state))
        return new, metrics

    step = compile_step(train_step, fullgraph=fullgraph, backend=backend) if compile else train_step
    if not (sync_bn and spec.world.distributed):
        return step

    @functools.wraps(train_step)
    def synced(train_state: TrainState, batch):
        # entered outside the compiled function: dynamo reads (and guards on) the reducer
        with batch_stats_reducer(all_reduce_sum_autograd):
            return step(train_state, batch)

    return synced


@dataclass(frozen=True)
class _StepSpec:
    """The static parts of a train step, bound before ``torch.compile``."""

    model: Any
    loss_fn: Callable
    optimizer: Any
    pre: Preprocess
    augment_cfg: Any
    k_micro: int
    ema: float | None
    world: World
    folds: bool = False
    encoder_lr: float = 1.0

    @classmethod
    def checked(cls, model, loss_fn, optimizer, preprocess, augment_cfg, accumulate, ema, world, folds, encoder_lr,
                frozen_encoder) -> _StepSpec:
        """The spec of ``make_train_step``'s arguments, each checked (one line naming what is wrong)."""
        if (frozen_encoder or encoder_lr != 1.0) and not _has_encoder(model):
            raise ValueError(f"{model.name} has no pretrained-style encoder (set encoder=... in the model cfg): "
                             "--encoder-lr and --freeze-encoder-epochs apply to encoder-decoder models only")
        if not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate must be a positive integer, got {accumulate!r}")
        if ema is not None and not 0.0 < ema < 1.0:
            raise ValueError(f"ema is a decay in (0, 1), got {ema!r}")
        return cls(_frozen(model) if frozen_encoder else model, loss_fn, optimizer, preprocess or _DEFAULT,
                   augment_cfg, accumulate, ema, world or SINGLE, folds is not None,
                   0.0 if frozen_encoder else float(encoder_lr))

    @property
    def parts(self) -> int:
        """Micro-batches in the global batch."""
        return self.k_micro * self.world.size


def _micro_weight(spec: _StepSpec, tj: torch.Tensor) -> torch.Tensor:
    """A micro-batch's share of the global pixel mean: its labelled pixels (1 when it is the whole batch)."""
    if spec.parts == 1:
        return torch.ones((), device=tj.device)
    if spec.pre.ignore_index is not None:
        return (tj != spec.pre.ignore_index).sum().float()
    return torch.tensor(float(tj.numel()), device=tj.device)


def _micro_grads(spec: _StepSpec, train_state: TrainState, xj, tj, key_j, extra: dict):
    """One micro-batch's (grads, new model state, sums) from ``core.autodiff.grad_and_value``
    (``torch.func``'s under vmap and compile, ``torch.autograd``'s memory cost in plain eager)."""
    weight = _micro_weight(spec, tj)

    def loss_of(params):
        with autocast(spec.pre.precision, xj.device.type):
            logits, new_state = spec.model.apply(params, train_state.state, xj, train=True, key=key_j)
        logits = logits.float()
        loss = spec.loss_fn(logits, tj, **extra)
        return loss * weight if spec.parts > 1 else loss, (logits.detach(), new_state)

    g, (loss, (logits, new_state)) = grad_and_value(loss_of)(train_state.params)
    sums = {"loss": loss.detach(), "weight": weight, "confusion": _confusion(logits, tj, spec.pre)}
    return g, _ordered_like(train_state.state, new_state), sums


def _local(spec: _StepSpec, train_state: TrainState, batch):
    """This rank's share: (grads, state, sums) summed over its micro-batches."""
    images, masks = batch[0], batch[1]
    b, k_micro, world = images.shape[0], spec.k_micro, spec.world
    if b % k_micro:
        raise ValueError(f"the batch of {b} images (per process) is not divisible by accumulate {k_micro}")
    step_key = jr.fold_in(train_state.key, train_state.step)
    aug_key, model_key = jr.split(step_key)
    x, target = to_float(images), masks
    if spec.folds:  # this member's held-out fold teaches it nothing: its labels become "ignore"
        held_out = batch[2].to(torch.float32) == train_state.hparams["fold"]
        target = torch.where(held_out[:, None, None], spec.pre.ignore_index, target)
    if spec.augment_cfg is not None:
        x, target = _augment_samples(aug_key, x, target, spec.augment_cfg, world.rank * b)
    x = spec.pre.model_input(x)
    extra = {k: v for k, v in train_state.hparams.items() if k not in _NOT_LOSS_HPARAMS}
    m = b // k_micro
    for j in range(k_micro):
        key_j = model_key if spec.parts == 1 else jr.fold_in(model_key, world.rank * k_micro + j)
        g, new_state, part = _micro_grads(spec, train_state, x[j * m:(j + 1) * m], target[j * m:(j + 1) * m],
                                          key_j, extra)
        if j == 0:
            grads, state, sums = g, new_state, part
        else:
            grads = tree_map(torch.add, grads, g)
            state = tree_map(lambda a, c: a + c if _is_float(a) else c, state, new_state)
            sums = {k: sums[k] + part[k] for k in sums}
    return grads, state, sums


def _into(old, new):
    """``new``'s values written into ``old``'s tensors where shapes and dtypes agree (the donated tree)."""
    def put(o, n):
        if isinstance(o, torch.Tensor) and isinstance(n, torch.Tensor) and o.shape == n.shape and o.dtype == n.dtype:
            return o.copy_(n)
        return n

    return tree_map(put, old, new)


def _update(spec: _StepSpec, train_state: TrainState, grads, state, sums):
    """The optimizer update from the summed gradients; state and loss averaged."""
    if spec.parts > 1:
        total = sums["weight"].clamp_min(1.0)
        grads = tree_map(lambda g: g / total, grads)
        state = tree_map(lambda s: s / spec.parts if _is_float(s) else s, state)
        loss = sums["loss"] / total
    else:
        loss = sums["loss"]
    params, opt_state = spec.optimizer.apply(grads, train_state.opt_state, train_state.params,
                                             step=train_state.step, lr=train_state.hparams["lr"],
                                             scales=_encoder_scales(train_state.params, spec.encoder_lr))
    cm = sums["confusion"]
    metrics = {"loss": loss, "pixel_accuracy": M.pixel_accuracy(cm).float(), "confusion": cm}
    # spelled out, not ``train_state._replace(...)``: dynamo in torch 2.11 returns the replaced
    # NamedTuple from a compiled step as an empty TrainState (the next step then fails to trace)
    ema = _ema_update(train_state.ema, params, state, spec.ema) if spec.ema is not None else train_state.ema
    new = TrainState(params=params, state=state, opt_state=opt_state, step=train_state.step + 1,
                     key=train_state.key, hparams=dict(train_state.hparams), ema=ema)
    return new, metrics


def _reduce(world: World, grads, state, sums):
    """Sum over ranks: gradients and float state in one bucket, loss/weight/confusion in float64."""
    g_leaves, g_spec = pytree.tree_flatten(grads)
    s_leaves, s_spec = pytree.tree_flatten(state)
    s_float = [i for i, t in enumerate(s_leaves) if _is_float(t)]
    reduced = all_reduce_sum(world, g_leaves + [s_leaves[i] for i in s_float])
    for i, t in zip(s_float, reduced[len(g_leaves):]):
        s_leaves[i] = t
    cm = sums["confusion"]
    scal = torch.cat([sums["loss"].double().reshape(*cm.shape[:-2], 1),
                      sums["weight"].double().reshape(*cm.shape[:-2], 1),
                      cm.double().flatten(-2)], dim=-1)
    (scal,) = all_reduce_sum(world, [scal])
    sums = {"loss": scal[..., 0].float(), "weight": scal[..., 1].float(),
            "confusion": scal[..., 2:].round().to(torch.int64).reshape(cm.shape)}
    return pytree.tree_unflatten(reduced[:len(g_leaves)], g_spec), pytree.tree_unflatten(s_leaves, s_spec), sums


_NOT_LOSS_HPARAMS = ("lr", "fold")  # hparams the step itself reads; the others are the loss's keywords


def _encoder_scales(params: dict, encoder_lr: float) -> dict | None:
    """Per top-level key, the factor of its learning rate: ``encoder_lr`` for ``"encoder"``, else 1."""
    if encoder_lr == 1.0 or "encoder" not in params:
        return None
    return {name: encoder_lr if name == "encoder" else 1.0 for name in params}


def _frozen(model):
    """The model with its encoder frozen (``models.encoder_decoder.freeze_encoder``)."""
    from ..models.encoder_decoder import freeze_encoder

    return freeze_encoder(model)


def _has_encoder(model) -> bool:
    """An encoder-decoder model (its ``params["encoder"]`` is a backbone; the classic U-Net's and
    SegNet's ``encoder`` keys are not)."""
    from ..models.encoder_decoder import model_encoder

    return model_encoder(model) is not None


def _ema_update(ema: dict, params: dict, state: dict, decay: float) -> dict:
    """``d * ema + (1 - d) * new`` for every float leaf; integer leaves (counters) take the new value."""
    def mix(e, new):
        return e * decay + new * (1.0 - decay) if _is_float(new) else new

    return {"params": tree_map(mix, ema["params"], params), "state": tree_map(mix, ema["state"], state)}


def make_eval_step(model, *, preprocess: Preprocess | None = None, compile: bool = False,
                   backend: str = "inductor", boundary_ratio: float = 0.02,
                   calibration_bins: int = M.CALIBRATION_BINS) -> Callable:
    """Build ``eval_step(params, state, images uint8 [B,3,S,S], masks int64 [B,S,S]) -> dict``.

    No augmentation, ``train=False`` (running batch-norm statistics), nothing returned to the
    host; every entry is a count that sums over batches:

        confusion     int64 [C, C]
        custom_iou    float [B]      the series' per-image soft IoU (average over the real images)
        boundary      int64 [2, C]   Boundary IoU's intersection and union per class
                                     (``metrics.boundary_counts``, band = ``boundary_ratio`` of the
                                     image diagonal)
        calibration   float64 [3, B'] per confidence bin: pixels, confidence sum, correct pixels
                                     (``metrics.calibration_counts``, ``calibration_bins`` bins)
    """
    pre = preprocess or _DEFAULT

    def eval_step(params, state, images, masks):
        x = pre.model_input(images)
        with autocast(pre.precision, x.device.type):
            logits, _ = model.apply(params, state, x, train=False)
        logits = logits.float()
        c = logits.shape[1]
        return {"confusion": _confusion(logits, masks, pre),
                "custom_iou": M.series_custom_iou(logits, masks, ignore_index=pre.ignore_index, reduction="none"),
                "boundary": torch.stack(M.boundary_counts(logits, masks, c, ignore_index=pre.ignore_index,
                                                          dilation_ratio=boundary_ratio)),
                "calibration": M.calibration_counts(logits.softmax(1), masks, num_bins=calibration_bins,
                                                    ignore_index=pre.ignore_index)}

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
