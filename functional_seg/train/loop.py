"""The training loop: epochs, evaluation, logging, checkpoints and exact resume.

``fit`` drives a pure ``train_step`` over a ``Loader``. Everything random comes from one seed:

    init_key, data_key = split(key(seed))
    member params and training keys <- init_key (split K ways for an ensemble)
    epoch e's shuffle key           =  fold_in(data_key, e)
    step s's augmentation/model key =  fold_in(train_key, s)  (inside the step)

so a run resumed from ``last.safetensors`` (saved at an epoch end, or mid-epoch with
``checkpoint_every``) replays the same batches and draws and reaches bit-identical parameters
on CPU. The run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per epoch,
appended and flushed), ``last.safetensors`` and ``best.safetensors`` (best validation mean IoU),
both written atomically.

Scalars leave the device only at log steps (``log_every``) and epoch ends: the loss is summed
on the device and a non-finite loss is remembered on the device with its step, then reported
at the next check, which stops the run before any checkpoint could take the bad parameters.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt
from ..core import random as jr
from ..core.tree import tree_leaves, unstack
from .optim import OptimizerConfig, make_optimizer
from .state import TrainState, ensemble_size, init_ensemble, init_train_state
from .step import ensemble_step, make_eval_step, make_train_step, resolve_precision

__all__ = ["fit", "evaluate", "evaluate_ensemble", "make_loss", "TrainingDiverged", "SWEEPABLE"]

SWEEPABLE = ("lr", "loss_weight")


class TrainingDiverged(RuntimeError):
    """The loss became nan or inf; the run stopped and kept its last good checkpoint."""


# ----------------------------------------------------------------------------------------------
# Loss


def make_loss(name: str, *, ignore_index: int | None = None, weighted: bool = False, **kwargs) -> Callable:
    """The training loss ``fn(logits, target, **hparams) -> 0-d``.

    With ``weighted`` the loss takes a tensor ``loss_weight`` (from ``TrainState.hparams``, so it
    can be swept over an ensemble): only for ``ce_dice``, as ``ce + loss_weight * dice``.
    """
    from ..losses import get_loss

    if not weighted:
        fn = get_loss(name, ignore_index=ignore_index, **kwargs)
        return lambda logits, target: fn(logits, target)
    if name != "ce_dice":
        raise ValueError(f"loss_weight weighs the dice term of 'ce_dice' (ce + loss_weight * dice); "
                         f"it means nothing for loss {name!r}")
    ce = get_loss("ce", ignore_index=ignore_index, **kwargs)
    dice = get_loss("dice", ignore_index=ignore_index)
    return lambda logits, target, loss_weight: ce(logits, target) + loss_weight * dice(logits, target)


# ----------------------------------------------------------------------------------------------
# Evaluation


def _batches_padded(loader):
    """The loader's batches, the short last one padded to the batch size (one static shape)."""
    from ..data import IGNORE_INDEX

    b = loader.batch_size
    for images, masks in loader.epoch(None):
        n = images.shape[0]
        if n < b:
            images = torch.cat([images, images.new_zeros((b - n, *images.shape[1:]))])
            masks = torch.cat([masks, masks.new_full((b - n, *masks.shape[1:]), IGNORE_INDEX)])
        yield images, masks, n


def _summary(cm: torch.Tensor, custom_sum: torch.Tensor, count: int, class_names) -> dict:
    from ..metrics import summarize

    out = summarize(cm, class_names)
    out["series_custom_iou"] = float(custom_sum) / max(count, 1)
    out["confusion"] = cm.tolist()
    return out


