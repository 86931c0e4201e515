"""``fit``: epochs of a pure train step, validation, logging, exact resume over a run directory, and the
test split scored once at the end with the selected checkpoint.

Everything random comes from one seed::

    init_key, data_key = split(key(seed))
    member params and training keys <- init_key (split K ways for an ensemble)
    epoch e's shuffle key           =  fold_in(data_key, e)
    step s's augmentation/model key =  fold_in(train_key, s)  (inside the step)

so a run resumed from ``last.safetensors`` (saved at an epoch end, or mid-epoch with
``checkpoint_every``) replays the same batches and draws and reaches bit-identical parameters on
CPU. The files and their guarantees belong to ``rundir.RunDir``; the settings to ``FitConfig``;
what the user sees to the hooks (``log.ConsoleLog`` by default).

Scalars leave the device only at log steps and epoch ends: the loss is summed on the device and
the first non-finite loss is remembered there with its step, then reported at the next check,
which stops the run before any checkpoint could take the bad parameters (the run directory also
refuses to write a state holding nan or inf).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..compile_cache import use_user_cache_dir
from ..core import random as jr
from ..core.files import jsonable
from ..core.tree import unstack
from ..data.label_sets import check_present
from ..data.loader import Loader
from ..data.preprocess import Preprocess
from ..data.splits import Splits, fold_ids, split_data
from ..models.saved import model_metadata
from ..runtime import Runtime, resolve_device, resolve_runtime
from .build import Steps, build_steps, preprocess_for
from .config import FitConfig, maths_record
from .distributed import World, agree, broadcast_tree, failure_report, world_from_env
from .evaluation import evaluate, evaluate_checkpoint, evaluate_ensemble
from .full_res import evaluate_full_res
from .log import ConsoleLog, call_hooks
from .rundir import RunDir, RunDirError, TrainingDiverged
from .state import TrainState, ensemble_size, init_ensemble, init_train_state, with_ema
from .warm_start import warm_start, without_pretrained

__all__ = ["fit", "FitResult", "Plan", "plan_run", "as_splits", "TrainingDiverged", "unstack_members"]


@dataclass(frozen=True)
class Plan:
    """A run with every "auto" resolved: what ``fit`` executes, built by :func:`plan_run`."""

    model: Any
    config: FitConfig
    preprocess: Preprocess
    runtime: Runtime
    train_loader: Loader
    val_loader: Loader | None
    steps: Steps
    init_key: torch.Tensor
    data_key: torch.Tensor
    data: dict
    world: World = World()
    frozen_steps: Steps | None = None  # the steps of the encoder-frozen first epochs

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def optimizer(self):
        return self.steps.optimizer

    @property
    def train_step(self):
        return self.steps.train_step

    @property
    def eval_step(self):
        return self.steps.eval_step

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def total_steps(self) -> int:
        n = self.config.epochs * self.steps_per_epoch
        return n if self.config.max_steps is None else min(n, self.config.max_steps)

    @property
    def maths(self) -> dict:
        cfg = dataclasses.replace(self.config, optimizer=self.optimizer.cfg)
        return maths_record(cfg, model=model_metadata(self.model), preprocess=self.preprocess.to_dict(),
                            data=self.data)

    def init_state(self, *, template: bool = False) -> TrainState:
        """The run's first train state; ``template``: only its structure matters (a checkpoint will
        fill it), so no pretrained weights are read and no other run's weights are loaded."""
        c = self.config
        model = without_pretrained(self.model) if template else self.model
        if c.members:
            sweep = {"fold": [float(i) for i in range(c.folds)]} if c.folds else c.sweep
            ts = init_ensemble(model, self.optimizer, self.init_key, c.members, sweep=sweep, device=self.device)
        else:
            ts = init_train_state(model, self.optimizer, self.init_key, device=self.device)
        if c.init_from and not template:
            ts = warm_start(ts, c.init_from)
        return with_ema(ts) if c.ema is not None else ts

    def metadata(self, args) -> dict:
        """What every checkpoint and config.json of the run records besides the model."""
        return {"preprocess": self.preprocess.to_dict(), "config": self.config.to_dict(),
                "optimizer": self.optimizer.cfg.to_dict(), "data": self.data, "maths": self.maths,
                "args": dict(args or {})}


def _runtime(config: FitConfig) -> tuple[World, Runtime]:
    """This process's place in the job and its resolved runtime (device ``cuda:LOCAL_RANK`` under torchrun)."""
    device = resolve_device(config.device)
    world = world_from_env(device, bucket=config.bucket == "flat")
    runtime = resolve_runtime(world.device(device), config.precision, config.compile, config.channels_last)
    if runtime.compile:
        use_user_cache_dir()  # compiled code outlives the process: the next run of these shapes starts warm
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its algorithms once
    return world, runtime


