"""Batch norm with explicit state, its cross-process statistics hook, layer norm and group norm.

Batch-norm statistics live in a separate state tree ``{"running_mean": [C], "running_var": [C],
"num_batches_tracked": int64 []}`` that ``batch_norm`` returns updated in training and
unchanged in eval, matching ``torch.nn.BatchNorm2d`` (momentum 0.1, unbiased running variance).

Training runs ATen's fused ``native_batch_norm`` without running buffers: one kernel that
normalises and returns the batch mean and inverse std it used, and whose backward keeps only
its input (written as ``var_mean`` plus arithmetic, the backward kept three activation-sized
tensors per layer: the input, ``x - mean`` and the normalised output feeding the ReLU). The
running statistics are derived from the returned mean / inverse std, out of place, so the
state passed in is never written.

Under :func:`batch_stats_reducer` (synchronised batch norm, for data-parallel training)
training BN instead computes per-channel sums, passes them through the reducer (an all-reduce
sum across processes) and normalises with the reduced mean and variance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

__all__ = ["init_batch_norm", "batch_norm", "batch_stats_reducer", "init_layer_norm", "layer_norm", "init_group_norm",
           "group_norm"]

# The reducer set by batch_stats_reducer; a plain module global (not a ContextVar or thread-local)
# so that dynamo reads it as a constant and guards on it.
_REDUCER: Callable[[torch.Tensor], torch.Tensor] | None = None


@contextlib.contextmanager
def batch_stats_reducer(fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Make training batch norm reduce its statistics through ``fn`` (synchronised BN).

    Inside the context, every training :func:`batch_norm` packs its local per-channel statistics
    into one float32 tensor ``stats [3, C]``: row 0 the sum of ``x - shift``, row 1 the sum of
    ``(x - shift)**2``, row 2 the number of values (N*H*W, repeated per channel), with ``shift``
    the running mean (the same on every process, it keeps the sums well conditioned). It calls
    ``stats = fn(stats)`` once per layer and normalises with ``mean = shift + sum / count`` and
    the biased ``var = sumsq / count - (sum / count)**2``; the running variance gets the unbiased
    ``var * count / (count - 1)``, all as in ``torch.nn.SyncBatchNorm``.

    ``fn`` is meant to be a differentiable all-reduce sum, e.g.
    ``lambda t: torch.distributed.nn.functional.all_reduce(t)``; gradients flow through it (the
    backward then needs the reduction of the gradient sums, which a differentiable all-reduce
    provides). Without the context the single-process fast path runs.

    The reducer is process-wide (a module global, not per thread) and read when a step is traced:
    enter the context around the calls, or around building and compiling the step; under
    ``torch.compile`` a change of reducer recompiles (dynamo guards on it). Works inside
    ``torch.func.grad`` / ``vmap`` as long as ``fn`` does.
    """
    global _REDUCER
    previous, _REDUCER = _REDUCER, fn
    try:
        yield
    finally:
        _REDUCER = previous


def init_batch_norm(num_features: int) -> tuple[dict, dict]:
    params = {"weight": torch.ones(num_features), "bias": torch.zeros(num_features)}
    state = {
        "running_mean": torch.zeros(num_features),
        "running_var": torch.ones(num_features),
        "num_batches_tracked": torch.zeros((), dtype=torch.int64),
    }
    return params, state


