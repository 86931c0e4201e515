"""``fseg audit``: which masks of a dataset are likely wrong, from K-fold out-of-sample predictions.

    result = audit(model, data, FitConfig(epochs=40, ...), folds=5, out_dir="runs/audit")

1. K members train in ONE vmapped step: ``fit`` with ``config.folds = K``. Fold of an image = a
   seeded function of its name (``data.splits.fold_ids``); member k's loss ignores the labels of
   fold k (they are ``ignore_index`` for it), so the ensemble machinery, EMA, accumulation, data
   parallelism, the run directory's guarantees and ``--resume`` apply unchanged.
2. Out-of-sample probabilities: image i is predicted by the member that never learned its labels,
   fold by fold, float [N, C, S, S] in batches, never all at once. With ``tta="flip"`` (the
   default) they are the mean softmax of the image and its mirror: two forward passes per image,
   steadier probabilities, and more corrupted masks ranked near the top in
   ``experiments/label_audit`` (its table has both).
3. ``label_quality``'s two passes over those probabilities: per-class confident-learning
   thresholds, then per-pixel scores, likely-issue masks and per-image scores (softmin), ranked
   from the most suspicious.
4. Files in the run directory: ``audit.csv`` (one row per image, most suspicious first),
   ``audit.json`` (the same, with the settings and thresholds) and ``audit_top.png`` (a contact
   sheet of the top suspects: image, given mask, out-of-sample prediction, issue heat map).

The images themselves pass through every member's batch norm in training (their labels do
not), as unlabelled images would: the audit is out-of-sample for labels, which is what a label
audit needs (cleanlab's requirement), and costs one training instead of K.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import label_quality as Q
from .core.files import write_atomic, write_json
from .data.loader import Loader
from .data.splits import Splits, fold_ids
from .models.saved import load_checkpoint
from .render import colour_labels, png_bytes
from .runtime import resolve_runtime
from .train.config import FitConfig
from .train.loop import FitResult, fit
from .uncertainty import check_tta, flip_views, heatmap, mean_probs

__all__ = ["audit", "AuditResult", "out_of_sample_probs", "score_dataset", "contact_sheet"]

_MIN_PANEL = 128  # pixels: the contact sheet's panels are at least this tall


@dataclass(frozen=True)
class AuditResult:
    """The ranking (image indices, most suspicious first) and each image's figures, in data order."""

    fit: FitResult
    names: tuple[str, ...]
    folds: list[int]
    order: list[int]
    image_score: list[float]
    issue_fraction: list[float]
    agreement: list[float]
    thresholds: list[float]
    method: str
    files: dict[str, str]


def out_of_sample_probs(checkpoint, data, folds: torch.Tensor, *, runtime, batch_size: int, tta: str = "flip"):
    """Yield ``(indices int64 [b], probs float [b, C, S, S], labels int64 [b, S, S])`` for every image,
    each predicted by the member of ``checkpoint`` that never learned the labels of its fold
    (``tta="flip"``: the mean softmax of the image and its mirror)."""
    check_tta(tta)
    k = int(folds.max()) + 1
    for member in range(k):
        index = torch.nonzero(folds == member).flatten()
        if not index.numel():
            continue
        loaded = load_checkpoint(checkpoint, device=runtime.device, weights="params", member=member)
        pre = dataclasses.replace(loaded.preprocess, precision=runtime.precision, channels_last=runtime.channels_last)

        def predict(x, loaded=loaded):
            return loaded.model.apply(loaded.params, loaded.state, x, train=False)[0]

        loader = Loader(data.subset(index), batch_size, device=runtime.device, shuffle=False, drop_last=False)
        start = 0
        with torch.no_grad():
            for images, masks in loader.epoch(None):
                with runtime.autocast():
                    x = pre.model_input(images)
                    views = flip_views(predict, x) if tta == "flip" else predict(x)[None]  # [V, b, C, S, S]
                b = images.shape[0]
                yield index[start:start + b], mean_probs(views.float()), masks
                start += b


def score_dataset(checkpoint, data, folds: torch.Tensor, *, runtime, batch_size: int, method: str,
                  ignore_index: int, tta: str = "flip") -> dict:
    """The two passes: thresholds over every out-of-sample pixel, then each image's scores.

    Returns:
        dict of float64 [N] ``image_score``, ``issue_fraction``, ``agreement`` (the share of an
        image's labelled pixels whose out-of-sample prediction agrees with its label), and
        ``thresholds`` [C].
    """
    counts = None
    oos = dict(runtime=runtime, batch_size=batch_size, tta=tta)
    for _, probs, masks in out_of_sample_probs(checkpoint, data, folds, **oos):
        c = Q.threshold_counts(probs, masks, ignore_index=ignore_index)
        counts = c if counts is None else counts + c
    thresholds = Q.class_thresholds(counts)
    n = len(data)
    out = {key: torch.full((n,), float("nan"), dtype=torch.float64)
           for key in ("image_score", "issue_fraction", "agreement")}
    for index, probs, masks in out_of_sample_probs(checkpoint, data, folds, **oos):
        scored = Q.score_batch(probs, masks, thresholds.to(probs.device), method=method, ignore_index=ignore_index)
        valid = masks != ignore_index
        agree = ((probs.argmax(1) == masks) & valid).sum((1, 2)).double() / valid.sum((1, 2)).clamp_min(1).double()
        out["image_score"][index] = scored["image_score"].double().cpu()
        out["issue_fraction"][index] = scored["issue_fraction"].double().cpu()
        out["agreement"][index] = agree.cpu()
    out["thresholds"] = thresholds.cpu()
    return out