def plan_run(model, splits: Splits, config: FitConfig) -> Plan:
    """Resolve the runtime, build the loaders, the contract and the (compiled) steps.

    Under ``torchrun`` this process joins the job (``distributed.world_from_env``): its train
    loader yields its slice of each global batch, and only rank 0 gets a validation loader (it
    alone evaluates and writes).

    Raises:
        DataError: the training split holds fewer than 2 classes (nothing to learn), before any
            process joins the job.
    """
    check_present(splits.train)
    world, runtime = _runtime(config)
    train_data, b = splits.train, config.batch_size
    pre = preprocess_for(model, train_data, runtime)
    if world.local_batch(b) % config.accumulate:
        raise ValueError(f"the per-process batch {world.local_batch(b)} (--batch-size {b} over {world.size} "
                         f"processes) must be divisible by --accumulate {config.accumulate}")
    if config.members and config.sync_bn and world.distributed and runtime.compile:
        raise ValueError("--sync-bn with an ensemble cannot compile yet (dynamo cannot vmap the differentiable "
                         "all-reduce); pass --compile off")
    extra = fold_ids(train_data.names, config.folds, config.seed) if config.folds else None
    train_loader = Loader(train_data, b, device=runtime.device, shuffle=True, drop_last=True,
                          shard=(world.rank, world.size), extra=extra)
    if len(train_loader) == 0:
        raise ValueError(f"batch size {b} is larger than the {len(train_data)} training images")
    val_loader = (Loader(splits.val, b, device=runtime.device, shuffle=False, drop_last=False)
                  if splits.val is not None and world.is_main else None)
    spe = len(train_loader)
    steps = build_steps(model, pre, config, runtime, world=world, steps_per_epoch=spe)
    frozen = (build_steps(model, pre, config, runtime, world=world, steps_per_epoch=spe, frozen_encoder=True)
              if config.freeze_encoder_epochs else None)
    init_key, data_key = jr.split(jr.key(config.seed))
    data = {"n_train": len(train_data), "steps_per_epoch": spe}
    return Plan(model, config, pre, runtime, train_loader, val_loader, steps, init_key, data_key, data, world, frozen)


def as_splits(data, config: FitConfig) -> Splits:
    """``fit``'s data as ``Splits``: given as they are; a ``PreparedData`` is the training split (its
    validation carved as ``config.data`` says, no test split); a path (or None: the built-in
    synthetic data) is prepared as ``fseg train`` prepares ``--data``."""
    if isinstance(data, Splits):
        return data
    if data is None or isinstance(data, (str, os.PathLike)):
        return split_data(data, config.data, seed=config.seed)
    cfg = config.data
    if cfg.val_split == "carve":
        train, val = data.carve(cfg.val_fraction, config.seed)
        return Splits(train, val, None, f"{len(val)} images carved (fraction {cfg.val_fraction}, seed {config.seed})")
    if cfg.val_split != "none":
        raise ValueError(f"val_split {cfg.val_split!r} names a split: pass Splits(train, val) or a dataset path")
    return Splits(data)


@dataclass
class _EpochSums:
    """The running sums of an epoch, on the device; a mid-epoch checkpoint stores them."""

    loss: torch.Tensor
    pixel_accuracy: torch.Tensor
    n: int = 0
    time: float = 0.0

    @classmethod
    def start(cls, saved: dict | None, shape: tuple, device) -> _EpochSums:
        saved = saved or {}
        zeros = torch.zeros(shape).tolist()
        return cls(torch.as_tensor(saved.get("loss_sum", zeros), dtype=torch.float64, device=device),
                   torch.as_tensor(saved.get("pixacc_sum", zeros), dtype=torch.float64, device=device),
                   int(saved.get("n", 0)), float(saved.get("time", 0.0)))

    def to_dict(self, elapsed: float) -> dict:
        return {"loss_sum": self.loss.tolist(), "pixacc_sum": self.pixel_accuracy.tolist(), "n": self.n,
                "time": self.time + elapsed}


def _value(x: torch.Tensor):
    return x.tolist() if x.dim() else x.item()


def _step_of(train_state: TrainState) -> int:
    return int(train_state.step.reshape(-1)[0])


