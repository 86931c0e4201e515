"""``fit``: epochs of a pure train step, evaluation, logging and exact resume over a run directory.

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
from typing import Any

import torch

from ..compile_cache import use_user_cache_dir
from ..core import random as jr
from ..core.tree import unstack
from ..data.loader import Loader
from ..data.preprocess import Preprocess
from ..losses import get_loss
from ..models.saved import model_metadata
from ..runtime import resolve_channels_last, resolve_compile, resolve_precision, reuse_freed_cpu_memory
from .config import FitConfig, maths_record
from .distributed import World, agree, broadcast_tree, failure_report, world_from_env
from .evaluate import evaluate, evaluate_ensemble
from .log import ConsoleLog, call_hooks
from .optim import make_optimizer
from .rundir import RunDir, RunDirError, TrainingDiverged
from .state import TrainState, ensemble_size, init_ensemble, init_train_state, with_ema
from .step import compile_step, make_eval_step, make_train_step

__all__ = ["fit", "Plan", "plan_run", "TrainingDiverged", "unstack_members"]


@dataclass(frozen=True)
class Plan:
    """A run with every "auto" resolved: what ``fit`` executes, built by :func:`plan_run`."""

    model: Any
    config: FitConfig
    preprocess: Preprocess
    device: torch.device
    train_loader: Loader
    val_loader: Loader | None
    optimizer: Any
    train_step: Any
    eval_step: Any
    init_key: torch.Tensor
    data_key: torch.Tensor
    data: dict
    world: World = World()

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

    def init_state(self) -> TrainState:
        c = self.config
        if c.members:
            ts = init_ensemble(self.model, self.optimizer, self.init_key, c.members, sweep=c.sweep, device=self.device)
        else:
            ts = init_train_state(self.model, self.optimizer, self.init_key, device=self.device)
        return with_ema(ts) if c.ema is not None else ts

    def metadata(self, args) -> dict:
        """What every checkpoint and config.json of the run records besides the model."""
        return {"preprocess": self.preprocess.to_dict(), "config": self.config.to_dict(),
                "optimizer": self.optimizer.cfg.to_dict(), "data": self.data, "maths": self.maths,
                "args": dict(args or {})}


def plan_run(model, train_data, val_data, config: FitConfig) -> Plan:
    """Resolve devices, precision and layout, build the loaders, optimizer and (compiled) steps.

    Under ``torchrun`` this process joins the job (``distributed.world_from_env``): its device is
    ``cuda:LOCAL_RANK`` on CUDA, its train loader yields its slice of each global batch, and only
    rank 0 gets a validation loader (it alone evaluates and writes).
    """
    world = world_from_env(config.device, bucket=config.bucket)
    device = world.device(config.device)
    precision = resolve_precision(config.precision, device)
    use_compile = resolve_compile(config.compile, device)
    if use_compile:
        use_user_cache_dir()  # compiled code outlives the process: the next run of these shapes starts warm
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its algorithms once
    else:
        reuse_freed_cpu_memory()  # an eager CPU step would page-fault its activations in again every step
    pre = Preprocess(size=int(train_data.size), policy=getattr(train_data, "policy", "resize"),
                     channels_last=resolve_channels_last(config.channels_last, device), precision=precision,
                     class_names=tuple(train_data.class_names))
    if model.num_classes != pre.num_classes:
        raise ValueError(f"the model predicts {model.num_classes} classes but the data has {pre.num_classes} "
                         f"({', '.join(pre.class_names)}); pass num_classes={pre.num_classes} in the model cfg")
    b = config.batch_size
    if world.local_batch(b) % config.accumulate:
        raise ValueError(f"the per-process batch {world.local_batch(b)} (--batch-size {b} over {world.size} "
                         f"processes) must be divisible by --accumulate {config.accumulate}")
    members = config.members
    if members and config.sync_bn and world.distributed and use_compile:
        raise ValueError("--sync-bn with an ensemble cannot compile yet (dynamo cannot vmap the differentiable "
                         "all-reduce); pass --compile off")
    train_loader = Loader(train_data, b, device=device, shuffle=True, drop_last=True, shard=(world.rank, world.size))
    if len(train_loader) == 0:
        raise ValueError(f"batch size {b} is larger than the {len(train_data)} training images")
    val_loader = (Loader(val_data, b, device=device, shuffle=False, drop_last=False)
                  if val_data is not None and world.is_main else None)
    spe = len(train_loader)
    opt_cfg = dataclasses.replace(config.optimizer, steps_per_epoch=spe,
                                  total_steps=config.optimizer.total_steps or config.epochs * spe)
    optimizer = make_optimizer(opt_cfg)
    loss_fn = get_loss(config.loss, ignore_index=pre.ignore_index, **config.loss_cfg)
    step = make_train_step(model, loss_fn, optimizer, preprocess=pre, augment_cfg=config.augment,
                           compile=use_compile, accumulate=config.accumulate, ema=config.ema, world=world,
                           ensemble=bool(members), sync_bn=config.sync_bn)
    eval_step = make_eval_step(model, preprocess=pre)
    if members:
        eval_step = torch.func.vmap(eval_step, in_dims=(0, 0, None, None))
    if use_compile:
        eval_step = compile_step(eval_step)
    init_key, data_key = jr.split(jr.key(config.seed))
    data = {"n_train": len(train_data), "steps_per_epoch": spe}
    return Plan(model, config, pre, device, train_loader, val_loader, optimizer, step, eval_step, init_key,
                data_key, data, world)


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
    call_hooks(hooks, "on_epoch_start", epoch, c.epochs, done, spe)
    t0 = time.perf_counter()
    for i, batch in enumerate(batches, start=done):
        ts, metrics = plan.train_step(ts, batch)
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


def _validate(plan: Plan, params, state) -> tuple[Any, float]:
    """``(summary or member summaries, score)``; the score of an ensemble is its members' mean."""
    args = (plan.model, params, state, plan.val_loader)
    kw = {"eval_step": plan.eval_step, "preprocess": plan.preprocess}
    if plan.config.members:
        summaries = evaluate_ensemble(*args, **kw)
        return summaries, sum(s["mean_iou"] for s in summaries) / len(summaries)
    summary = evaluate(*args, **kw)
    return summary, summary["mean_iou"]


