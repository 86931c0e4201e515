"""Micro-benchmark: Boundary IoU, calibration and the label audit on the device, against the
CPU references that compute the same numbers.

Rows, each timed as the median of synced calls, the outputs compared in the same run:

- boundary: ``metrics.boundary_counts`` on a batch [B, C, S, S] (dilation ratio 0.02) against
  the reference definition in scipy (each class's mask eroded d times with a 3x3 element,
  ``border_value=0``), the labels moved to the host first, as a numpy pipeline would.
- calibration: ``metrics.calibration_counts`` + ``ece`` against torchmetrics'
  ``multiclass_calibration_error`` (both on the device).
- audit: both passes of ``label_quality`` (thresholds, then ``score_batch`` per batch of
  ``--batch`` images) over N images [N, C, S, S] against cleanlab 2.9 on the host computing
  the same numbers: ``segmentation.rank.get_label_quality_scores(method="softmin")`` (image and
  pixel scores) plus ``filter.find_label_issues(filter_by="confident_learning")`` with pixels
  as examples (the issue mask); and, for context, ``segmentation.filter.find_label_issues``
  (cleanlab's own segmentation rule, a different mask). Rows whose package is missing are
  skipped.

    python -m benchmarks.bench_quality_metrics                      # cuda if available, else cpu
    python -m benchmarks.bench_quality_metrics --device cpu --quick --threads 2

Prints the device, torch version, the command and one table; ratios are reference / ours
(> 1: ours is faster). Not a test. Runtime: ~1 min on a GPU, ~1-2 min on a small CPU with --quick.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np
import torch

from experiments.harness import timed
from functional_seg import label_quality as Q
from functional_seg import metrics as M


def _blobs(n: int, c: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Blobby labels int64 [n, size, size]: random 8 x 8 labels, nearest-upsampled."""
    coarse = torch.randint(0, c, (n, 1, 8, 8), generator=g).float()
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long()


def _scipy_boundary(pred: torch.Tensor, target: torch.Tensor, c: int, ratio: float):
    from scipy import ndimage

    p, t = pred.cpu().numpy(), target.cpu().numpy()
    d = M.boundary_width(*t.shape[1:], ratio)
    element = np.ones((3, 3), bool)
    inter, union = np.zeros(c, np.int64), np.zeros(c, np.int64)
    for i in range(t.shape[0]):
        for k in range(c):
            bands = []
            for labels in (t[i], p[i]):
                mask = labels == k
                bands.append(mask & ~ndimage.binary_erosion(mask, element, iterations=d, border_value=0))
            inter[k] += (bands[0] & bands[1]).sum()
            union[k] += (bands[0] | bands[1]).sum()
    return inter, union


def _ours_audit(probs: torch.Tensor, labels: torch.Tensor, batch: int):
    counts = sum(Q.threshold_counts(probs[i : i + batch], labels[i : i + batch]) for i in range(0, len(probs), batch))
    t = Q.class_thresholds(counts)
    outs = [Q.score_batch(probs[i : i + batch], labels[i : i + batch], t) for i in range(0, len(probs), batch)]
    return torch.cat([o["image_score"] for o in outs]), torch.cat([o["issue_map"] > 0 for o in outs])


def _cleanlab_audit(probs: np.ndarray, labels: np.ndarray):
    from cleanlab.filter import find_label_issues
    from cleanlab.segmentation.rank import get_label_quality_scores

    image, _ = get_label_quality_scores(labels, probs, method="softmin", verbose=False)
    c = probs.shape[1]
    flat = find_label_issues(labels.reshape(-1), probs.transpose(0, 2, 3, 1).reshape(-1, c),
                             filter_by="confident_learning")
    return image, flat.reshape(labels.shape)


def _cleanlab_segmentation(probs: np.ndarray, labels: np.ndarray):
    from cleanlab.segmentation.filter import find_label_issues

    return find_label_issues(labels, probs, verbose=False)


def _available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _boundary_rows(args, device, g, rows: list) -> None:
    c, s = args.classes, args.size
    target = _blobs(args.boundary_batch, c, s, g).to(device)
    pred = torch.where(_blobs(args.boundary_batch, 2, s, g).to(device) == 1, _blobs(args.boundary_batch, c, s, g)
                       .to(device), target)
    ours_s, ours = timed(lambda: M.boundary_counts(pred, target, c), device, warmup=args.warmup, iters=args.repeat)
    label = f"boundary_counts [{args.boundary_batch}, {c}, {s}, {s}], d = {M.boundary_width(s, s, 0.02)}"
    rows.append((label, "ours", ours_s, None, ""))
    if args.compile:
        compiled = torch.compile(lambda: M.boundary_counts(pred, target, c), fullgraph=True)
        comp_s, comp = timed(compiled, device, warmup=max(1, args.warmup), iters=args.repeat)
        same = all(torch.equal(a, b) for a, b in zip(comp, ours))
        rows.append((label, "ours, torch.compile", comp_s, None, "equal" if same else "DIFFERS"))
    if _available("scipy"):
        ref_s, ref = timed(lambda: _scipy_boundary(pred, target, c, 0.02), device, warmup=0, iters=args.ref_repeat)
        same = ref[0].tolist() == ours[0].tolist() and ref[1].tolist() == ours[1].tolist()
        rows.append((label, "scipy reference (host)", ref_s, ref_s / ours_s, "equal" if same else "DIFFERS"))