class _Divergence:
    """The first non-finite loss, remembered on the device and raised at a check (one host sync)."""

    def __init__(self, shape: tuple, device):
        self.step = torch.full(shape, -1, dtype=torch.int64, device=device)
        self.loss = torch.zeros(shape, dtype=torch.float32, device=device)

    def observe(self, loss: torch.Tensor, step_no: int) -> None:
        new = ~torch.isfinite(loss) & (self.step < 0)
        self.step = torch.where(new, step_no, self.step)
        self.loss = torch.where(new, loss.float(), self.loss)

    def check(self, run: RunDir, spe: int) -> None:
        s = int(self.step.max())
        if s < 0:
            return
        where = f" (member {int(torch.nonzero(self.step >= 0)[0, 0])})" if self.step.dim() else ""
        kept = f"the last good checkpoint is {run.last}" if run.last.exists() else "no checkpoint had been written"
        raise TrainingDiverged(f"the loss became non-finite ({_value(self.loss)}) at epoch {(s - 1) // spe + 1}, "
                               f"step {s}{where}; training stopped and {kept}")


def _train_epoch(plan: Plan, ts: TrainState, epoch: int, saved: dict | None, run: RunDir, hooks, save_last):
    """One (possibly resumed or cut short) epoch: ``(train_state, sums)``."""
    c, spe = plan.config, plan.steps_per_epoch
    done = _step_of(ts) - epoch * spe
    shape = (c.members,) if c.members else ()
    sums = _EpochSums.start(saved if done else None, shape, plan.device)
    bad = _Divergence(shape, plan.device)
    batches = itertools.islice(plan.train_loader.epoch(jr.fold_in(plan.data_key, epoch)), done, None)
    train_step = plan.train_step if epoch >= c.freeze_encoder_epochs else plan.frozen_steps.train_step
    call_hooks(hooks, "on_epoch_start", epoch, c.epochs, done, spe)
    t0 = time.perf_counter()
    for i, batch in enumerate(batches, start=done):
        ts, metrics = train_step(ts, batch)
        step_no = epoch * spe + i + 1
        sums.loss, sums.n = sums.loss + metrics["loss"].double(), sums.n + 1
        sums.pixel_accuracy = sums.pixel_accuracy + metrics["pixel_accuracy"].double()
        bad.observe(metrics["loss"], step_no)
        last = i + 1 == spe or step_no >= plan.total_steps
        if step_no % c.log_every == 0 or last:
            bad.check(run, spe)
            elapsed = sums.time + time.perf_counter() - t0
            call_hooks(hooks, "on_log", i + 1, (sums.loss / sums.n).mean().item(), sums.n * c.batch_size / elapsed)
        if c.checkpoint_every and step_no % c.checkpoint_every == 0 and not last:
            bad.check(run, spe)
            save_last(ts, {"epoch_acc": sums.to_dict(time.perf_counter() - t0)})
        if last:
            break
    bad.check(run, spe)
    sums.time += time.perf_counter() - t0
    return ts, sums


def _record(plan: Plan, ts: TrainState, sums: _EpochSums, epoch: int) -> dict:
    spe, step_no = plan.steps_per_epoch, _step_of(ts)
    record = {
        "epoch": epoch + 1 if step_no == (epoch + 1) * spe else round(step_no / spe, 4),
        "step": step_no,
        "train_loss": _value(sums.loss / max(sums.n, 1)),
        "train_pixel_accuracy": _value(sums.pixel_accuracy / max(sums.n, 1)),
        "lr": _value(plan.optimizer.learning_rate(ts.step - 1, ts.hparams["lr"])),
        "images_per_s": sums.n * plan.config.batch_size / max(sums.time, 1e-9),
        "train_time_s": sums.time,
    }
    if plan.config.members:
        record["members"] = plan.config.members
        record["hparams"] = {k: v.tolist() for k, v in ts.hparams.items()}
    return record


def _validate(plan: Plan, params, state) -> Any:
    """The validation summary (a list of member summaries for an ensemble)."""
    args = (plan.model, params, state, plan.val_loader)
    kw = {"eval_step": plan.eval_step, "preprocess": plan.preprocess}
    return evaluate_ensemble(*args, **kw) if plan.config.members else evaluate(*args, **kw)


def selection(record: dict, members: int | None) -> dict | None:
    """Which weights an epoch's validation prefers, the policy ``load_checkpoint(weights="auto",
    member="auto")`` reads back: per member the raw or EMA weights, whichever scored the higher mean
    IoU; the best member; and the run's score (the members' mean of their chosen scores), which
    selects ``best.safetensors``. None without validation."""
    val = record.get("val")
    if not val:
        return None
    ema = record.get("val_ema")
    vals, emas = (val, ema or [None] * len(val)) if members else ([val], [ema])
    weights, scores = [], []
    for v, e in zip(vals, emas):
        raw, smooth = v["mean_iou"], (e or {}).get("mean_iou")
        use_ema = smooth is not None and smooth == smooth and not smooth <= raw
        weights.append("ema" if use_ema else "params")
        scores.append(smooth if use_ema else raw)
    finite = [x if x == x else -1.0 for x in scores]
    return {"weights": weights, "member": max(range(len(finite)), key=finite.__getitem__),
            "scores": scores, "score": sum(scores) / len(scores)}


