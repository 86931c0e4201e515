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
  statistics unless ``sync_bn``; training can amplify that rounding (Adam: up to ~2 lr per step
  for a gradient element within rounding of 0), and a model that draws dropout from its key
  changes its draws with the world size (``distributed`` states the bound and the measurements).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.files import jsonable
from ..core.settings import invalid, parse_bool_or_auto, parse_kv, parse_optional_bool, setting
from ..data.splits import DataConfig
from ..options import AUGMENT_PRESETS, LOSSES, OPTIMIZERS, PRECISIONS, SCHEDULES

if TYPE_CHECKING:
    from ..data.augmentation import AugmentConfig

__all__ = ["FitConfig", "OptimizerConfig", "SWEEPABLE", "MATHS", "maths_record", "flat_settings", "first_difference",
           "parse_sweep"]

SWEEPABLE = ("lr", "loss_weight")
MATHS = ("loss", "loss_cfg", "optimizer", "augment", "seed", "batch_size", "ensemble", "sweep", "precision",
         "accumulate", "ema", "sync_bn", "encoder_lr", "freeze_encoder_epochs", "init_from", "folds")
_DEFAULTS = {"accumulate": 1, "ema": None, "sync_bn": False, "encoder_lr": 1.0, "freeze_encoder_epochs": 0,
             "init_from": None, "folds": None}
# Schedules that never read total_steps: a resume may then extend the number of epochs.
_HORIZONLESS = ("constant", "step")


def parse_sweep(text: str | Mapping | None) -> dict[str, tuple[float, ...]]:
    """'lr=1e-3,3e-4' or 'lr=1e-3,3e-4;loss_weight=0.5,1' -> {name: (values, ...)}."""
    if isinstance(text, Mapping):
        return dict(text)
    out = {}
    for part in (text or "").replace(" ", ";").split(";"):
        if not part:
            continue
        key, sep, values = part.partition("=")
        try:
            vals = tuple(float(v) for v in values.split(",") if v)
        except ValueError:
            raise invalid("sweep", f"values must be numbers, got {part!r}") from None
        if not sep or not vals:
            raise invalid("sweep", f"expects name=v1,v2,..., got {part!r}")
        out[key] = vals
    return out


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


