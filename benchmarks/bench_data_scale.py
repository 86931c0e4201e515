"""Data larger than memory: memory and speed of the sharded cache as the split grows.

    python -m benchmarks.bench_data_scale                      # CPU, ~15-25 min on 2 cores
    python -m benchmarks.bench_data_scale --quick              # 200/400/800 images, ~3 min
    python -m benchmarks.bench_data_scale --work /tmp/scale    # keep the datasets and caches between runs

Datasets: synthetic generic scenes (``make_generic_dataset``, 5 classes) at 100-160 px, prepared
at 128 px: 2,000 generated images, and 8,000 and 32,000 samples made of them hard-linked under
new names (every sample is decoded and stored: the bytes and the work are real, the content
repeats); plus 2,000 samples of 500 scenes at 480-640 px prepared at 512 px. Sections:

1. prepare, each in a fresh process (all cores), opening the result on its shards (a split
   held in memory would add its own size): peak RSS (VmHWM) of the process and of its largest
   decoding worker, and time.
2. one epoch of reads (``Loader``, batch 64, shuffled, from the shards, prefetch 2), each in a
   fresh process: peak RSS, peak anonymous RSS (sampled every 10 ms) and images/s.
3. read throughput on the 8,000-sample split, every loader in one process in interleaved turns
   (so a shared machine's load falls on all alike; medians): the in-memory loader as it was
   before shards (``index_select`` on whole-split tensors), the Loader on the split held in
   memory, and on its shards with the page cache warm and cold (the split's files evicted with
   ``posix_fadvise(DONTNEED)`` before each turn); the loader alone (touching every byte) and
   into a train step (the library's eager step on SegNet widths 8,16, flip augmentation, batch 64).
4. two processes reading the same split at once: RSS and PSS (``/proc/PID/smaps_rollup``) of
   each after both read every sample, from shards vs in memory, and the page cache's share
   (``Cached`` in /proc/meminfo before and after): one copy for both readers.
5. a split larger than the memory the process may use: 64,000 samples at 128 px (4.2 GB), their
   pages evicted from the page cache first (a cached page stays charged to whoever read it
   first), read by a process in a child memory cgroup limited to ``--cgroup-mb`` (v2
   ``memory.max`` or v1 ``memory.limit_in_bytes``, created under this process's own cgroup and
   removed after): one Loader epoch over every sample, then ``fit`` for ``--max-steps`` steps
   (a full CPU epoch of training would take an hour here); the same split forced into memory
   there is the control.
6. sha256 over shard bytes (the integrity check): GB/s on one core.
7. ``step`` (``--device``; the GPU suite's part): does the train step wait on the data? The
   library's train step as ``fseg train`` builds it (``benchmarks._rows.library_steps``: the full
   SegNet, flip augmentation inside, compiled, bf16 and channels-last on CUDA; ``--step-widths``
   shrinks it for a CPU dry run) fed by four loaders in interleaved turns in one process: the
   whole split resident on the device (no loading at all: the floor), the split in host memory,
   and its shards with and without the prefetch thread; milliseconds per step (device
   synchronised), medians of the turns, and each loader's time over the resident one's.

    python -m benchmarks.bench_data_scale --device cuda --sections step      # the GPU suite's call

Writes ``experiments/results/bench_data_scale_<cpu|cpu_quick|cuda>.{json,md}``. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MARK = "BENCH_DATA_SCALE "
EXPERIMENT = "bench_data_scale"
MB = 2**20


# ---------------------------------------------------------------------------------------------- children


def _status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) / 1024
    return out


class _Sampler:
    """Peak anonymous and file-backed RSS, sampled every 10 ms on a thread (the kernel keeps no
    high-water mark per kind)."""

    def __init__(self):
        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            s = _status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s[k])
            time.sleep(0.01)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.peak


def _evict(folder: Path) -> None:
    """Drop this split's shard files from the page cache (only these files)."""
    for p in folder.glob("shard-*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _child_prepare(a) -> dict:
    import resource

    from functional_seg.data import prepare

    base = _status()
    t0 = time.perf_counter()
    data = prepare(a.root, "train", a.size, cache_dir=a.cache, progress=False, in_memory=False)
    seconds = time.perf_counter() - t0
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"n": len(data), "seconds": seconds, "images_per_s": len(data) / seconds, "base_rss_mb": base["VmRSS"],
            "peak_rss_mb": _status()["VmHWM"], "worker_peak_rss_mb": worker,
            "shards": len(list(data.cache_path.glob("shard-*"))), "gb": data.nbytes / 1e9}