def _evaluate_epoch(plan: Plan, ts: TrainState, record: dict, epoch: int) -> float | None:
    """Validate the raw params (``val``) and, with ``--ema``, the EMA weights (``val_ema``) into
    ``record``; the score (that selects best.safetensors) is the raw params' mean IoU."""
    c = plan.config
    if plan.val_loader is None or (isinstance(record["epoch"], int) and (epoch + 1) % c.eval_every
                                   and epoch + 1 != c.epochs):
        return None
    t1 = time.perf_counter()
    record["val"], score = _validate(plan, ts.params, ts.state)
    if ts.ema:
        record["val_ema"], _ = _validate(plan, ts.ema["params"], ts.ema["state"])
    record["eval_time_s"] = time.perf_counter() - t1
    return score


def _open_run(plan: Plan, run: RunDir, model, record: dict, resume: bool) -> tuple[TrainState, dict]:
    """The starting train state (fresh or restored) and the checkpoint's extras, the same on every
    rank: rank 0 checks the directory, every rank reads the checkpoint, rank 0's state is broadcast."""
    ts = plan.init_state()
    extra: dict = {}
    if agree(plan.world, lambda: run.start(record, plan.maths, resume=resume), errors=(RunDirError,)):
        ts, extra = run.restore(ts, model, record, plan.maths)
    return broadcast_tree(plan.world, ts), extra


