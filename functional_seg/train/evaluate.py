"""Evaluation: stream a split through the eval step and summarise one summed confusion matrix.

The last short batch is padded to the batch size with ignored pixels (one static shape for a
compiled step); the series' per-image custom IoU is averaged over the real images only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence

import torch

from ..core.tree import tree_leaves
from ..data.preprocess import Preprocess
from ..metrics import summarize
from .step import make_eval_step

__all__ = ["evaluate", "evaluate_ensemble"]


def _batches_padded(loader, ignore_index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    b = loader.batch_size
    for images, masks in loader.epoch(None):
        n = images.shape[0]
        if n < b:
            images = torch.cat([images, images.new_zeros((b - n, *images.shape[1:]))])
            masks = torch.cat([masks, masks.new_full((b - n, *masks.shape[1:]), ignore_index)])
        yield images, masks, n


def _summary(cm: torch.Tensor, custom_sum: torch.Tensor, count: int, class_names) -> dict:
    out = summarize(cm, class_names)
    out["series_custom_iou"] = float(custom_sum) / max(count, 1)
    out["confusion"] = cm.tolist()
    return out


def _progress(batches, total: int, show: bool):
    """A tqdm bar on a terminal when asked; nothing in a log file (the caller prints the result)."""
    if not (show and sys.stderr.isatty()):
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, total=total, desc="evaluating", leave=False, dynamic_ncols=True)


def _accumulate(eval_step, params, state, loader, ignore_index: int, shape: tuple, c: int, progress: bool):
    cm = torch.zeros((*shape, c, c), dtype=torch.int64)
    custom = torch.zeros(shape, dtype=torch.float64)
    count = 0
    batches = _progress(_batches_padded(loader, ignore_index), len(loader), progress)
    with torch.no_grad():
        for images, masks, n in batches:
            out = eval_step(params, state, images, masks)
            cm = cm + out["confusion"].cpu()
            custom = custom + out["custom_iou"][..., :n].double().sum(dim=-1).cpu()
            count += n
    return cm, custom, count


def evaluate(model, params, state, loader, *, eval_step: Callable | None = None,
             class_names: Sequence[str] | None = None, preprocess: Preprocess | None = None,
             progress: bool = False) -> dict:
    """``metrics.summarize`` of a whole split, plus ``series_custom_iou`` and ``confusion``.

    Args:
        loader: a ``Loader`` with ``shuffle=False``.
        eval_step: from ``make_eval_step``; built from ``preprocess`` if None.
        class_names: names for the per-class keys (default: ``preprocess.class_names``).
        progress: a progress bar on stderr when it is a terminal.
    """
    pre = preprocess or Preprocess()
    step = eval_step or make_eval_step(model, preprocess=pre)
    cm, custom, count = _accumulate(step, params, state, loader, pre.ignore_index, (), model.num_classes, progress)
    return _summary(cm, custom, count, class_names or pre.class_names)


def evaluate_ensemble(model, params, state, loader, *, eval_step: Callable | None = None,
                      class_names: Sequence[str] | None = None, preprocess: Preprocess | None = None,
                      progress: bool = False) -> list[dict]:
    """:func:`evaluate` for stacked (ensemble) params: one summary per member, in member order."""
    pre = preprocess or Preprocess()
    step = eval_step or torch.func.vmap(make_eval_step(model, preprocess=pre), in_dims=(0, 0, None, None))
    k = int(tree_leaves(params)[0].shape[0])
    cm, custom, count = _accumulate(step, params, state, loader, pre.ignore_index, (k,), model.num_classes,
                                    progress)
    return [_summary(cm[i], custom[i], count, class_names or pre.class_names) for i in range(k)]