@dataclass(frozen=True)
class OptimizerConfig:
    """Static optimizer settings (the learning rate itself lives in ``TrainState.hparams``).

    ``name``: "adam" (L2 weight decay added to the gradient, as ``torch.optim.Adam``), "adamw"
    (decoupled weight decay, as ``torch.optim.AdamW``) or "sgd" (heavy-ball momentum, L2 weight
    decay, as ``torch.optim.SGD``). ``schedule``: "constant"; "cosine" (linear warmup then cosine
    decay to ``min_lr_ratio`` over ``total_steps``); "poly" (``(1 - t) ** power`` down to
    ``min_lr_ratio``); "step" (``gamma ** (epoch // step_size)``, the series' StepLR, which needs
    ``steps_per_epoch``). ``warmup_steps`` ramps any schedule up linearly. ``total_steps`` and
    ``steps_per_epoch`` are filled in by ``fit`` from the data. Each field's flag comes from here
    (``core.settings``).
    """

    name: str = setting("adam", help="torchopt-based optimizer", choices=OPTIMIZERS, flag="--optimizer")
    lr: float = setting(1e-3, help="learning rate")
    weight_decay: float = setting(0.0, help="L2 (adam, sgd) or decoupled (adamw) weight decay")
    momentum: float = setting(0.9, help="sgd momentum, in [0, 1)")
    nesterov: bool = setting(False, help="sgd: Nesterov momentum")
    b1: float = setting(0.9, help="Adam's beta1", cli=False)
    b2: float = setting(0.999, help="Adam's beta2", cli=False)
    eps: float = setting(1e-8, help="Adam's epsilon", cli=False)
    clip_norm: float | None = setting(None, help="clip the global gradient norm to this value")
    schedule: str = setting("constant", help="learning-rate schedule", choices=SCHEDULES)
    warmup_steps: int = setting(0, help="steps of linear warmup before any schedule")
    total_steps: int | None = setting(None, help="the schedule's horizon (fit: epochs x steps per epoch)", cli=False)
    min_lr_ratio: float = setting(0.0, help="cosine/poly floor as a fraction of lr, in [0, 1]")
    power: float = setting(1.0, help="poly schedule exponent")
    step_size: int = setting(7, help="step schedule: epochs between decays")
    gamma: float = setting(0.7, help="step schedule: decay factor, in (0, 1]")
    steps_per_epoch: int | None = setting(None, help="filled in by fit from the data", cli=False)

    def __post_init__(self):
        checks = (
            ("name", self.name in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}"),
            ("schedule", self.schedule in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
            ("lr", _finite(self.lr) and self.lr > 0, "must be a positive number"),
            ("weight_decay", _finite(self.weight_decay) and self.weight_decay >= 0, "must be >= 0"),
            ("momentum", _finite(self.momentum) and 0 <= self.momentum < 1, "must lie in [0, 1)"),
            ("clip_norm", self.clip_norm is None or (_finite(self.clip_norm) and self.clip_norm > 0),
             "must be a positive number or None"),
            ("warmup_steps", isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
             "must be an integer >= 0"),
            ("min_lr_ratio", _finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "must lie in [0, 1]"),
            ("power", _finite(self.power) and self.power > 0, "must be a positive number"),
            ("step_size", isinstance(self.step_size, int) and self.step_size >= 1, "must be a positive integer"),
            ("gamma", _finite(self.gamma) and 0 < self.gamma <= 1, "must lie in (0, 1] (a decay factor)"),
        )
        for field_name, ok, expected in checks:
            if not ok:
                raise invalid(field_name, f"{expected}, got {getattr(self, field_name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> OptimizerConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class FitConfig:
    """Every setting of a run; ``fit(model, data, FitConfig())`` does what ``fseg train`` does, whose
    flags are generated from these fields (``core.settings``). "auto" values are resolved by
    ``runtime``; ``optimizer.total_steps``/``steps_per_epoch`` are filled in by ``fit`` from the data.
    """

    epochs: int = setting(2, help="passes over the training split")
    batch_size: int = setting(16, help="images per optimizer step; under torchrun the GLOBAL batch, split over "
                              "the processes")
    loss: str = setting("ce", help="loss", choices=LOSSES)
    loss_cfg: Mapping[str, Any] = setting(default_factory=dict, help="loss keywords, e.g. label_smoothing=0.1",
                                          parse=str, nargs="*", metavar="KEY=VALUE")
    optimizer: OptimizerConfig = setting(default_factory=OptimizerConfig, help="the optimizer")
    augment: str | AugmentConfig | None = setting("flip_jitter", choices=AUGMENT_PRESETS,
                                                  help="augmentation inside the step (flip_jitter: the series')")
    seed: int = setting(0, help="the one seed: init, shuffling, augmentation, carve")
    ensemble: int = setting(1, help="train K members in one vmapped step")
    sweep: Mapping[str, tuple[float, ...]] = setting(
        default_factory=dict, parse=str, metavar="NAME=V1,V2",
        help="one value per ensemble member: lr=1e-3,3e-4 (or loss_weight=... with --loss ce_dice)")
    folds: int | None = setting(None, help="K-fold: member k never trains on fold k of the training images "
                                "(fseg audit)", cli=False)
    precision: str = setting("auto", choices=("auto", *PRECISIONS), help="auto: bf16 on CUDA, fp32 elsewhere")
    device: str = setting("auto", help="auto, cpu or cuda")
    compile: bool | str = setting("auto", parse=parse_bool_or_auto, metavar="auto|on|off",
                                  help="compile the steps (auto: on CUDA only)")
    channels_last: bool | None = setting(None, parse=parse_optional_bool, metavar="auto|on|off",
                                         help="channels-last layout (auto: on CUDA only)")
    log_every: int = setting(10, help="steps between host syncs / progress updates")
    checkpoint_every: int | None = setting(None, help="also checkpoint every N steps")
    eval_every: int = setting(1, help="epochs between validations (the last epoch is always validated)")
    max_steps: int | None = setting(None, help="stop after N steps in total")
    accumulate: int = setting(1, metavar="K", help="split each batch into K micro-batches (forward/backward each, "
                              "one update): the memory of batch/K images; --batch-size must be divisible by K")
    ema: float | None = setting(None, metavar="DECAY", help="keep an exponential moving average of the weights "
                                "(e.g. 0.999); scored as val_ema each epoch, used where it validated higher")
    sync_bn: bool = setting(False, help="under torchrun: batch norm uses the statistics of the whole global batch "
                            "(world-size invariant); without it each process normalises its slice")
    bucket: str = setting("flat", choices=("flat", "per-leaf"),
                          help="under torchrun: all-reduce gradients as one flat buffer or one collective per tensor")
    encoder_lr: float = setting(1.0, help="learning-rate multiplier of a pretrained encoder's parameters")
    freeze_encoder_epochs: int = setting(0, help="keep the encoder (and its batch-norm statistics) frozen for the "
                                         "first N epochs")
    init_from: str | None = setting(None, metavar="CHECKPOINT", help="start from another run's weights (a head "
                                    "with another number of classes is re-initialised)")
    data: DataConfig = setting(default_factory=DataConfig, help="the data side")

    def __post_init__(self):
        for name in ("epochs", "batch_size", "ensemble", "log_every", "eval_every", "accumulate"):
            if not _positive_int(getattr(self, name)):
                raise invalid(name, f"must be a positive integer, got {getattr(self, name)!r}")
        for name in ("checkpoint_every", "max_steps", "folds"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise invalid(name, f"must be a positive integer or None, got {value!r}")
        if self.batch_size % self.accumulate:
            raise invalid("accumulate", f"batch_size {self.batch_size} must be divisible by accumulate "
                          f"{self.accumulate} (K equal micro-batches per optimizer step)")
        if self.ema is not None:
            if isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)) or not 0.0 < self.ema < 1.0:
                raise invalid("ema", f"is a decay in (0, 1) (e.g. 0.999) or None, got {self.ema!r}")
            object.__setattr__(self, "ema", float(self.ema))
        if not (isinstance(self.encoder_lr, (int, float)) and math.isfinite(self.encoder_lr) and self.encoder_lr >= 0):
            raise invalid("encoder_lr", f"must be a number >= 0 (0 freezes the encoder), got {self.encoder_lr!r}")
        if not isinstance(self.freeze_encoder_epochs, int) or self.freeze_encoder_epochs < 0:
            raise invalid("freeze_encoder_epochs", f"must be an integer >= 0, got {self.freeze_encoder_epochs!r}")
        if self.bucket not in ("flat", "per-leaf"):
            raise invalid("bucket", f"must be flat or per-leaf, got {self.bucket!r}")
        if isinstance(self.augment, str):
            from ..data.augmentation import augment_preset

            try:
                object.__setattr__(self, "augment", augment_preset(self.augment))
            except ValueError as err:
                raise invalid("augment", str(err)) from None
        self._check_loss()
        self._check_sweep()

    def _check_loss(self) -> None:
        cfg = self.loss_cfg
        if isinstance(cfg, (list, tuple, str)):  # KEY=VALUE items, as the flag gives them
            try:
                cfg = parse_kv(cfg, "loss_cfg")
            except ValueError as err:
                raise invalid("loss_cfg", str(err)) from None
        object.__setattr__(self, "loss_cfg", dict(cfg))
        from ..losses import get_loss

        try:
            get_loss(self.loss, **self.loss_cfg)
        except (TypeError, ValueError) as err:
            raise invalid("loss_cfg" if self.loss in LOSSES else "loss", str(err)) from None

    def _check_sweep(self) -> None:
        sweep = {k: tuple(float(v) for v in vals) for k, vals in parse_sweep(self.sweep).items()}
        for name, values in sweep.items():
            if name not in SWEEPABLE:
                raise invalid("sweep", f"cannot sweep {name!r}; sweepable: {', '.join(SWEEPABLE)}")
            if name == "lr" and not all(math.isfinite(v) and v > 0 for v in values):
                raise invalid("sweep", f"every lr must be a positive number (as --lr), got {list(values)}")
            if not values:
                raise invalid("sweep", f"{name} needs at least one value")
        sizes = {len(v) for v in sweep.values()}
        if len(sizes) > 1:
            raise invalid("sweep", f"every swept hyperparameter needs the same number of values, got {sorted(sizes)}")
        if sweep:
            k = sizes.pop()
            if self.ensemble not in (1, k):
                raise invalid("ensemble", f"{self.ensemble} disagrees with the sweep's {k} values")
            object.__setattr__(self, "ensemble", k)
        if "loss_weight" in sweep and self.loss != "ce_dice":
            raise invalid("sweep", f"loss_weight weighs the dice term of 'ce_dice' (ce + loss_weight * dice); "
                          f"it means nothing for loss {self.loss!r}")
        if self.folds is not None:
            if self.ensemble not in (1, self.folds) or sweep:
                raise invalid("folds", f"K-fold trains one member per fold: ensemble {self.ensemble} and a sweep "
                              "do not combine with folds")
            object.__setattr__(self, "ensemble", self.folds)
        object.__setattr__(self, "sweep", sweep)

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