def fit(model, train_data, val_data, config: FitConfig, *, out_dir: str | os.PathLike, resume: bool = False,
        hooks: Sequence | None = None, args: dict | None = None) -> dict:
    """Train ``model`` on ``train_data`` as ``config`` says, keeping the run's record in ``out_dir``.

    Under ``torchrun`` every process runs this same call (see ``distributed``): rank 0 writes the
    run directory, validates and runs the hooks; the others train their slice of each batch.

    Args:
        train_data, val_data: ``PreparedData`` (val_data may be None: no evaluation; ``best``
            is then never written). Validation scores the raw params (``val``, which selects
            best.safetensors) and, with ``config.ema``, the EMA weights too (``val_ema``).
        config: a ``FitConfig``.
        out_dir: the run directory (see ``rundir``); ``resume`` continues from its last.safetensors.
        hooks: objects with ``on_epoch_start``/``on_log``/``on_epoch_end``/``close`` (default:
            ``[ConsoleLog()]``).
        args: the caller's arguments (e.g. the CLI's), recorded in config.json and checkpoints.
    Returns:
        dict with ``out_dir``, ``step``, ``epoch``, ``history`` (the metrics.jsonl records),
        ``final`` (the last record), ``best_mean_iou``, ``best_epoch``, ``checkpoint``,
        ``best_checkpoint``, ``train_state``, ``preprocess`` and for an ensemble ``members``.
    Raises:
        TrainingDiverged: the loss or the train state became nan/inf (named with the step).
        RunDirError: the directory cannot hold this run (the message says why and what to do).
    """
    plan = plan_run(model, train_data, val_data, config)
    world = plan.world
    hooks = (list(hooks) if hooks is not None else [ConsoleLog()]) if world.is_main else []
    meta = plan.metadata(args)
    with failure_report(world), RunDir(out_dir, writer=world.is_main) as run:
        record = {"model": model_metadata(model), **meta}
        ts, extra = _open_run(plan, run, model, record, resume)
        history = run.history(_step_of(ts)) if resume else []
        best = {"best_mean_iou": extra.get("best_mean_iou"), "best_epoch": extra.get("best_epoch")}
        save = lambda which, state, more=None: run.save(which, state, model=model, metadata=meta,  # noqa: E731
                                                         extra={**best, **(more or {})})
        try:
            for epoch in range(_step_of(ts) // plan.steps_per_epoch, config.epochs):
                if _step_of(ts) >= plan.total_steps:
                    break
                ts, sums = _train_epoch(plan, ts, epoch, extra.pop("epoch_acc", None), run, hooks,
                                        lambda state, more: save("last", state, more))
                record = _record(plan, ts, sums, epoch)
                whole = isinstance(record["epoch"], int)
                score = _evaluate_epoch(plan, ts, record, epoch)
                if not whole:
                    record["partial"] = True  # stopped by max_steps: a resumed run replaces it
                record["time"] = time.time()
                run.append(record)
                history.append(record)
                call_hooks(hooks, "on_epoch_end", record, config.epochs)
                if score is not None and score == score and (best["best_mean_iou"] is None
                                                             or score > best["best_mean_iou"]):
                    best = {"best_mean_iou": score, "best_epoch": record["epoch"]}
                    save("best", ts)
                save("last", ts, None if whole else {"epoch_acc": sums.to_dict(0.0)})
        finally:
            call_hooks(hooks, "close")
    return {"out_dir": str(run.path), "step": _step_of(ts), "epoch": _step_of(ts) / plan.steps_per_epoch,
            "history": history, "final": history[-1] if history else {}, **best,
            "checkpoint": str(run.last), "best_checkpoint": str(run.best) if run.best.exists() else None,
            "train_state": ts, "preprocess": plan.preprocess, **({"members": config.members} if config.members else {})}


def unstack_members(train_state: TrainState) -> list[TrainState]:
    """The K single train states of an ensemble state."""
    return unstack(train_state) if ensemble_size(train_state) else [train_state]