def batch_norm(params: dict, state: dict, x: torch.Tensor, *, train: bool, momentum: float = 0.1,
               eps: float = 1e-5) -> tuple[torch.Tensor, dict]:
    """Normalise over (N, H, W) per channel.

    Args:
        params: ``{"weight": [C], "bias": [C]}``.
        state: ``{"running_mean": [C], "running_var": [C], "num_batches_tracked": int64 []}``.
        x: float [N, C, ...] (fp32, or bf16 under autocast: the statistics are fp32 either way).
            In training the batch statistics normalise x and update the state out of place; in
            eval the running statistics do. ``momentum`` and ``eps`` are static.
    Returns:
        (y, new_state) with y shaped like x, in x's dtype; new_state is ``state`` itself in eval.
    """
    if not train:  # one fused kernel; F.batch_norm with training=False reads the stats, never writes
        y = F.batch_norm(x, state["running_mean"], state["running_var"], params["weight"], params["bias"],
                         training=False, eps=eps)
        return y, state
    n = x.numel() // x.shape[1]
    if n < 2:  # as torch: one value per channel has no variance to normalise by
        raise ValueError(f"batch_norm in training needs more than 1 value per channel, got input {tuple(x.shape)}")
    if _REDUCER is not None:
        return _reduced_batch_norm(params, state, x, _REDUCER, momentum, eps)
    # running_mean/var None: nothing is written; the mean and 1/sqrt(var + eps) it normalised with
    # come back (fp32, no grad), and its backward saves x alone.
    y, mean, invstd = torch.native_batch_norm(x, params["weight"], params["bias"], None, None, True, 0.0, eps)
    var = invstd.detach().float().reciprocal().square() - eps  # the biased batch variance
    return y, _updated(state, mean.detach().float(), var, n, momentum)


def _updated(state: dict, mean: torch.Tensor, var: torch.Tensor, n, momentum: float) -> dict:
    """The running statistics after one batch (torch's update: unbiased variance, momentum)."""
    unbiased = var * (n / (n - 1))
    return {
        "running_mean": torch.lerp(state["running_mean"], mean.to(state["running_mean"].dtype), momentum),
        "running_var": torch.lerp(state["running_var"], unbiased.to(state["running_var"].dtype), momentum),
        "num_batches_tracked": state["num_batches_tracked"] + 1,
    }


def _reduced_batch_norm(params: dict, state: dict, x: torch.Tensor, reduce: Callable, momentum: float,
                        eps: float) -> tuple[torch.Tensor, dict]:
    """Training BN over statistics summed by ``reduce`` (see :func:`batch_stats_reducer`)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    shift = state["running_mean"].detach().float()
    xc = x.float() - shift.reshape(shape)
    stats = reduce(_local_stats(xc))
    count = stats[2]
    mean_c = stats[0] / count
    var = torch.clamp(stats[1] / count - mean_c * mean_c, min=0.0)
    scale = torch.rsqrt(var + eps) * params["weight"]
    y = (xc - mean_c.reshape(shape)) * scale.reshape(shape) + params["bias"].reshape(shape)
    total = count[0].detach()
    return y.to(x.dtype), _updated(state, (shift + mean_c).detach(), var.detach(), total, momentum)


def _local_stats(xc: torch.Tensor) -> torch.Tensor:
    """float32 [3, C] for the centred float32 ``xc = x - shift`` [N, C, ...]: the sums of xc and
    of its square over (N, ...), and the count."""
    dims = [0] + list(range(2, xc.dim()))
    local_sum = xc.sum(dims)
    return torch.stack([local_sum, (xc * xc).sum(dims), torch.full_like(local_sum, xc.numel() // xc.shape[1])])


def init_layer_norm(dim: int) -> dict:
    return {"weight": torch.ones(dim), "bias": torch.zeros(dim)}


def layer_norm(params: dict, x: torch.Tensor, *, eps: float = 1e-5) -> torch.Tensor:
    """Normalise over the last axis (x: [..., dim])."""
    return F.layer_norm(x, params["weight"].shape, params["weight"], params["bias"], eps)


def init_group_norm(num_channels: int) -> dict:
    return {"weight": torch.ones(num_channels), "bias": torch.zeros(num_channels)}


def group_norm(params: dict, x: torch.Tensor, *, groups: int, eps: float = 1e-5) -> torch.Tensor:
    """Normalise x [N, C, ...] over each group of C / ``groups`` channels and the spatial axes, per
    sample (Wu & He, 2018), then scale and shift per channel. No state: train and eval agree."""
    return F.group_norm(x, groups, params["weight"], params["bias"], eps)
