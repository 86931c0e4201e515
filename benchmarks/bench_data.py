"""Benchmark: prepare time for the real sample, and augmentation throughput against torchvision.

Prepare: the sample's trainval split (300 full-resolution photos) decoded and resized to 128 px,
cold with the process pool over all cores, cold in one process, and again from the cache.

Augment: images/s at 128 x 128, batch 64, for the same flips and colour jitter done two ways:
  ours         ``Loader.epoch`` (one gather + copy per batch) -> ``to_float`` -> ``augment`` on the
               device, whole batch at once (also augment alone on a resident batch);
  torchvision  a map-style Dataset applying ``transforms.v2`` per sample (tv_tensors Image + Mask,
               so the flip hits both), batched by a ``DataLoader`` with worker processes; on CUDA
               the batches are pinned and copied to the GPU.
Both read the same in-memory uint8 tensors, so no decoding is timed. Not a test.

    .venv/bin/python -m benchmarks.bench_data                   # cpu
    .venv/bin/python -m benchmarks.bench_data --device cuda     # GPU, when there is one
    .venv/bin/python -m benchmarks.bench_data --sample PATH --batches 20 --compile

Runtime: ~2 min on a 2-core CPU; a few seconds for the augment part on a GPU.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from functional_seg.core import random as jr
from functional_seg.data import (
    Loader,
    PreparedData,
    augment,
    augment_preset,
    make_synthetic_dataset,
    prepare,
    to_float,
)

DEFAULT_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared/data/oxford-pets-sample"


class TorchvisionPairs(Dataset):
    """Per-sample v2 pipeline over prepared uint8 tensors (the usual DataLoader recipe)."""

    def __init__(self, data: PreparedData, transform: v2.Transform):
        self.images, self.masks, self.transform = data.images, data.masks, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image, mask = tv_tensors.Image(self.images[i]), tv_tensors.Mask(self.masks[i])
        image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


def _tv_transform(preset: str, size: int) -> v2.Transform:
    cfg = augment_preset(preset)
    ops: list[v2.Transform] = [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)]
    if cfg.crop_scale is not None:
        ops.append(v2.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True))
    if cfg.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
        ops.append(v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
    return v2.Compose(ops)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(run_epoch, n_images: int, device: torch.device, repeats: int) -> float:
    """Images per second: the best of ``repeats`` timed epochs after one untimed warm-up epoch.

    The best, not the mean: on a shared machine the slower epochs measure the neighbours.
    """
    run_epoch(0)
    _sync(device)
    best = float("inf")
    for epoch in range(1, repeats + 1):
        start = time.perf_counter()
        run_epoch(epoch)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return n_images / best


def bench_prepare(sample: Path) -> list[tuple[str, float]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        for label, workers, cache in (
            (f"cold, pool of {n_cores} workers", None, "a"),
            ("cold, 1 process", 1, "b"),
            ("cached (same arguments)", None, "a"),
        ):
            start = time.perf_counter()
            data = prepare(sample, "trainval", 128, cache_dir=Path(tmp) / cache, workers=workers)
            rows.append(
                (f"prepare trainval ({len(data)} images -> 128 px), {label}", time.perf_counter() - start)
            )
    return rows


def bench_augment(data: PreparedData, args, device: torch.device) -> list[tuple[str, str, float]]:
    rows = []
    key = jr.key(0)
    n_images = args.batches * args.batch_size
    data = data.repeat(n_images)
    loader = Loader(data, args.batch_size, device=device)
    resident_images = to_float(data.images[: args.batch_size].to(device))
    resident_masks = data.masks[: args.batch_size].to(device).long()
    for preset in args.presets:
        cfg = augment_preset(preset)
        aug = augment
        if args.compile:
            aug = torch.compile(lambda k, x, m, cfg=cfg: augment(k, x, m, cfg), fullgraph=True)

        def ours(epoch: int, cfg=cfg, aug=aug) -> None:
            epoch_key = jr.fold_in(key, epoch)
            for step, (images, masks) in enumerate(loader.epoch(epoch_key)):
                aug(jr.fold_in(epoch_key, step), to_float(images), masks, cfg)

        def ours_augment_only(epoch: int, cfg=cfg, aug=aug) -> None:
            for step in range(args.batches):
                aug(jr.fold_in(key, epoch * 10_000 + step), resident_images, resident_masks, cfg)

        name = "ours, compiled" if args.compile else "ours, eager"
        rows.append((f"{name}: Loader + augment", preset, _rate(ours, n_images, device, args.repeats)))
        rows.append(
            (f"{name}: augment only", preset, _rate(ours_augment_only, n_images, device, args.repeats))
        )

        dataset = TorchvisionPairs(data, _tv_transform(preset, data.size))
        tv_loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=args.tv_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=args.tv_workers > 0,
            generator=torch.Generator().manual_seed(0),
        )

        def tv(epoch: int, tv_loader=tv_loader) -> None:
            for images, masks in tv_loader:
                images.to(device, non_blocking=True), masks.to(device, non_blocking=True)

        rows.append(
            (
                f"torchvision v2 per sample, DataLoader({args.tv_workers} workers)",
                preset,
                _rate(tv, n_images, device, args.repeats),
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--sample", type=Path, default=Path(os.environ.get("FSEG_SAMPLE_DATA") or DEFAULT_SAMPLE)
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=10, help="batches per timed epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per pipeline (best is kept)")
    parser.add_argument("--tv-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--presets", nargs="+", default=["flip_jitter", "flip_jitter_full"])
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) our augment")
    parser.add_argument("--skip-prepare", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_data: --device cuda but torch.cuda.is_available() is False")
    device = torch.device(args.device)

    sample = args.sample
    tmp = None
    if not sample.is_dir():
        tmp = tempfile.TemporaryDirectory()
        sample = make_synthetic_dataset(
            Path(tmp.name) / "synthetic", n_trainval=300, n_test=8, size=(200, 500)
        )
        print(f"(sample not found at {args.sample}; using a synthetic stand-in)")
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"command: python -m benchmarks.bench_data {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {device}{gpu}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    )
    print(f"sample: {sample}")
    print()
    if not args.skip_prepare:
        for label, seconds in bench_prepare(sample):
            print(f"{label:<64} {seconds:8.2f} s")
        print()
    with tempfile.TemporaryDirectory() as cache:
        data = prepare(sample, "trainval", 128, cache_dir=cache)
    header = f"{'pipeline (128x128, batch ' + str(args.batch_size) + ')':<58} {'preset':<18} {'images/s':>10}"
    print(header)
    print("-" * len(header))
    for name, preset, rate in bench_augment(data, args, device):
        print(f"{name:<58} {preset:<18} {rate:10.0f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
