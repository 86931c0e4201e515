"""Evaluation: stream a split through the eval step and summarise one summed confusion matrix.

The last short batch is padded to the batch size with ignored pixels (one static shape for a
compiled step). The article series' own figures (``series_iou``, BACKGROUND ignored, and the
per-image ``series_custom_iou``, averaged over the real images only) are reported for the Oxford
trimaps only (``Preprocess.layout == "oxford_pets"``): elsewhere class 1 is not a background.

``evaluate_checkpoint(path, data)`` is the one way a checkpoint is scored (``fseg eval``, the test
split at the end of ``fit``, the experiments): ``models.load_checkpoint``'s weight policy, the
device's runtime, and the checkpoint's class names checked against the data's.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator, Sequence

import torch

from ..core.tree import tree_leaves
from ..data.loader import Loader
from ..data.preprocess import Preprocess
from ..metrics import summarize, summarize_boundary, summarize_calibration
from ..models.saved import Loaded, load_checkpoint
from ..runtime import Runtime, resolve_runtime
from .step import make_eval_step

__all__ = ["evaluate", "evaluate_ensemble", "evaluate_checkpoint", "ClassMismatch", "check_classes", "summary_of"]


def _batches_padded(loader, ignore_index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    b = loader.batch_size
    for images, masks in loader.epoch(None):
        n = images.shape[0]
        if n < b:
            images = torch.cat([images, images.new_zeros((b - n, *images.shape[1:]))])
            masks = torch.cat([masks, masks.new_full((b - n, *masks.shape[1:]), ignore_index)])
        yield images, masks, n


def summary_of(sums: dict, count: int, class_names, series: bool, image_size, boundary_ratio: float,
               detail: bool = False) -> dict:
    """Every figure of a split from its summed counts (one member's); ``detail`` adds the
    reliability diagram's bins (``reliability_*`` and the raw ``calibration_counts`` [3, B]), left
    out of the per-epoch validation records."""
    cm = sums["confusion"]
    out = summarize(cm, class_names, series=series)
    if series:
        out["series_custom_iou"] = float(sums["custom_iou"]) / max(count, 1)
    boundary = sums["boundary"]
    out.update(summarize_boundary(boundary[0], boundary[1], dilation_ratio=boundary_ratio, image_size=image_size,
                                  class_names=class_names))
    calibration = summarize_calibration(sums["calibration"])
    out.update(calibration if detail else {k: calibration[k] for k in ("ece", "mce")})
    if detail:  # what reliability.reliability_diagram draws
        out["calibration_counts"] = sums["calibration"].tolist()
    out["confusion"] = cm.tolist()
    return out


def _progress(batches, total: int, show: bool):
    """A tqdm bar on a terminal when asked; nothing in a log file (the caller prints the result)."""
    if not (show and sys.stderr.isatty()):
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, total=total, desc="evaluating", leave=False, dynamic_ncols=True)


def _accumulate(eval_step, params, state, loader, ignore_index: int, progress: bool) -> tuple[dict, int, tuple]:
    """The eval step's counts summed over the split (on the host, float64/int64), the number of real
    images, and their size (H, W)."""
    sums: dict = {}
    count, size = 0, None
    batches = _progress(_batches_padded(loader, ignore_index), len(loader), progress)
    with torch.no_grad():
        for images, masks, n in batches:
            out = eval_step(params, state, images, masks)
            out["custom_iou"] = out["custom_iou"][..., :n].double().sum(dim=-1)
            for key, value in out.items():
                sums[key] = sums[key] + value.cpu() if key in sums else value.cpu()
            count, size = count + n, tuple(images.shape[-2:])
    return sums, count, size


def _steps(model, pre: Preprocess, eval_step, boundary_ratio: float, ensemble: bool):
    if eval_step is not None:
        return eval_step
    step = make_eval_step(model, preprocess=pre, boundary_ratio=boundary_ratio)
    return torch.func.vmap(step, in_dims=(0, 0, None, None)) if ensemble else step


def evaluate(model, params, state, loader, *, eval_step: Callable | None = None,
             class_names: Sequence[str] | None = None, preprocess: Preprocess | None = None,
             progress: bool = False, boundary_ratio: float = 0.02, detail: bool = False) -> dict:
    """Every figure of a whole split: ``metrics.summarize`` of the summed confusion matrix, Boundary
    IoU (``boundary_iou``, ``mean_boundary_iou``, the band's ``boundary_dilation_ratio`` and
    ``boundary_width_px``), calibration (``ece``, ``mce``, ``reliability_*``), the series' figures
    for the Oxford layout, and ``confusion``.

    Args:
        loader: a ``Loader`` with ``shuffle=False``.
        eval_step: from ``make_eval_step`` (its ``boundary_ratio`` must be this one); built if None.
        class_names: names for the per-class keys (default: ``preprocess.class_names``).
        progress: a progress bar on stderr when it is a terminal.
        detail: also the reliability diagram's bins (``reliability_confidence``, ``_accuracy``,
            ``_count``).
    """
    pre = preprocess or Preprocess()
    step = _steps(model, pre, eval_step, boundary_ratio, ensemble=False)
    sums, count, size = _accumulate(step, params, state, loader, pre.ignore_index, progress)
    return summary_of(sums, count, class_names or pre.class_names, pre.layout == "oxford_pets", size, boundary_ratio,
                    detail)


def evaluate_ensemble(model, params, state, loader, *, eval_step: Callable | None = None,
                      class_names: Sequence[str] | None = None, preprocess: Preprocess | None = None,
                      progress: bool = False, boundary_ratio: float = 0.02, detail: bool = False) -> list[dict]:
    """:func:`evaluate` for stacked (ensemble) params: one summary per member, in member order."""
    pre = preprocess or Preprocess()
    step = _steps(model, pre, eval_step, boundary_ratio, ensemble=True)
    k = int(tree_leaves(params)[0].shape[0])
    sums, count, size = _accumulate(step, params, state, loader, pre.ignore_index, progress)
    names, series = class_names or pre.class_names, pre.layout == "oxford_pets"
    return [summary_of({key: v[i] for key, v in sums.items()}, count, names, series, size, boundary_ratio, detail)
            for i in range(k)]


class ClassMismatch(ValueError):
    """A checkpoint is scored on data whose classes are not the ones it was trained on."""


def _named(names) -> bool:
    return not all(n == f"class_{i}" for i, n in enumerate(names))


def check_classes(trained: Sequence[str], data_names: Sequence[str], *, checkpoint, data: str = "the data"
                  ) -> tuple[str, ...]:
    """The class names to report: the trained ones; the data's where the run named none.

    Raises:
        ClassMismatch: another number of classes, or both named and the names differ (a model of
            sky/road/car scored on pet/background/border would relabel its rows silently).
    """
    trained, data_names = tuple(trained), tuple(data_names)
    if len(trained) != len(data_names):
        raise ClassMismatch(f"{data} has {len(data_names)} classes ({', '.join(data_names)}) but {checkpoint} "
                            f"predicts {len(trained)} ({', '.join(trained)})")
    if _named(trained) and _named(data_names) and trained != data_names:
        raise ClassMismatch(f"{checkpoint} was trained on classes {', '.join(trained)} but {data} has "
                            f"{', '.join(data_names)}; evaluate it on data with the same classes")
    return trained if _named(trained) else data_names


def evaluate_checkpoint(path, data, *, runtime: Runtime | None = None, device: str = "auto", weights: str = "auto",
                        member: int | str | None = "all", batch_size: int = 32, progress: bool = False,
                        data_label: str = "the data", boundary_ratio: float = 0.02) -> dict:
    """Score a checkpoint (a path, or ``models.load_checkpoint``'s result) on prepared ``data`` (at the
    checkpoint's size and policy).

    Weights and members as ``models.load_checkpoint`` resolves them (default: the raw or EMA weights
    each member validated higher with, every member of an ensemble). Precision and layout are the
    runtime's (``runtime`` or one resolved for ``device``), not the training machine's.

    Returns:
        ``{"checkpoint", "weights", "member", "class_names", "resolution", "images", "summary"}``:
        ``resolution`` is the prepared size and policy the figures are at (e.g. "128x128 (resize)"; see
        ``full_res.evaluate_full_res`` for the original masks); ``summary`` is one ``evaluate``
        summary, or a list of them (one per member) for an ensemble scored whole.
    """
    runtime = runtime or resolve_runtime(device)
    loaded = path if isinstance(path, Loaded) else load_checkpoint(path, device=runtime.device, weights=weights,
                                                                    member=member)
    path = loaded.path
    names = check_classes(loaded.preprocess.class_names, data.class_names, checkpoint=path, data=data_label)
    pre = dataclasses.replace(loaded.preprocess, class_names=names, precision=runtime.precision,
                              channels_last=runtime.channels_last)
    loader = Loader(data, batch_size, device=runtime.device, shuffle=False, drop_last=False)
    score = evaluate_ensemble if loaded.members else evaluate
    summary = score(loaded.model, loaded.params, loaded.state, loader, preprocess=pre, progress=progress,
                    boundary_ratio=boundary_ratio, detail=True)
    h, w = data.hw
    return {"checkpoint": str(path), "weights": list(loaded.weights), "member": loaded.member,
            "class_names": list(names), "resolution": f"{h}x{w} ({pre.policy})", "images": len(data),
            "summary": summary}