def _step_fn(size: int):
    """The library's eager train step on a small SegNet: ``step(images, masks)``."""
    import torch

    from functional_seg.core import random as jr
    from functional_seg.data import augment_preset
    from functional_seg.data.preprocess import Preprocess
    from functional_seg.losses import get_loss
    from functional_seg.models import create_model
    from functional_seg.train import init_train_state, make_optimizer, make_train_step

    torch.manual_seed(0)
    model = create_model("segnet", widths=(8, 16), convs_per_stage=(1, 1), num_classes=5)
    optimizer = make_optimizer(name="adam", lr=1e-3)
    step = make_train_step(model, get_loss("ce", ignore_index=255), optimizer, preprocess=Preprocess(), compile=False,
                           augment_cfg=augment_preset("flip"))
    holder = [init_train_state(model, optimizer, jr.key(0))]

    def run(images, masks):
        holder[0], metrics = step(holder[0], (images, masks))
        return metrics["loss"]

    return run


def _batches(a, data, key):
    """The batches of one epoch as ``a.loader`` reads them."""
    import torch

    from functional_seg.core import random as jr
    from functional_seg.data import Loader

    if a.loader == "tensors":  # the Loader before shards: whole-split tensors, index_select per batch
        images, masks = data  # (images, masks), made before the timing starts
        order = jr.permutation(key, len(images))
        for i in range(len(images) // a.batch_size):
            idx = order[i * a.batch_size:(i + 1) * a.batch_size]
            yield images.index_select(0, idx), masks.index_select(0, idx).to(torch.int64)
        return
    yield from Loader(data, a.batch_size, prefetch=a.prefetch).epoch(key)


def _child_read(a) -> dict:
    import torch

    from functional_seg.core import random as jr
    from functional_seg.data import prepare

    step = _step_fn(a.size) if a.step else None
    if step is not None:  # the first steps allocate; time the ones after
        import torch

        warm = torch.zeros((a.batch_size, 3, a.size, a.size), dtype=torch.uint8)
        step(warm, torch.zeros((a.batch_size, a.size, a.size), dtype=torch.int64))
    base = _status()
    in_memory = {"memory": True, "shards": False, "auto": None}[a.storage]
    data = prepare(a.root, "train", a.size, cache_dir=a.cache, in_memory=in_memory, progress=False)
    if a.cold:
        _evict(data.cache_path)
    source = (data.images, data.masks) if a.loader == "tensors" else data
    sampler = _Sampler()
    t0 = time.perf_counter()
    n = 0
    for i, (images, masks) in enumerate(_batches(a, source, jr.key(0))):
        if step is not None:
            if i == a.step_batches:
                break
            step(images, masks)
        else:
            images.float().mean()  # touch every byte, as the step's normalisation does
        n += images.shape[0]
    seconds = time.perf_counter() - t0
    peak = sampler.stop()
    out = {"n": n, "seconds": seconds, "images_per_s": n / seconds, "storage": data.storage,
           "cache_path": str(data.cache_path),
           "base_rss_mb": base["VmRSS"], "peak_rss_mb": _status()["VmHWM"], "peak_anon_mb": peak["RssAnon"],
           "peak_file_mb": peak["RssFile"], "threads": torch.get_num_threads()}
    if a.hold:  # wait until the parent has read /proc/PID/smaps_rollup
        print(MARK + json.dumps(out), flush=True)
        sys.stdin.read()
    return out


def _child_fit(a) -> dict:
    """In the cgroup: one Loader epoch over every sample (all of the split's bytes pass through the
    limited memory), then ``fit`` for ``--max-steps`` steps on the same split."""
    import tempfile as tf

    from functional_seg.core import random as jr
    from functional_seg.data import Loader, prepare
    from functional_seg.models import create_model
    from functional_seg.runtime import host_memory_available
    from functional_seg.train import FitConfig, OptimizerConfig, fit

    available = host_memory_available()
    in_memory = {"memory": True, "shards": False, "auto": None}[a.storage]
    data = prepare(a.root, "train", a.size, cache_dir=a.cache, in_memory=in_memory, progress=False)
    if a.cold:
        _evict(data.cache_path)  # pages still cached are charged to whoever read them first, not to this cgroup
    t0 = time.perf_counter()
    n = sum(images.shape[0] for images, _ in Loader(data, a.batch_size).epoch(jr.key(0)))
    read_s = time.perf_counter() - t0
    model = create_model("segnet", widths=(4, 8), convs_per_stage=(1, 1), num_classes=data.num_classes)
    config = FitConfig(batch_size=a.batch_size, epochs=1, max_steps=a.max_steps, device="cpu", compile=False,
                       log_every=10**9, optimizer=OptimizerConfig(lr=1e-3))
    t0 = time.perf_counter()
    with tf.TemporaryDirectory() as out:
        result = fit(model, data, config, out_dir=out, hooks=[])
    return {"storage": data.storage, "gb": data.nbytes / 1e9, "available_mb": (available or 0) / MB,
            "epoch_images": n, "epoch_images_per_s": n / read_s, "steps": result.step,
            "fit_s": time.perf_counter() - t0, "final_loss": result.history[-1]["train_loss"],
            "peak_rss_mb": _status()["VmHWM"]}


_ROWS = ("tensors (the Loader before shards)", "Loader, in memory", "Loader, shards, warm", "Loader, shards, cold")


def _child_throughput(a) -> dict:
    """Every row in this one process, interleaved (row 1, 2, 3, 4, 1, 2, ...) ``a.repeats`` times,
    ``a.batches`` batches a turn, so the load of a shared machine falls on all rows alike; medians."""
    import itertools
    import statistics

    from functional_seg.core import random as jr
    from functional_seg.data import Loader, prepare

    memory = prepare(a.root, "train", a.size, cache_dir=a.cache, in_memory=True, progress=False)
    shards = prepare(a.root, "train", a.size, cache_dir=a.cache, in_memory=False, progress=False)
    tensors = memory.images, memory.masks
    step = _step_fn(a.size) if a.step else None
    if step is not None:  # the first step allocates; time the ones after
        with contextlib.closing(Loader(memory, a.batch_size).epoch(jr.key(0))) as warm:
            step(*next(warm))

    def turn(row: int, key) -> float:
        if row == 3:
            _evict(shards.cache_path)
        batches = (_batches(argparse.Namespace(loader="tensors", batch_size=a.batch_size), tensors, key) if row == 0
                   else Loader(memory if row == 1 else shards, a.batch_size).epoch(key))
        t0 = time.perf_counter()
        n = 0
        with contextlib.closing(iter(batches)) as it:
            for images, masks in itertools.islice(it, a.batches):
                step(images, masks) if step is not None else images.float().mean()
                n += images.shape[0]
        return n / (time.perf_counter() - t0)

    rates: dict[int, list[float]] = {r: [] for r in range(len(_ROWS))}
    for rep in range(a.repeats):
        for row in range(len(_ROWS)):
            rates[row].append(turn(row, jr.fold_in(jr.key(1), rep)))
    return {_ROWS[r]: {"images_per_s": statistics.median(v), "turns": v} for r, v in rates.items()}


STEP_ROWS = ("resident: the split on the device", "in memory, prefetch 2", "shards, prefetch 2",
             "shards, no prefetch")


def _child_step(a) -> dict:
    """Section 7, in this one process: every loader feeds the same train step in interleaved turns of
    ``a.batches`` steps (a turn may run over epochs), ``a.repeats`` times; ms per step, medians."""
    import itertools
    import statistics

    import torch

    from benchmarks._rows import library_steps
    from functional_seg.core import random as jr
    from functional_seg.core.tree import tree_size
    from functional_seg.data import Loader, prepare
    from functional_seg.models import create_model

    device = torch.device(a.device)
    memory = prepare(a.root, "train", a.size, cache_dir=a.cache, in_memory=True, progress=False)
    shards = prepare(a.root, "train", a.size, cache_dir=a.cache, in_memory=False, progress=False)
    cfg = {"widths": tuple(int(w) for w in a.step_widths.split(",")), "convs_per_stage": (1,) * 2} \
        if a.step_widths else {}
    model = create_model("segnet", num_classes=memory.num_classes, **cfg)
    row = library_steps(model, device, size=a.size, compile=a.compile == "on", augment="flip", data=memory,
                        batch_size=a.batch_size)
    step, held = row.steps.train_step, [row.init(jr.key(0))]
    loaders = [Loader(memory, a.batch_size, device=device, resident=True), Loader(memory, a.batch_size, device=device),
               Loader(shards, a.batch_size, device=device), Loader(shards, a.batch_size, device=device, prefetch=0)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def batches(loader, key):
        for epoch in itertools.count():
            yield from loader.epoch(jr.fold_in(key, epoch))

    def turn(loader, key, n: int) -> float:
        sync()
        t0 = time.perf_counter()
        with contextlib.closing(batches(loader, key)) as it:
            for batch in itertools.islice(it, n):
                held[0], metrics = step(held[0], batch)
        float(metrics["loss"])  # the last step's result on the host: every step has run
        sync()
        return (time.perf_counter() - t0) / n * 1000

    t0 = time.perf_counter()
    turn(loaders[0], jr.key(1), a.warm_steps)  # compilation and the allocator's first blocks
    warm_s = time.perf_counter() - t0
    ms: dict[int, list[float]] = {r: [] for r in range(len(loaders))}
    for rep in range(a.repeats):
        for r, loader in enumerate(loaders):
            ms[r].append(turn(loader, jr.fold_in(jr.key(2), rep), a.batches))
    out = {STEP_ROWS[r]: {"ms_per_step": statistics.median(v), "turns_ms": v} for r, v in ms.items()}
    floor = out[STEP_ROWS[0]]["ms_per_step"]
    for row_out in out.values():
        row_out["x_resident"] = row_out["ms_per_step"] / floor
    return {"rows": out, "device": str(device), "model": f"segnet {cfg or '(defaults)'}",
            "params": tree_size(held[0].params), "precision": row.runtime.precision,
            "channels_last": row.runtime.channels_last,
            "compiled": a.compile == "on", "warm_s": warm_s, "batch_size": a.batch_size, "size": a.size,
            "n": len(memory), "steps_per_turn": a.batches, "turns": a.repeats}


def _child(a) -> None:
    fn = {"prepare": _child_prepare, "read": _child_read, "fit": _child_fit, "throughput": _child_throughput,
          "step": _child_step}[a.child]
    print(MARK + json.dumps(fn(a)), flush=True)


# ---------------------------------------------------------------------------------------------- parent


def _run(role: str, args, *extra: str, prefix: list[str] | None = None, hold: bool = False):
    """A child row in a fresh process: its result dict (or a failed status)."""
    argv = [sys.executable, "-m", "benchmarks.bench_data_scale", "--child", role, "--threads", str(args.threads),
            *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    if hold:
        return subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    proc = subprocess.run((prefix or []) + argv, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
    return {"status": f"failed (exit {proc.returncode} after {time.perf_counter() - t0:.0f} s): {tail[-300:]}"}


def _datasets(args, work: Path) -> dict[str, tuple[Path, int, int]]:
    """name -> (root, size, n): the generated bases, and the bigger splits as hard links to them."""
    from functional_seg.data import make_generic_dataset

    out = {}
    todo = set(args.sections.split(","))
    counts = set(args.sizes) if todo & {"prepare", "read"} else set()
    counts |= {args.sizes[1]} if todo & {"throughput", "pss"} else set()
    counts |= {args.cgroup_n} if "cgroup" in todo else set()
    counts |= {args.step_n} if "step" in todo else set()
    specs = [(f"{n}@128", 128, n, args.base, (100, 160)) for n in sorted(counts)]
    if todo & {"prepare", "read"}:
        specs.append((f"{args.big}@512", 512, args.big, args.big_base, (480, 640)))
    for name, size, n, base_n, src_size in specs:
        base = work / f"base-{base_n}-{src_size[0]}"
        if not (base / "classes.txt").exists():
            print(f"generating {base_n} scenes at {src_size} px in {base}", flush=True)
            make_generic_dataset(base, n=base_n, size=src_size, seed=0)
        root = work / f"split-{name.replace('@', '-')}"
        if not (root / "classes.txt").exists():
            for sub in ("images", "masks"):
                (root / sub).mkdir(parents=True, exist_ok=True)
                for k in range(n):
                    src = base / sub / f"img_{k % base_n}.{'jpg' if sub == 'images' else 'png'}"
                    dst = root / sub / f"img_{k}{src.suffix}"
                    if not dst.exists():
                        os.link(src, dst)
            names = [f"img_{k}\n" for k in range(n)]
            (root / "train.txt").write_text("".join(names))
            shutil.copyfile(base / "classes.txt", root / "classes.txt")
        out[name] = (root, size, n)
    return out


def _smaps_rollup(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0].rstrip(":") in ("Rss", "Pss", "Pss_Anon", "Pss_File"):
                out[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return out


def _two_readers(args, root: Path, size: int, cache: Path, storage: str) -> dict:
    common = ["--root", str(root), "--size", str(size), "--cache", str(cache), "--storage", storage,
              "--batch-size", "64", "--hold"]
    for folder in cache.iterdir():
        _evict(folder)
    procs = [_run("read", args, *common, hold=True) for _ in range(2)]
    results = []
    for p in procs:  # each prints its result, then waits, its memory as it was
        line = p.stdout.readline()
        results.append(json.loads(line[len(MARK):]) if line.startswith(MARK) else {})
    smaps = [_smaps_rollup(p.pid) for p in procs]
    for p in procs:
        p.stdin.close()
        p.wait()
    folder = Path(results[0]["cache_path"]) if results[0].get("cache_path") else None
    return {"storage": storage, "rss_mb": [s["Rss"] for s in smaps], "pss_mb": [s["Pss"] for s in smaps],
            "pss_file_mb": [s.get("Pss_File") for s in smaps], "sum_rss_mb": sum(s["Rss"] for s in smaps),
            "sum_pss_mb": sum(s["Pss"] for s in smaps), "images_per_s": [r.get("images_per_s") for r in results],
            "page_cache_mb": _page_cache_mb(folder) if folder else None}


def _page_cache_mb(folder: Path) -> float:
    """MB of ``folder``'s shard files in the page cache (``mincore`` over a private mapping of each,
    which faults nothing in): the one copy every reader shares."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    resident = 0
    for path in folder.glob("shard-*.safetensors"):
        size = path.stat().st_size
        with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
            buf = (ctypes.c_char * size).from_buffer(mm)
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec) == 0:
                resident += sum(v & 1 for v in vec) * page
            del buf
    return resident / MB


def _own_cgroup() -> tuple[Path, str] | None:
    """(this process's memory cgroup folder, "v2" or "v1") if this process may create children there."""
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            folder, kind = Path(f"/sys/fs/cgroup{rel}"), "v2"
        elif "memory" in controllers.split(","):
            folder, kind = Path(f"/sys/fs/cgroup/memory{rel}"), "v1"
        else:
            continue
        if os.access(folder, os.W_OK):
            return folder, kind
    return None


def _in_cgroup(args, limit_mb: int, *child_args: str) -> dict:
    """Run a child row inside a fresh memory cgroup limited to ``limit_mb``; the cgroup's record."""
    found = _own_cgroup()
    if found is None:
        return {"status": "no writable memory cgroup here"}
    parent, kind = found
    group = parent / f"fseg-bench-{os.getpid()}"
    group.mkdir()
    try:
        limit_file, peak_file = (("memory.max", "memory.peak") if kind == "v2"
                                 else ("memory.limit_in_bytes", "memory.max_usage_in_bytes"))
        (group / limit_file).write_text(str(limit_mb * MB))
        if kind == "v1":
            (group / "memory.swappiness").write_text("0")
        enter = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]
        result = _run("fit", args, *child_args, prefix=enter)
        peak = (group / peak_file).read_text().strip() if (group / peak_file).exists() else None
        result.update({"cgroup": f"{kind} {group}", "limit_mb": limit_mb,
                       "cgroup_peak_mb": int(peak) / MB if peak else None})
        if kind == "v1":
            oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
            result["oom_kills"] = int(oom.get("oom_kill", 0))
            result["limit_hits"] = int((group / "memory.failcnt").read_text())
        else:
            events = dict(line.split() for line in (group / "memory.events").read_text().splitlines())
            result["oom_kills"], result["limit_hits"] = int(events.get("oom_kill", 0)), int(events.get("max", 0))
        return result
    finally:
        group.rmdir()


def _sha256_gbs(work: Path) -> float:
    shard = next(work.rglob("shard-00000.safetensors"))
    data = shard.read_bytes()
    hashlib.sha256(data).hexdigest()
    t0 = time.perf_counter()
    for _ in range(3):
        hashlib.sha256(data).hexdigest()
    return 3 * len(data) / (time.perf_counter() - t0) / 1e9


# ---------------------------------------------------------------------------------------------- report


def _growth(rows: dict, key: str, small: str, large: str) -> float | None:
    a, b = rows.get(small, {}).get(key), rows.get(large, {}).get(key)
    return b / a - 1 if a and b else None


def _ratio(row: dict, ref: dict, key: str = "images_per_s") -> float | None:
    return row[key] / ref[key] if row.get(key) and ref.get(key) else None


def _throughput_lines(args, tp: dict) -> list[str]:
    """Section 3's Markdown (none if it did not run)."""
    from experiments import harness as C

    if not tp:
        return []
    alone, step = tp.get("alone", {}), tp.get("step", {})
    ref = "Loader, in memory"
    rows = []
    for name in _ROWS:
        a, b = alone.get(name, {}), step.get(name, {})
        rows.append({"loader": name, "alone": a.get("images_per_s"), "x_alone": _ratio(a, alone.get(ref, {})),
                     "step": b.get("images_per_s"), "x_step": _ratio(b, step.get(ref, {})),
                     "status": alone.get("status", step.get("status", "ok"))})
    return [f"## 3. read throughput, {args.sizes[1]}@128: every row in one process, interleaved turns "
            "(alone: 5 turns of 16 batches; into a train step: 4 turns of 3 steps), medians; x = over the "
            "Loader on the split in memory", "",
            C.md_table(rows, [("loader", "loader"), ("alone", "loader alone, images/s"), ("x_alone", "x"),
                              ("step", "into a train step, images/s"), ("x_step", "x")]), ""]


def _step_lines(step: dict) -> list[str]:
    """Section 7's Markdown (none if it did not run)."""
    from experiments import harness as C

    if not step:
        return []
    rows = [{"loader": k, **v} for k, v in step.get("rows", {}).items()]
    worst = max((v["x_resident"] for k, v in step.get("rows", {}).items() if k.startswith("shards, prefetch")),
                default=None)
    return [f"## 7. does the step wait on the data? {step.get('model', '')} train step "
            f"({'compiled' if step.get('compiled') else 'eager'}, {step.get('precision')}, channels-last "
            f"{step.get('channels_last')}, flip inside), batch {step.get('batch_size')} at {step.get('size')} px "
            f"on {step.get('device')}, {step.get('n')} samples; {step.get('turns')} interleaved turns of "
            f"{step.get('steps_per_turn')} steps per loader, medians", "",
            C.md_table(rows, [("loader", "loader"), ("ms_per_step", "ms / step"),
                              ("x_resident", "x resident")]) if rows else f"failed: {step.get('status')}", "",
            f"Shards with prefetch against the resident split: {C.fmt(worst)}x (target <= 1.02)", ""]


def _tables(args, results: dict) -> list[str]:
    """The Markdown of every section that ran."""
    from experiments import harness as C

    small, large = f"{args.sizes[0]}@128", f"{args.sizes[-1]}@128"
    prep = [{"split": k, **v} for k, v in results["prepare"].items()]
    read = [{"split": k, **v} for k, v in results["read"].items()]
    out = ["## 1. prepare (fresh process each, all cores)", "",
           C.md_table(prep, [("split", "split"), ("n", "images"), ("gb", "GB"), ("shards", "shards"),
                             ("seconds", "s"), ("images_per_s", "images/s"), ("base_rss_mb", "RSS after imports MB"),
                             ("peak_rss_mb", "peak RSS MB"), ("worker_peak_rss_mb", "largest worker peak MB")]), ""]
    if small in results["prepare"] and large in results["prepare"]:
        out += [f"Peak RSS growth {small} -> {large}: "
                f"{C.fmt(_growth(results['prepare'], 'peak_rss_mb', small, large))} (target < 0.10)", ""]
    if read:
        out += ["## 2. one epoch of reads (from the shards, Loader batch 64, prefetch 2; fresh process each)", "",
                C.md_table(read, [("split", "split"), ("storage", "storage"), ("images_per_s", "images/s"),
                                  ("base_rss_mb", "RSS after imports MB"), ("peak_rss_mb", "peak RSS MB"),
                                  ("peak_anon_mb", "peak anon MB"), ("peak_file_mb", "peak file-backed MB")]),
                "", f"Peak RSS growth {small} -> {large}: "
                    f"{C.fmt(_growth(results['read'], 'peak_rss_mb', small, large))} (target < 0.10)", ""]
    out += _throughput_lines(args, results["throughput"])
    if results["pss"]:
        pss = [{"storage": k, "rss": " + ".join(C.fmt(x) for x in v.get("rss_mb", [])),
                "pss": " + ".join(C.fmt(x) for x in v.get("pss_mb", [])), **v} for k, v in results["pss"].items()]
        out += [f"## 4. two processes reading the same {args.sizes[1]}@128 split at once (after both read all of "
                "it)", "",
                C.md_table(pss, [("storage", "storage"), ("rss", "RSS MB (each)"), ("pss", "PSS MB (each)"),
                                 ("sum_pss_mb", "sum of PSS MB"), ("page_cache_mb", "split in the page cache MB")]), ""]
    if results["cgroup"]:
        cg = [{"row": k, **v} for k, v in results["cgroup"].items()]
        out += [f"## 5. a {args.cgroup_n}@128 split larger than the memory the process may use (its pages evicted "
                f"first; one Loader epoch over every sample, then fit for {args.max_steps} steps: SegNet 4,8, "
                "batch 32)", "",
                C.md_table(cg, [("row", "row"), ("limit_mb", "cgroup limit MB"), ("gb", "split GB"),
                                ("storage", "storage"), ("epoch_images", "epoch images"),
                                ("epoch_images_per_s", "epoch images/s"), ("steps", "fit steps"),
                                ("final_loss", "loss"), ("cgroup_peak_mb", "cgroup peak MB"),
                                ("limit_hits", "limit hits"), ("oom_kills", "OOM kills")]), ""]
    if "sha256_gbs" in results:
        out += [f"## 6. integrity: sha256 over shard bytes at {C.fmt(results.get('sha256_gbs'))} GB/s on one core", ""]
    out += _step_lines(results["step"])
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200/400/800 samples (and 100 at 512 px)")
    p.add_argument("--work", type=Path, default=None, help="keep datasets here (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "experiments" / "results")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every child")
    p.add_argument("--cgroup-mb", type=int, default=1024, help="memory limit of section 5's cgroup")
    p.add_argument("--cgroup-n", type=int, default=64000, help="samples (128 px) of section 5's split")
    p.add_argument("--sections", default="prepare,read,throughput,pss,cgroup,sha",
                   help="any of prepare,read,throughput,pss,cgroup,sha,step (step: section 7, on --device)")
    p.add_argument("--device", default="cpu", help="section 7's device (cpu, cuda)")
    p.add_argument("--compile", default=None, choices=("on", "off"),
                   help="section 7: compile the train step (default: on for CUDA, off on the CPU)")
    p.add_argument("--step-widths", default=None,
                   help="section 7: SegNet widths, e.g. 8,16 (default: the full SegNet)")
    p.add_argument("--step-n", type=int, default=None,
                   help="section 7: samples of its split at 128 px (default: the middle size, 8000 or 400 quick)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    for name, kw in (("--root", {}), ("--size", {"type": int}), ("--cache", {}), ("--storage", {"default": "auto"}),
                     ("--batch-size", {"type": int, "default": 64}), ("--prefetch", {"type": int, "default": 2}),
                     ("--loader", {"default": "loader"}), ("--max-steps", {"type": int, "default": 40}),
                     ("--step-batches", {"type": int, "default": 12}), ("--batches", {"type": int, "default": 16}),
                     ("--repeats", {"type": int, "default": 5}), ("--warm-steps", {"type": int, "default": 5})):
        p.add_argument(name, help=argparse.SUPPRESS, **kw)
    for flag in ("--step", "--cold", "--hold"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = [200, 400, 800] if args.quick else [2000, 8000, 32000]
    args.base, args.big, args.big_base = (200, 100, 50) if args.quick else (2000, 2000, 500)
    if args.quick:
        args.cgroup_n, args.cgroup_mb = 800, max(args.cgroup_mb, 1100)
    args.step_n = args.step_n or args.sizes[1]
    args.compile = args.compile or ("on" if args.device.startswith("cuda") else "off")
    return args


def _sections(args, datasets: dict, cache: Path) -> dict:
    results: dict = {"prepare": {}, "read": {}, "throughput": {}, "pss": {}, "cgroup": {}, "step": {}}
    todo = set(args.sections.split(","))
    common = {name: ["--root", str(root), "--size", str(size), "--cache", str(cache)]
              for name, (root, size, _) in datasets.items()}
    for name in datasets:  # always: the later sections read these caches
        print(f"prepare {name}", flush=True)
        results["prepare"][name] = _run("prepare", args, *common[name])
    if "read" in todo:
        for name in results["prepare"]:
            if name in (f"{args.cgroup_n}@128", f"{args.step_n}@128") and int(name.split("@")[0]) not in args.sizes:
                continue
            print(f"read {name}", flush=True)
            results["read"][name] = _run("read", args, *common[name], "--storage", "shards")
    mid = common.get(f"{args.sizes[1]}@128")
    if "throughput" in todo:
        for label, extra in (("alone", ["--batches", "16", "--repeats", "5"]),
                             ("step", ["--step", "--batches", "3", "--repeats", "4"])):
            print(f"throughput, {label}", flush=True)
            results["throughput"][label] = _run("throughput", args, *mid, *extra)
    if "pss" in todo:
        for storage in ("shards", "memory"):
            print(f"two readers, {storage}", flush=True)
            root, size, _ = datasets[f"{args.sizes[1]}@128"]
            results["pss"][storage] = _two_readers(args, root, size, cache, storage)
    if "cgroup" in todo:
        big = common[f"{args.cgroup_n}@128"] + ["--batch-size", "32", "--cold"]
        for row, storage in (("auto (decides: shards)", "auto"), ("control: forced into memory", "memory")):
            print(f"cgroup {row}", flush=True)
            results["cgroup"][row] = _in_cgroup(args, args.cgroup_mb, *big, "--storage", storage)
    if "sha" in todo:
        results["sha256_gbs"] = _sha256_gbs(cache)
    if "step" in todo:
        print(f"step on {args.device}", flush=True)
        results["step"] = _run("step", args, *common[f"{args.step_n}@128"], "--device", args.device,
                               "--compile", args.compile, "--batches", "30", "--repeats", "5",
                               *(["--step-widths", args.step_widths] if args.step_widths else []),
                               *(["--batches", "4", "--repeats", "2", "--warm-steps", "2"] if args.quick else []))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        _child(args)
        return 0
    import torch

    from experiments import harness as C

    device = torch.device(args.device)
    prov = C.provenance(device)
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="fseg-scale-")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # every prepare row decodes
    try:
        datasets = _datasets(args, args.work)
        results = _sections(args, datasets, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if tmp is not None:
            tmp.cleanup()
    notes = [f"children: {args.threads} torch threads each; prepare uses all {os.cpu_count()} cores",
             "datasets: generic synthetic scenes, 5 classes; bigger splits are hard links to the generated ones "
             "under new names (decoded and stored like any sample)",
             "a reader from shards reads each batch's rows with pread through the page cache, shared by every "
             "process: its RSS holds none of the split",
             "a 2-core machine shared with other jobs (load 4-7): times vary by +-20% between runs"]
    md = C.md_header(f"{EXPERIMENT}: the sharded cache as the split grows", prov, notes=notes)
    md += "\n" + "\n".join(_tables(args, results)) + "\n"
    stem = f"{EXPERIMENT}_{C.device_kind(device, args.quick)}"
    C.write_results(args.out, stem, C.payload(EXPERIMENT, prov, args, results), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
