"""Scoring at full resolution: each image predicted at its own size and scored against its original
mask file, the protocol papers report.

``evaluation.evaluate`` scores a prepared split: images and masks resized (or padded) to the
training size, where a thin structure or a contour blurred by the resize no longer counts against
the model. Here every sample is read as the dataset stores it (the readers and label map
``prepare`` uses, without the resize: ``data.sample.load_original``), predicted by
``predict.Predictor`` (the whole image fitted as in training and its logits resized back to the
image, or sliding windows with ``tile``; an ensemble's mean prediction, as ``fseg predict`` makes
it) and scored on the original pixels with the eval step's counts: the confusion matrix, Boundary
IoU (each image's band from its own diagonal), calibration and, for the Oxford layout, the
series' per-image soft IoU. The summary has the same keys as ``evaluate``'s, without
``boundary_width_px`` (the band differs per image).

Memory: one image and its labels, one strip of logits (``Predictor.strip_bytes``) and the
prediction's labels at a time, plus Boundary IoU's masks of one image.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterator, Sequence

import torch

from .. import metrics as M
from ..data.errors import DataError, DataWarning
from ..data.label_sets import infer_labels
from ..data.labels import IGNORE_INDEX
from ..data.layouts import open_source
from ..data.pool import cpu_count, parallel_map
from ..data.sample import SampleResult, SampleTask, load_original
from ..metrics import CALIBRATION_BINS, SERIES_EPS
from ..models.saved import Loaded, load_checkpoint
from ..predict import Predictor, mask_of
from ..runtime import Runtime, resolve_runtime
from ..uncertainty import mean_probs
from .evaluation import check_classes, summary_of

__all__ = ["evaluate_full_res", "FullResCounts"]


@dataclasses.dataclass
class FullResCounts:
    """The eval step's sums over a split (see ``train.step.make_eval_step``), at full resolution."""

    num_classes: int
    confusion: torch.Tensor = dataclasses.field(init=False)  # int64 [C, C]
    boundary: torch.Tensor = dataclasses.field(init=False)  # int64 [2, C]: intersections, unions
    calibration: torch.Tensor = dataclasses.field(init=False)  # float64 [3, bins]
    custom_iou: float = 0.0  # sum over images of the series' per-image soft IoU
    images: int = 0

    def __post_init__(self):
        c = self.num_classes
        self.confusion = torch.zeros(c, c, dtype=torch.int64)
        self.boundary = torch.zeros(2, c, dtype=torch.int64)
        self.calibration = torch.zeros(3, CALIBRATION_BINS, dtype=torch.float64)

    def add(self, strips: Iterator[tuple[int, torch.Tensor]], labels: torch.Tensor, boundary_ratio: float) -> None:
        """One image: its logit strips (first row, float32 [P, C, r, W]) and its labels int64 [H, W]."""
        c = self.num_classes
        pred = torch.empty(labels.shape, dtype=torch.int64, device=labels.device)
        soft = torch.zeros(3, dtype=torch.float64)  # pooled soft intersection, predicted mass, true count
        for row, logits in strips:
            rows = slice(row, row + logits.shape[-2])
            target = labels[rows][None]
            pred[rows] = mask_of(logits).to(torch.int64)
            # one prediction: its logits; several: log of the mean softmax (softmax gives it back)
            scores = logits[:1] if logits.shape[0] == 1 else mean_probs(logits[:, None]).clamp_min(1e-30).log()
            self.calibration += M.calibration_counts(scores.softmax(1), target, num_bins=CALIBRATION_BINS,
                                                     ignore_index=IGNORE_INDEX).cpu()
            inter, mass, true = M.soft_stats(scores, target, ignore_index=IGNORE_INDEX)
            soft += torch.stack([inter.sum(), mass.sum(), true.sum()]).double().cpu()
        self.confusion += M.confusion_matrix(pred[None], labels[None], c, ignore_index=IGNORE_INDEX).cpu()
        self.boundary += torch.stack(M.boundary_counts(pred[None], labels[None], c, ignore_index=IGNORE_INDEX,
                                                       dilation_ratio=boundary_ratio)).cpu()
        union = max(float(soft[1] + soft[2] - soft[0]), 0.0)
        self.custom_iou += (float(soft[0]) + SERIES_EPS) / (union + SERIES_EPS)
        self.images += 1

    def sums(self) -> dict:
        return {"confusion": self.confusion, "boundary": self.boundary, "calibration": self.calibration,
                "custom_iou": torch.tensor(self.custom_iou, dtype=torch.float64)}