def contact_sheet(checkpoint, data, folds: torch.Tensor, indices: Sequence[int], *, runtime, ignore_index: int,
                  method: str, thresholds: torch.Tensor, rank_offset: int = 1, tta: str = "flip"):
    """A PIL image: one row per image in ``indices`` (image, given mask, out-of-sample prediction,
    issue heat map), labelled with its rank and name."""
    from PIL import Image, ImageDraw

    chosen = torch.as_tensor(list(indices), dtype=torch.int64)
    sub = data.subset(chosen)
    rows: dict[int, np.ndarray] = {}
    for local, probs, masks in out_of_sample_probs(checkpoint, sub, folds[chosen], runtime=runtime, batch_size=8,
                                                     tta=tta):
        scored = Q.score_batch(probs, masks, thresholds.to(probs.device), method=method, ignore_index=ignore_index)
        images, _ = sub.gather(local)
        for j, i in enumerate(local.tolist()):
            panels = [images[j].permute(1, 2, 0).numpy(), colour_labels(masks[j].cpu().numpy()),
                      colour_labels(probs[j].argmax(0).cpu().numpy()),
                      heatmap(scored["issue_map"][j].nan_to_num(0.0).cpu(), vmax=1.0).numpy()]
            rows[i] = np.concatenate(panels, axis=1)
    label_h = 14
    strips = []
    for rank, i in enumerate(range(len(chosen)), start=rank_offset):
        row = Image.fromarray(rows[i].astype(np.uint8))
        scale = max(1, _MIN_PANEL // row.height)  # small training sizes are drawn larger, pixels kept sharp
        row = row.resize((row.width * scale, row.height * scale), Image.Resampling.NEAREST)
        canvas = Image.new("RGB", (row.width, row.height + label_h), (255, 255, 255))
        canvas.paste(row, (0, label_h))
        ImageDraw.Draw(canvas).text((2, 1), f"#{rank} {sub.names[i]} (fold {int(folds[chosen[i]])})", fill=(0, 0, 0))
        strips.append(canvas)
    sheet = Image.new("RGB", (strips[0].width, sum(s.height for s in strips)), (255, 255, 255))
    top = 0
    for strip in strips:
        sheet.paste(strip, (0, top))
        top += strip.height
    return sheet


def _write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def audit(model, data, config: FitConfig, *, folds: int = 5, out_dir: str | os.PathLike, resume: bool = False,
          method: str = "self_confidence", tta: str = "flip", top: int = 16, hooks=None,
          args: dict | None = None) -> AuditResult:
    """Train the K-fold ensemble (or resume it), score every image out of sample, write the files.

    Args:
        data: the split to audit (a ``PreparedData``); every image is trained on by K - 1 members
            and scored by the one that held it out. No validation or test split is used.
        config: the training settings (``folds`` is set to ``folds``; ``ensemble`` and ``sweep``
            must be left alone).
        method: the pixel score (``label_quality.METHODS``).
        tta: "flip" (out-of-sample probabilities of the image and its mirror, averaged) or "none".
        top: images on the contact sheet.
    """
    if method not in Q.METHODS:
        raise ValueError(f"unknown audit method {method!r}; expected one of {', '.join(Q.METHODS)}")
    check_tta(tta)
    if folds < 2:
        raise ValueError(f"--folds must be at least 2 (each image needs a member that held it out), got {folds}")
    config = dataclasses.replace(config, folds=folds, ensemble=1)
    result = fit(model, Splits(data), config, out_dir=out_dir, resume=resume, hooks=hooks, args=args)
    if not result.is_main:
        return None
    runtime = resolve_runtime(config.device, config.precision, False, config.channels_last)
    fold = fold_ids(data.names, folds, config.seed)
    ignore = result.preprocess.ignore_index
    scores = score_dataset(result.checkpoint, data, fold, runtime=runtime, batch_size=config.batch_size,
                           method=method, ignore_index=ignore, tta=tta)
    order = Q.rank_images(scores["image_score"]).tolist()
    out = Path(result.out_dir)
    rows = [{"rank": r + 1, "name": data.names[i], "fold": int(fold[i]), "image_score": float(scores["image_score"][i]),
             "issue_fraction": float(scores["issue_fraction"][i]), "agreement": float(scores["agreement"][i])}
            for r, i in enumerate(order)]
    _write_csv(out / "audit.csv", rows)
    write_json(out / "audit.json", {"method": method, "tta": tta, "folds": folds,
                                    "checkpoint": str(result.checkpoint),
                                    "class_names": list(data.class_names),
                                    "thresholds": scores["thresholds"].tolist(), "images": rows})
    files = {"csv": str(out / "audit.csv"), "json": str(out / "audit.json")}
    if top:
        sheet = contact_sheet(result.checkpoint, data, fold, order[:top], runtime=runtime, ignore_index=ignore,
                              method=method, thresholds=scores["thresholds"], tta=tta)
        files["contact_sheet"] = str(write_atomic(out / "audit_top.png", png_bytes(sheet)))
    return AuditResult(result, tuple(data.names), fold.tolist(), order, scores["image_score"].tolist(),
                       scores["issue_fraction"].tolist(), scores["agreement"].tolist(),
                       scores["thresholds"].tolist(), method, files)