def _evaluate_epoch(plan: Plan, ts: TrainState, record: dict, epoch: int) -> dict | None:
    """Validate the raw params (``val``) and, with ``--ema``, the EMA weights (``val_ema``) into
    ``record``; returns the epoch's :func:`selection`."""
    c = plan.config
    if plan.val_loader is None or (isinstance(record["epoch"], int) and (epoch + 1) % c.eval_every
                                   and epoch + 1 != c.epochs):
        return None
    t1 = time.perf_counter()
    record["val"] = _validate(plan, ts.params, ts.state)
    if ts.ema:
        record["val_ema"] = _validate(plan, ts.ema["params"], ts.ema["state"])
    record["eval_time_s"] = time.perf_counter() - t1
    return selection(record, c.members)


def _open_run(plan: Plan, run: RunDir, model, record: dict, resume: bool) -> tuple[TrainState, dict]:
    """The starting train state (fresh or restored) and the checkpoint's extras, the same on every
    rank: rank 0 checks the directory, every rank reads the checkpoint, rank 0's state is broadcast."""
    restoring = agree(plan.world, lambda: run.start(record, plan.maths, resume=resume), errors=(RunDirError,))
    ts = plan.init_state(template=restoring)
    extra: dict = {}
    if restoring:
        ts, extra = run.restore(ts, model, record, plan.maths)
    return broadcast_tree(plan.world, ts), extra


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` returns. ``history`` holds the metrics.jsonl records, ``final`` the last one;
    ``test`` the test split's evaluation of the selected checkpoint (None without a test split,
    and on every rank but 0 under torchrun, where only rank 0 evaluates and writes)."""

    out_dir: Path
    step: int
    epoch: float
    history: list[dict]
    best_mean_iou: float | None
    best_epoch: int | float | None
    checkpoint: Path
    best_checkpoint: Path | None
    train_state: TrainState
    preprocess: Preprocess
    members: int | None
    val_note: str
    test: dict | None
    is_main: bool = True

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    @property
    def selected_checkpoint(self) -> Path:
        """best.safetensors when validation selected one, else last.safetensors."""
        return self.best_checkpoint or self.checkpoint


def _default_out(model) -> Path:
    return Path("runs") / f"{model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _best_step(extra: dict, steps_per_epoch: int) -> int | None:
    """The step best.safetensors holds, as the last checkpoint records it (runs before ``best_step``
    was recorded: from a whole ``best_epoch``)."""
    if extra.get("best_step") is not None:
        return int(extra["best_step"])
    epoch = extra.get("best_epoch")
    return epoch * steps_per_epoch if isinstance(epoch, int) else None


def _train(plan: Plan, run: RunDir, model, meta: dict, resume: bool, hooks) -> tuple[TrainState, list, dict]:
    """The epochs: ``(train_state, history, best)`` with ``best`` = best_mean_iou / best_epoch."""
    config = plan.config
    ts, extra = _open_run(plan, run, model, {"model": model_metadata(model), **meta}, resume)
    history = run.history(_step_of(ts)) if resume else []
    best = {"best_mean_iou": extra.get("best_mean_iou"), "best_epoch": extra.get("best_epoch"),
            "best_step": _best_step(extra, plan.steps_per_epoch)}
    last_selection = extra.get("selection")

    def save(which, state, more=None, sel=None):
        metadata = {**meta, "selection": sel} if sel else meta
        run.save(which, state, model=model, metadata=metadata, extra={**best, **(more or {}), "selection": sel})

    if resume and best["best_step"] == _step_of(ts):  # killed between last and best: best is last's state
        save("best", ts, None, last_selection)
    for epoch in range(_step_of(ts) // plan.steps_per_epoch, config.epochs):
        if _step_of(ts) >= plan.total_steps:
            break
        ts, sums = _train_epoch(plan, ts, epoch, extra.pop("epoch_acc", None), run, hooks,
                                lambda state, more, sel=last_selection: save("last", state, more, sel))
        record = _record(plan, ts, sums, epoch)
        whole = isinstance(record["epoch"], int)
        sel = _evaluate_epoch(plan, ts, record, epoch)
        if not whole:
            record["partial"] = True  # stopped by max_steps: a resumed run replaces it
        record["time"] = time.time()
        record = jsonable(record)  # the history holds what metrics.jsonl holds (nan -> null)
        run.append(record)
        history.append(record)
        call_hooks(hooks, "on_epoch_end", record, config.epochs)
        improved = sel is not None and sel["score"] == sel["score"] and (
            best["best_mean_iou"] is None or sel["score"] > best["best_mean_iou"])
        if improved:
            best = {"best_mean_iou": sel["score"], "best_epoch": record["epoch"], "best_step": _step_of(ts)}
        last_selection = sel or last_selection
        # last first: a kill between the two writes leaves a run that resumes (best is re-derived)
        save("last", ts, None if whole else {"epoch_acc": sums.to_dict(0.0)}, last_selection)
        if improved:
            save("best", ts, None, sel)
    return ts, history, best


def fit(model, data, config: FitConfig | None = None, *, out_dir: str | os.PathLike | None = None,
        resume: bool = False, hooks: Sequence | None = None, args: dict | None = None) -> FitResult:
    """Train ``model`` as ``config`` says, keep the run's record in ``out_dir``, and score the test
    split once with the selected checkpoint: what ``fseg train`` does.

    Under ``torchrun`` every process runs this same call (see ``distributed``): rank 0 writes the
    run directory, validates, runs the hooks and scores the test split; the others train their
    slice of each batch.

    Args:
        data: ``Splits`` (train, val, test), a ``PreparedData`` (the training split; validation
            carved as ``config.data`` says), or a dataset path (None: the built-in synthetic data)
            prepared as ``config.data`` says. Validation scores the raw params (``val``) and, with
            ``config.ema``, the EMA weights (``val_ema``); see :func:`selection`.
        config: a ``FitConfig`` (default: ``FitConfig()``, the defaults of ``fseg train``).
        out_dir: the run directory (default ``runs/<model>-<time>``; see ``rundir``); ``resume``
            continues from its last.safetensors.
        hooks: objects with ``on_epoch_start``/``on_log``/``on_epoch_end``/``close`` (default:
            ``[ConsoleLog()]``).
        args: the caller's arguments (e.g. the CLI's), recorded in config.json and checkpoints.
    Raises:
        TrainingDiverged: the loss or the train state became nan/inf (named with the step).
        RunDirError: the directory cannot hold this run (the message says why and what to do).
    """
    config = config or FitConfig()
    splits = as_splits(data, config)
    plan = plan_run(model, splits, config)
    world = plan.world
    hooks = (list(hooks) if hooks is not None else [ConsoleLog()]) if world.is_main else []
    meta = plan.metadata(args)
    with failure_report(world), RunDir(out_dir or _default_out(model), writer=world.is_main) as run:
        try:
            ts, history, best = _train(plan, run, model, meta, resume, hooks)
        finally:
            call_hooks(hooks, "close")
        chosen = run.best if run.best.exists() else run.last
        test = None
        if splits.test is not None and world.is_main and history:
            test = jsonable({"split": splits.test_split, **evaluate_checkpoint(
                chosen, splits.test, runtime=plan.runtime, batch_size=config.batch_size)})
            if config.data.full_res_test and splits.root is not None:
                test["full_res"] = jsonable(_full_res(chosen, splits, config, plan.runtime))
            run.write_test(test)
            run.write_reliability(test["summary"])
    return FitResult(out_dir=run.path, step=_step_of(ts), epoch=_step_of(ts) / plan.steps_per_epoch, history=history,
                     best_mean_iou=best["best_mean_iou"], best_epoch=best["best_epoch"], checkpoint=run.last,
                     best_checkpoint=run.best if run.best.exists() else None, train_state=ts,
                     preprocess=plan.preprocess, members=config.members, val_note=splits.val_note, test=test,
                     is_main=world.is_main)


def _full_res(checkpoint, splits: Splits, config: FitConfig, runtime) -> dict:
    """The test split scored at full resolution (``full_res``): its resolution, images and summary."""
    data = config.data
    full = evaluate_full_res(checkpoint, splits.root, splits.test_split, runtime=runtime, binary_255=data.binary_255,
                             strict=not data.skip_bad, workers=data.workers or 2, limit=data.test_limit)
    return {k: full[k] for k in ("resolution", "images", "summary")}


def unstack_members(train_state: TrainState) -> list[TrainState]:
    """The K single train states of an ensemble state."""
    return unstack(train_state) if ensemble_size(train_state) else [train_state]
