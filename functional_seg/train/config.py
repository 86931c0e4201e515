"""What a training run is: one frozen ``FitConfig``, and the settings of it that change the maths.

``fit(model, train_data, val_data, config, out_dir=...)`` reads everything from here. The
fields split in two:

- the maths (``MATHS``): loss and its cfg, optimizer and schedule, augmentation, seed, batch
  size, epochs' schedule horizon, ensemble and sweep, precision. A resumed run must agree on
  every one of them (and on the model, preprocessing and data, which the run directory records
  beside it), or it would silently continue a different experiment;
  ``accumulate`` (K micro-batches per update), ``ema`` (its decay) and ``sync_bn`` are maths too:
  they change batch-norm statistics, the weights saved or the float order of the sums;
- the running of it: device, compile, channels-last (a layout, not maths), logging, checkpoint
  and evaluation frequency, ``max_steps``, ``bucket`` (how gradients travel between processes).
  These may change between a run and its resume. The world size (``torchrun`` processes) is not
  in the config: a run resumed on another number of processes continues the same maths (the
  global batch and every draw are the same) up to float reduction order, and batch-norm
  statistics unless ``sync_bn``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.files import jsonable
from ..data.augment import AugmentConfig
from .optim import OptimizerConfig

__all__ = ["FitConfig", "SWEEPABLE", "MATHS", "maths_record", "flat_settings", "first_difference"]

SWEEPABLE = ("lr", "loss_weight")
MATHS = ("loss", "loss_cfg", "optimizer", "augment", "seed", "batch_size", "ensemble", "sweep", "precision",
         "accumulate", "ema", "sync_bn")
_DEFAULTS = {"accumulate": 1, "ema": None, "sync_bn": False}
# Schedules that never read total_steps: a resume may then extend the number of epochs.
_HORIZONLESS = ("constant", "step")


@dataclass(frozen=True)
class FitConfig:
    """Every setting of a run. ``total_steps``/``steps_per_epoch`` of the optimizer are filled in
    by ``fit`` from the data; "auto" values are resolved by ``runtime``."""

    epochs: int = 2
    batch_size: int = 16
    loss: str = "ce"
    loss_cfg: Mapping[str, Any] = field(default_factory=dict)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    augment: AugmentConfig | None = None
    seed: int = 0
    ensemble: int = 1
    sweep: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    precision: str = "auto"
    device: str = "cpu"
    compile: bool | str = "auto"
    channels_last: bool | None = None
    log_every: int = 10
    checkpoint_every: int | None = None
    eval_every: int = 1
    max_steps: int | None = None
    accumulate: int = 1
    ema: float | None = None
    sync_bn: bool = False
    bucket: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size", "ensemble", "log_every", "eval_every", "accumulate"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("checkpoint_every", "max_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.batch_size % self.accumulate:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by accumulate {self.accumulate} "
                             "(K equal micro-batches per optimizer step)")
        if self.ema is not None:
            if isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)) or not 0.0 < self.ema < 1.0:
                raise ValueError(f"ema is a decay in (0, 1) (e.g. 0.999) or None, got {self.ema!r}")
            object.__setattr__(self, "ema", float(self.ema))
        sweep = {k: tuple(float(v) for v in vals) for k, vals in dict(self.sweep).items()}
        for name in sweep:
            if name not in SWEEPABLE:
                raise ValueError(f"cannot sweep {name!r}; sweepable: {', '.join(SWEEPABLE)}")
        sizes = {len(v) for v in sweep.values()}
        if len(sizes) > 1:
            raise ValueError(f"every swept hyperparameter needs the same number of values, got {sorted(sizes)}")
        if sizes and min(sizes) < 1:
            raise ValueError("a swept hyperparameter needs at least one value")
        if sweep:
            k = sizes.pop()
            if self.ensemble not in (1, k):
                raise ValueError(f"ensemble {self.ensemble} disagrees with the sweep's {k} values")
            object.__setattr__(self, "ensemble", k)
        if "loss_weight" in sweep and self.loss != "ce_dice":
            raise ValueError(f"loss_weight weighs the dice term of 'ce_dice' (ce + loss_weight * dice); "
                             f"it means nothing for loss {self.loss!r}")
        object.__setattr__(self, "sweep", sweep)
        object.__setattr__(self, "loss_cfg", dict(self.loss_cfg))

    @property
    def members(self) -> int | None:
        """K for an ensemble, None for one model."""
        return self.ensemble if self.ensemble > 1 else None

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self)


def flat_settings(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested JSON values flattened to dotted names: ``{"optimizer.lr": 1e-3, ...}``."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flat_settings(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def maths_record(config: FitConfig, *, model: Mapping, preprocess: Mapping, data: Mapping) -> dict[str, Any]:
    """The settings a resume must match, as flat dotted names -> JSON values."""
    d = config.to_dict()
    # settings added later are recorded only when used, so older runs still resume with the defaults
    maths = {k: d[k] for k in MATHS if k not in _DEFAULTS or d[k] != _DEFAULTS[k]}
    opt = dict(maths["optimizer"])
    if opt.get("schedule") in _HORIZONLESS:
        opt.pop("total_steps", None)
    maths["optimizer"] = opt
    pre = {k: v for k, v in dict(preprocess).items() if k != "channels_last"}
    return flat_settings({**maths, "model": dict(model), "preprocess": pre, "data": dict(data)})


def first_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first dotted setting whose value differs: ``(name, old, new)``, or None."""
    for name in sorted(set(old) | set(new)):
        if old.get(name, "<absent>") != new.get(name, "<absent>"):
            return name, old.get(name, "<absent>"), new.get(name, "<absent>")
    return None