def _calibration_rows(args, device, g, rows: list) -> None:
    c, s = args.classes, args.size
    probs = (2 * torch.randn(args.boundary_batch, c, s, s, generator=g)).softmax(1).to(device)
    target = torch.randint(0, c, (args.boundary_batch, s, s), generator=g).to(device)
    ours_s, ours = timed(lambda: M.ece(M.calibration_counts(probs, target)), device, warmup=args.warmup,
                         iters=args.repeat)
    label = f"ECE (15 bins) [{args.boundary_batch}, {c}, {s}, {s}]"
    rows.append((label, "ours", ours_s, None, ""))
    if _available("torchmetrics"):
        from torchmetrics.functional.classification import multiclass_calibration_error

        ref_s, ref = timed(lambda: multiclass_calibration_error(probs, target, c, n_bins=15), device,
                           warmup=args.warmup, iters=args.repeat)
        agree = abs(ref.item() - ours.item()) < 1e-5
        rows.append((label, "torchmetrics (device)", ref_s, ref_s / ours_s, "equal" if agree else "DIFFERS"))


def _audit_rows(args, device, g, rows: list) -> None:
    c, s, n = args.classes, args.audit_size, args.images
    truth = _blobs(n, c, s, g)
    logits = 3.0 * torch.nn.functional.one_hot(truth, c).permute(0, 3, 1, 2).float() + torch.randn(n, c, s, s,
                                                                                                   generator=g)
    probs = logits.softmax(1)
    labels = torch.where(torch.rand(n, s, s, generator=g) < 0.05, torch.randint(0, c, (n, s, s), generator=g), truth)
    probs_d, labels_d = probs.to(device), labels.to(device)
    ours_s, (image, issues) = timed(lambda: _ours_audit(probs_d, labels_d, args.batch), device,
                                    warmup=args.warmup, iters=args.repeat)
    label = f"label audit, both passes, [{n}, {c}, {s}, {s}]"
    rows.append((label, "ours", ours_s, None, f"{int(issues.sum())} issue px"))
    if _available("cleanlab"):
        p64, l64 = probs.double().numpy(), labels.numpy()
        ref_s, (ref_image, ref_issues) = timed(lambda: _cleanlab_audit(p64, l64), device, warmup=0,
                                               iters=args.ref_repeat)
        agree = np.abs(ref_image - image.cpu().numpy()).max() < 1e-6
        same_mask = np.array_equal(ref_issues, issues.cpu().numpy())
        note = ("scores equal" if agree else "scores DIFFER") + (", mask equal" if same_mask else ", mask DIFFERS")
        rows.append((label, "cleanlab softmin + confident_learning (host)", ref_s, ref_s / ours_s, note))
        seg_s, seg = timed(lambda: _cleanlab_segmentation(p64, l64), device, warmup=0, iters=args.ref_repeat)
        rows.append((label, "cleanlab.segmentation find_label_issues (host)", seg_s, seg_s / ours_s,
                     f"{int(seg.sum())} issue px (its own rule)"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes for a CPU")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--size", type=int, default=None, help="boundary/calibration side (256; quick 128)")
    parser.add_argument("--boundary-batch", type=int, default=None, help="boundary/calibration batch (16; quick 4)")
    parser.add_argument("--images", type=int, default=None, help="audit images (256; quick 32)")
    parser.add_argument("--audit-size", type=int, default=None, help="audit image side (128; quick 64)")
    parser.add_argument("--batch", type=int, default=64, help="audit batch size")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls of ours (20; quick 5)")
    parser.add_argument("--ref-repeat", type=int, default=1, help="timed calls of each host reference")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also time boundary_counts under torch.compile")
    args = parser.parse_args(argv)
    quick = args.quick
    args.size = args.size or (128 if quick else 256)
    args.boundary_batch = args.boundary_batch or (4 if quick else 16)
    args.images = args.images or (32 if quick else 256)
    args.audit_size = args.audit_size or (64 if quick else 128)
    args.repeat = args.repeat or (5 if quick else 20)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {device} ({name}), torch {torch.__version__}")
    print("command: python -m benchmarks.bench_quality_metrics " + shlex.join(sys.argv[1:] if argv is None else argv))
    rows: list = []
    _boundary_rows(args, device, g, rows)
    _calibration_rows(args, device, g, rows)
    _audit_rows(args, device, g, rows)
    width = max(len(r[0]) for r in rows)
    who = max(len(r[1]) for r in rows)
    print(f"{'what':<{width}}  {'who':<{who}}  {'median':>10}  {'ref/ours':>8}  check")
    for label, whom, seconds, ratio, note in rows:
        ratio_s = f"{ratio:8.1f}" if ratio is not None else f"{'':>8}"
        print(f"{label:<{width}}  {whom:<{who}}  {1e3 * seconds:8.2f}ms  {ratio_s}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