def evaluate(model, params, state, loader, *, eval_step: Callable | None = None,
             class_names: Sequence[str] | None = None, ignore_index: int | None = None,
             precision: str = "fp32") -> dict:
    """Stream a split through the model and summarise one summed confusion matrix.

    Args:
        loader: a ``Loader`` with ``shuffle=False`` (the last short batch is padded with
            ignored pixels, so a compiled eval step sees one shape).
        eval_step: from ``make_eval_step(..., with_logits_metrics=True)``; built if None.
    Returns:
        ``metrics.summarize(cm)`` (pixel_accuracy, mean_iou, iou, dice, precision, recall,
        series_iou, ...), plus ``series_custom_iou`` (the series' per-image soft IoU, averaged)
        and ``confusion`` (the matrix as nested lists).
    """
    from ..data import IGNORE_INDEX

    if ignore_index is None:
        ignore_index = IGNORE_INDEX
    step = eval_step or make_eval_step(model, ignore_index=ignore_index, precision=precision,
                                       with_logits_metrics=True)
    c = model.num_classes
    cm = torch.zeros((c, c), dtype=torch.int64)
    custom = torch.zeros((), dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for images, masks, n in _batches_padded(loader):
            out = step(params, state, images, masks)
            cm = cm + out["confusion"].cpu()
            custom = custom + out["custom_iou"][:n].double().sum().cpu()
            count += n
    return _summary(cm, custom, count, class_names)


def evaluate_ensemble(model, params, state, loader, *, eval_step: Callable | None = None,
                      class_names: Sequence[str] | None = None, ignore_index: int | None = None,
                      precision: str = "fp32") -> list[dict]:
    """:func:`evaluate` for stacked (ensemble) params: one summary per member, in member order."""
    from ..data import IGNORE_INDEX

    if ignore_index is None:
        ignore_index = IGNORE_INDEX
    if eval_step is None:
        base = make_eval_step(model, ignore_index=ignore_index, precision=precision, with_logits_metrics=True)
        eval_step = torch.func.vmap(base, in_dims=(0, 0, None, None))
    k = int(_first_leaf(params).shape[0])
    c = model.num_classes
    cm = torch.zeros((k, c, c), dtype=torch.int64)
    custom = torch.zeros((k,), dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for images, masks, n in _batches_padded(loader):
            out = eval_step(params, state, images, masks)
            cm = cm + out["confusion"].cpu()
            custom = custom + out["custom_iou"][:, :n].double().sum(dim=1).cpu()
            count += n
    return [_summary(cm[i], custom[i], count, class_names) for i in range(k)]


def _first_leaf(tree) -> torch.Tensor:
    return tree_leaves(tree)[0]


# ----------------------------------------------------------------------------------------------
# Run directory helpers


def _append_jsonl(path: Path, record: Mapping) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_jsonl(path: Path, max_step: int) -> list[dict]:
    """Keep the whole-epoch records up to ``max_step`` (a resumed run rewrites the rest)."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill mid-write
            continue
        if record.get("step", 0) <= max_step and not record.get("partial"):
            kept.append(record)
    ckpt.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    return kept


def _jsonable(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    return json.loads(json.dumps(x, default=str))


# ----------------------------------------------------------------------------------------------
# fit


def _first_leaf_value(x: torch.Tensor):
    return x.tolist() if x.dim() else x.item()


def _resolve_sweep(sweep: Mapping[str, Sequence[float]] | None, ensemble: int
                   ) -> tuple[dict[str, list[float]], int]:
    """Check a hyperparameter sweep and return it with the ensemble size it implies."""
    sweep = {k: [float(v) for v in vals] for k, vals in dict(sweep or {}).items()}
    for name in sweep:
        if name not in SWEEPABLE:
            raise ValueError(f"cannot sweep {name!r}; sweepable: {', '.join(SWEEPABLE)}")
    sizes = {len(v) for v in sweep.values()}
    if len(sizes) > 1:
        raise ValueError(f"every swept hyperparameter needs the same number of values, got {sorted(sizes)}")
    if sweep:
        k_sweep = sizes.pop()
        if ensemble not in (1, k_sweep):
            raise ValueError(f"ensemble {ensemble} disagrees with the sweep's {k_sweep} values")
        ensemble = k_sweep
    if ensemble < 1:
        raise ValueError(f"ensemble must be >= 1, got {ensemble}")
    return sweep, ensemble


def fit(model, loss_name: str, train_data, val_data, *, epochs: int, batch_size: int,
        optimizer_cfg: OptimizerConfig | None = None, augment_cfg=None, seed: int = 0,
        device: torch.device | str = "cpu", out_dir: str | os.PathLike, resume: bool = False,
        ensemble: int = 1, sweep: Mapping[str, Sequence[float]] | None = None, log_every: int = 10,
        progress: bool = True, checkpoint_every: int | None = None, precision: str = "auto",
        compile: bool | str = "auto", channels_last: bool | None = None, loss_kwargs: Mapping | None = None,
        class_names: Sequence[str] | None = None, args: Mapping | None = None, eval_every: int = 1,
        max_steps: int | None = None) -> dict:
    """Train ``model`` and keep the run's record in ``out_dir``.

    Args:
        model: a ``Model``.
        loss_name: a ``losses.get_loss`` name ("ce", "dice", "ce_dice", ...).
        train_data, val_data: ``PreparedData`` (val_data may be None: no evaluation).
        epochs: passes over the training data (drop_last batches: steps/epoch = N // B).
        optimizer_cfg: an ``OptimizerConfig`` (default Adam, lr 1e-3); its ``total_steps`` and
            ``steps_per_epoch`` are filled in from the data.
        augment_cfg: an ``AugmentConfig`` or None.
        seed: the one seed of the run (init, shuffling, augmentation).
        device: "cpu", "cuda", ...
        out_dir: the run directory.
        resume: continue from ``out_dir/last.safetensors`` if it exists (bit-exact on CPU). Without
            it, a directory that already holds ``last.safetensors`` is refused (ValueError).
        ensemble: K members trained together by one vmapped step (different init keys).
        sweep: ``{"lr": [...]}`` and/or ``{"loss_weight": [...]}``, one value per member
            (implies ``ensemble = len(values)``).
        log_every: steps between host syncs (progress bar and the non-finite loss check).
        checkpoint_every: also write ``last.safetensors`` every this many steps (mid-epoch).
        precision: "auto" (bf16 on CUDA, fp32 on CPU), "bf16" or "fp32".
        compile: "auto" (on for CUDA), True or False.
        channels_last: default True on CUDA. On CUDA fit also sets ``torch.backends.cudnn.benchmark``
            (the batch shapes are fixed, so cuDNN times its conv algorithms once and keeps the fastest).
        loss_kwargs: extra static keywords for the loss (e.g. ``label_smoothing``).
        args: the caller's arguments, stored in the checkpoints and config.json.
        max_steps: stop after this many steps in total (for tests and benchmarks).
    Returns:
        dict with ``out_dir``, ``step``, ``epoch``, ``history`` (the metrics.jsonl records),
        ``final`` (the last record), ``best_mean_iou``, ``best_epoch``, ``checkpoint``,
        ``best_checkpoint``, and for an ensemble ``members`` (K).
    Raises:
        TrainingDiverged: the loss became nan/inf (the message names epoch and step).
    """
    from ..data import IGNORE_INDEX, Loader

    device = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(precision, device)
    use_compile = device.type == "cuda" if compile == "auto" else bool(compile)
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sweep, ensemble = _resolve_sweep(sweep, ensemble)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")

    train_loader = Loader(train_data, batch_size, device=device, shuffle=True, drop_last=True)
    val_loader = (Loader(val_data, batch_size, device=device, shuffle=False, drop_last=False)
                  if val_data is not None else None)
    spe = len(train_loader)
    optimizer_cfg = optimizer_cfg or OptimizerConfig()
    optimizer_cfg = dataclasses.replace(optimizer_cfg, steps_per_epoch=spe,
                                        total_steps=optimizer_cfg.total_steps or epochs * spe)
    optimizer = make_optimizer(optimizer_cfg)
    weighted = "loss_weight" in sweep
    loss_fn = make_loss(loss_name, ignore_index=IGNORE_INDEX, weighted=weighted, **dict(loss_kwargs or {}))

    init_key, data_key = jr.split(jr.key(seed))
    members = ensemble if ensemble > 1 else None
    if members:
        train_state = init_ensemble(model, optimizer, init_key, members, sweep=sweep, device=device)
    else:
        train_state = init_train_state(model, optimizer, init_key, device=device)

    run_args = {
        **_jsonable(dict(args or {})),
        "model": model.name, "loss": loss_name, "epochs": epochs, "batch_size": batch_size, "seed": seed,
        "size": int(train_data.size), "ensemble": ensemble, "sweep": sweep, "precision": precision,
        "compile": use_compile, "augment": _jsonable(augment_cfg), "loss_kwargs": _jsonable(dict(loss_kwargs or {})),
        "steps_per_epoch": spe, "n_train": len(train_data), "n_val": len(val_data) if val_data is not None else 0,
    }
    last_path, best_path, metrics_path = out / "last.safetensors", out / "best.safetensors", out / "metrics.jsonl"

    extra: dict[str, Any] = {}
    history: list[dict] = []
    if resume and last_path.exists():
        train_state, meta = ckpt.load(last_path, model=model, template=train_state)
        old = meta.get("args") or {}
        for field in ("seed", "batch_size", "steps_per_epoch", "ensemble", "size", "sweep", "loss"):
            if field in old and old[field] != run_args[field]:
                raise ValueError(f"cannot resume {last_path}: it was trained with {field}={old[field]!r}, "
                                 f"this run has {field}={run_args[field]!r}")
        extra = dict(meta.get("extra") or {})
        history = _truncate_jsonl(metrics_path, _step_of(train_state))
    else:
        if last_path.exists():
            raise ValueError(f"{out} already holds a run ({last_path.name}); resume it (--resume) or choose "
                             "another output directory")
        metrics_path.unlink(missing_ok=True)  # left by a run killed before its first checkpoint
        best_path.unlink(missing_ok=True)
    ckpt.write_atomic(out / "config.json", (json.dumps({
        "model": model.name, "cfg": _jsonable(model.cfg), "optimizer": _jsonable(optimizer_cfg),
        "args": run_args}, indent=2) + "\n").encode())

    base_step = make_train_step(model, loss_fn, optimizer, augment_cfg=augment_cfg, ignore_index=IGNORE_INDEX,
                                precision=precision, channels_last=channels_last, compile=use_compile and not members)
    step_fn = ensemble_step(base_step, compile=use_compile) if members else base_step
    base_eval = make_eval_step(model, ignore_index=IGNORE_INDEX, precision=precision, channels_last=channels_last,
                               compile=False, with_logits_metrics=True)
    if members:
        eval_fn = torch.func.vmap(base_eval, in_dims=(0, 0, None, None))
    else:
        eval_fn = base_eval
    if use_compile:
        from .step import compile_step

        eval_fn = compile_step(eval_fn)

    best = extra.get("best_mean_iou")
    best_epoch = extra.get("best_epoch")
    start = _step_of(train_state)
    start_epoch, skip = divmod(start, spe)
    total_steps = epochs * spe if max_steps is None else min(epochs * spe, max_steps)

    def save(path: Path, ts: TrainState, bookkeeping: dict) -> None:
        ckpt.save(path, ts, model=model, optimizer_cfg=optimizer_cfg, args=run_args, extra=bookkeeping)

    def epoch_acc(seconds: float) -> dict:
        """The running sums of the epoch so far: a mid-epoch checkpoint resumes the epoch's means."""
        return {"loss_sum": loss_sum.tolist(), "pixacc_sum": pixacc_sum.tolist(), "n": n_steps, "time": seconds}

    def diverged(bad_step: torch.Tensor, bad_loss: torch.Tensor) -> None:
        s = int(bad_step.max())
        if s < 0:
            return
        epoch_no = (s - 1) // spe + 1
        value = _first_leaf_value(bad_loss)
        where = ""
        if members:
            where = f" (member {int(torch.nonzero(bad_step >= 0)[0, 0])})"
        kept = (f"the last good checkpoint is {last_path}" if last_path.exists()
                else "no checkpoint had been written yet")
        raise TrainingDiverged(f"the loss became non-finite ({value}) at epoch {epoch_no}, step {s}{where}; "
                               f"training stopped and {kept}")

    record: dict = history[-1] if history else {}
    step_no = start
    pbar = None
    try:
        for epoch in range(start_epoch, epochs):
            if step_no >= total_steps:
                break
            batches = train_loader.epoch(jr.fold_in(data_key, epoch))
            done = skip if epoch == start_epoch else 0
            if done:
                batches = itertools.islice(batches, done, None)
                acc = extra.get("epoch_acc") or {}
            else:
                acc = {}
            shape = (members,) if members else ()
            loss_sum = torch.as_tensor(acc.get("loss_sum", torch.zeros(shape).tolist()), dtype=torch.float64,
                                       device=device)
            pixacc_sum = torch.as_tensor(acc.get("pixacc_sum", torch.zeros(shape).tolist()), dtype=torch.float64,
                                         device=device)
            n_steps = int(acc.get("n", 0))
            train_time = float(acc.get("time", 0.0))
            bad_step = torch.full(shape, -1, dtype=torch.int64, device=device)
            bad_loss = torch.zeros(shape, dtype=torch.float32, device=device)
            if progress:
                from tqdm.auto import tqdm

                pbar = tqdm(total=spe, initial=done, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                            dynamic_ncols=True)
            t0 = time.perf_counter()
            for i, batch in enumerate(batches, start=done):
                train_state, metrics = step_fn(train_state, batch)
                step_no = epoch * spe + i + 1
                loss = metrics["loss"]
                loss_sum = loss_sum + loss.double()
                pixacc_sum = pixacc_sum + metrics["pixel_accuracy"].double()
                n_steps += 1
                newly_bad = ~torch.isfinite(loss) & (bad_step < 0)
                bad_step = torch.where(newly_bad, step_no, bad_step)
                bad_loss = torch.where(newly_bad, loss.float(), bad_loss)
                last_in_epoch = i + 1 == spe or step_no >= total_steps
                if step_no % log_every == 0 or last_in_epoch:
                    diverged(bad_step, bad_loss)  # one host sync
                    if pbar is not None:
                        elapsed = train_time + time.perf_counter() - t0
                        mean_loss = (loss_sum / max(n_steps, 1)).mean().item()
                        pbar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{n_steps * batch_size / elapsed:.1f}")
                if pbar is not None:
                    pbar.update(1)
                if checkpoint_every and step_no % checkpoint_every == 0 and not last_in_epoch:
                    diverged(bad_step, bad_loss)
                    save(last_path, train_state, {
                        "best_mean_iou": best, "best_epoch": best_epoch,
                        "epoch_acc": epoch_acc(train_time + time.perf_counter() - t0)})
                if last_in_epoch:
                    break
            diverged(bad_step, bad_loss)
            train_time += time.perf_counter() - t0
            if pbar is not None:
                pbar.close()
                pbar = None
            epoch_done = step_no == (epoch + 1) * spe

            record = {
                "epoch": epoch + 1 if epoch_done else round(step_no / spe, 4),
                "step": step_no,
                "train_loss": _first_leaf_value(loss_sum / max(n_steps, 1)),
                "train_pixel_accuracy": _first_leaf_value(pixacc_sum / max(n_steps, 1)),
                "lr": _first_leaf_value(optimizer.learning_rate(train_state.step - 1, train_state.hparams["lr"])),
                "images_per_s": n_steps * batch_size / max(train_time, 1e-9),
                "train_time_s": train_time,
            }
            if members:
                record["members"] = members
                record["hparams"] = {k: v.tolist() for k, v in train_state.hparams.items()}
            score = None
            if val_loader is not None and (epoch_done and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs)
                                           or step_no >= total_steps):
                t1 = time.perf_counter()
                if members:
                    summaries = evaluate_ensemble(model, train_state.params, train_state.state, val_loader,
                                                  eval_step=eval_fn, class_names=class_names)
                    record["val"] = summaries
                    score = sum(s["mean_iou"] for s in summaries) / len(summaries)
                else:
                    record["val"] = evaluate(model, train_state.params, train_state.state, val_loader,
                                             eval_step=eval_fn, class_names=class_names)
                    score = record["val"]["mean_iou"]
                record["eval_time_s"] = time.perf_counter() - t1
            if not epoch_done:
                record["partial"] = True  # stopped by max_steps: a resumed run replaces it
            record["time"] = time.time()
            _append_jsonl(metrics_path, record)
            if progress:
                _print_epoch(record, epochs)
            history.append(record)
            if score is not None and score == score and (best is None or score > best):
                best, best_epoch = score, record["epoch"]
                save(best_path, train_state, {"best_mean_iou": best, "best_epoch": best_epoch})
            bookkeeping = {"best_mean_iou": best, "best_epoch": best_epoch}
            if not epoch_done:
                bookkeeping["epoch_acc"] = epoch_acc(train_time)
            save(last_path, train_state, bookkeeping)
    finally:
        if pbar is not None:
            pbar.close()

    result = {
        "out_dir": str(out),
        "step": _step_of(train_state),
        "epoch": _step_of(train_state) / spe,
        "history": history,
        "final": record,
        "best_mean_iou": best,
        "best_epoch": best_epoch,
        "checkpoint": str(last_path),
        "best_checkpoint": str(best_path) if best_path.exists() else None,
        "train_state": train_state,
    }
    if members:
        result["members"] = members
    return result


def _print_epoch(record: dict, epochs: int) -> None:
    """One line per epoch on stderr (the progress bar itself does not stay)."""
    import sys

    def fmt(x, spec=".4f"):
        return "[" + ", ".join(format(v, spec) for v in x) + "]" if isinstance(x, list) else format(x, spec)

    parts = [f"epoch {record['epoch']}/{epochs}", f"step {record['step']}", f"loss {fmt(record['train_loss'])}"]
    val = record.get("val")
    if val:
        vals = val if isinstance(val, list) else [val]
        miou = [v["mean_iou"] for v in vals]
        acc = [v["pixel_accuracy"] for v in vals]
        parts += [f"val mIoU {fmt(miou if len(vals) > 1 else miou[0])}",
                  f"pixel acc {fmt(acc if len(vals) > 1 else acc[0])}"]
    parts.append(f"{record['images_per_s']:.1f} img/s")
    print("  ".join(parts), file=sys.stderr, flush=True)


def _step_of(train_state: TrainState) -> int:
    k = ensemble_size(train_state)
    return int(train_state.step) if k is None else int(train_state.step[0])


def unstack_members(train_state: TrainState) -> list[TrainState]:
    """The K single train states of an ensemble state."""
    return unstack(train_state)
