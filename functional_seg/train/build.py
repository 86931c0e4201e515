"""What a ``FitConfig`` means as functions: the preprocessing contract, the optimizer, the loss and the
(compiled) train and eval steps, for a model on a resolved ``runtime.Runtime``.

    pre = preprocess_for(model, train_data, runtime)
    steps = build_steps(model, pre, config, runtime, steps_per_epoch=len(loader))
    train_state, metrics = steps.train_step(train_state, batch)

``fit`` builds its run with these, and so do the benchmarks: a benchmark's "library" row is the
step ``fseg train`` runs, not a copy assembled by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..data.augmentation import IMAGENET_MEAN, IMAGENET_STD
from ..data.preprocess import Preprocess
from ..losses import get_loss
from ..runtime import Runtime
from .config import FitConfig
from .distributed import SINGLE, World
from .optim import Optimizer, make_optimizer
from .step import compile_step, make_eval_step, make_train_step

__all__ = ["Steps", "preprocess_for", "build_steps", "check_input_size"]


@dataclass(frozen=True)
class Steps:
    """A run's functions: ``train_step(train_state, batch) -> (train_state, metrics)`` and
    ``eval_step(params, state, images, masks) -> counts`` (vmapped over members for an ensemble)."""

    optimizer: Optimizer
    loss_fn: Callable
    train_step: Callable
    eval_step: Callable


def check_input_size(model, size: int | tuple[int, int]) -> None:
    """Raise ValueError when the input size is not a multiple of the model's stride."""
    sides = size if isinstance(size, tuple) else (size, size)
    if any(s % model.stride for s in sides):
        shown = "x".join(map(str, sides)) if isinstance(size, tuple) else str(size)
        raise ValueError(f"--size {shown} must be divisible by the model's stride {model.stride} ({model.name})")


def preprocess_for(model, data, runtime: Runtime) -> Preprocess:
    """The contract a run records: the data's size, policy and class names, the normalisation the
    model asks for (a pretrained encoder's mean/std, else ImageNet's), the runtime's precision and
    layout.

    Raises:
        ValueError: the model predicts another number of classes than the data has.
    """
    names = tuple(data.class_names)
    check_input_size(model, data.size)
    if model.num_classes != len(names):
        raise ValueError(f"the model predicts {model.num_classes} classes but the data has {len(names)} "
                         f"({', '.join(names)}); pass num_classes={len(names)} in the model cfg")
    return Preprocess(size=data.size, policy=getattr(data, "policy", "resize"),
                      mean=tuple(getattr(model, "input_mean", None) or IMAGENET_MEAN),
                      std=tuple(getattr(model, "input_std", None) or IMAGENET_STD),
                      channels_last=runtime.channels_last, precision=runtime.precision, class_names=names,
                      layout=getattr(data, "layout", None))


def build_steps(model, preprocess: Preprocess, config: FitConfig, runtime: Runtime, *, world: World = SINGLE,
                steps_per_epoch: int | None = None, backend: str = "inductor", frozen_encoder: bool = False) -> Steps:
    """The optimizer, loss and steps ``config`` describes, compiled when ``runtime.compile``.

    Args:
        steps_per_epoch: fills the optimizer's schedule horizon (``epochs x steps_per_epoch``).
        backend: the ``torch.compile`` backend ("aot_eager" in the CPU tests).
        frozen_encoder: the step of the encoder-frozen epochs (``config.freeze_encoder_epochs``).
    """
    opt_cfg = config.optimizer
    if steps_per_epoch is not None:
        opt_cfg = dataclasses.replace(opt_cfg, steps_per_epoch=steps_per_epoch,
                                      total_steps=opt_cfg.total_steps or config.epochs * steps_per_epoch)
    optimizer = make_optimizer(opt_cfg)
    loss_fn = get_loss(config.loss, ignore_index=preprocess.ignore_index, **config.loss_cfg)
    train_step = make_train_step(
        model, loss_fn, optimizer, preprocess=preprocess, augment_cfg=config.augment, compile=runtime.compile,
        backend=backend, accumulate=config.accumulate, ema=config.ema, world=world, ensemble=bool(config.members),
        sync_bn=config.sync_bn, folds=config.folds, encoder_lr=config.encoder_lr, frozen_encoder=frozen_encoder,
        donate=not runtime.compile and not config.members)  # fit keeps only the state a step returns
    eval_step: Any = make_eval_step(model, preprocess=preprocess)
    if config.members:
        eval_step = torch.func.vmap(eval_step, in_dims=(0, 0, None, None))
    if runtime.compile:
        eval_step = compile_step(eval_step, backend=backend)
    return Steps(optimizer, loss_fn, train_step, eval_step)