def _decoded(tasks: Sequence[SampleTask], workers: int, batch: int) -> Iterator[list[SampleResult]]:
    """The samples at their stored size, ``batch`` at a time, decoded ahead by ``workers`` processes."""
    chunk: list[SampleResult] = []
    for result in parallel_map(load_original, tasks, workers, chunksize=1, in_flight=2 * workers):
        chunk.append(result)
        if len(chunk) == batch:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def evaluate_full_res(checkpoint, root: str | os.PathLike, split: str, *, runtime: Runtime | None = None,
                      weights: str = "auto", member: int | str = "all", seed: int = 0, binary_255: bool = False,
                      strict: bool = True, tile: int | None = None, tile_overlap: float = 0.25,
                      batch_size: int = 8, boundary_ratio: float = 0.02, workers: int = 1,
                      limit: int | None = None, data_label: str | None = None) -> dict:
    """Score a checkpoint (a path, or ``models.load_checkpoint``'s result) on one split of the dataset
    at ``root``, every image at its own size against its original mask.

    Args:
        seed, binary_255: how the split and its masks are read, as ``prepare`` takes them.
        strict: a bad sample raises one ``DataError`` naming it (False: skipped, one ``DataWarning``).
        tile, tile_overlap, batch_size: the ``Predictor``'s (whole images by default).
        workers: processes decoding ahead of the predictor (1: in this process).
        limit: score the split's first ``limit`` images only (as ``DataConfig.test_limit``).

    Returns:
        ``{"checkpoint", "weights", "member", "class_names", "resolution": "full", "images",
        "summary"}``, ``summary`` as ``evaluate``'s (one summary, for an ensemble's mean prediction).
    """
    runtime = runtime or resolve_runtime()
    loaded = checkpoint if isinstance(checkpoint, Loaded) else load_checkpoint(
        checkpoint, device=runtime.device, weights=weights, member=member)
    src = open_source(root, split, seed=seed, binary_255=binary_255)
    labels = src.labels or infer_labels(src, max(1, min(workers, cpu_count())))
    label = data_label or f"{root} ({split})"
    names = check_classes(loaded.preprocess.class_names, labels.class_names, checkpoint=loaded.path, data=label)
    pre = dataclasses.replace(loaded.preprocess, class_names=names)
    predictor = Predictor.from_checkpoint(dataclasses.replace(loaded, preprocess=pre), runtime, tile=tile,
                                          tile_overlap=tile_overlap, batch_size=batch_size)
    tasks = [SampleTask(i, n, str(ip), str(mp), 0, pre.policy, labels, src.mask_what, src.mask_expected)
             for i, (n, ip, mp) in enumerate(zip(src.names, src.images, src.masks))][:limit]
    counts, bad = FullResCounts(len(names)), []
    with torch.no_grad():
        for chunk in _decoded(tasks, workers, batch_size):
            bad += [r.error for r in chunk if r.error is not None]
            good = [r for r in chunk if r.error is None]
            for r, strips in zip(good, predictor.strips([r.image for r in good])):
                target = torch.from_numpy(r.mask).to(runtime.device, torch.int64)
                counts.add(strips, target, boundary_ratio)
    if bad:
        text = f"{len(bad)} of {len(tasks)} samples of {label} are bad: {'; '.join(bad[:5])}"
        if strict or not counts.images:
            raise DataError(f"{text}; strict=False (fseg --skip-bad) skips them")
        warnings.warn(f"full-resolution evaluation: {text}; skipped them", DataWarning, stacklevel=2)
    summary = summary_of(counts.sums(), counts.images, names, pre.layout == "oxford_pets", None, boundary_ratio,
                         detail=True)
    return {"checkpoint": str(loaded.path), "weights": list(loaded.weights), "member": loaded.member,
            "class_names": list(names), "resolution": "full", "images": counts.images, "summary": summary}
