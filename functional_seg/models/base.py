"""The model protocol, the registry, and lifting of ``torch.nn.Module``s.

A :class:`Model` binds a frozen cfg to two pure functions:

    init(key) -> (params, state)
    apply(params, state, x, *, train, key=None) -> (logits, state)

x is float [N, C_in, H, W] with H and W divisible by the model's stride; logits are
[N, num_classes, H, W]. params and state are nested dicts of tensors.

Every cfg is validated when it is built, before anything is allocated: :func:`validate_cfg` checks
each field against a :class:`Rule` (positive integers, tuples of them, probabilities in [0, 1),
flags, choices) and :func:`cfg_error` words the relations between fields (equal lengths, dims
divisible by heads), so a bad ``--model-cfg`` is one line naming the model, the field, the value
and what was expected, e.g. ``segnet: widths must be a non-empty tuple of positive integers, got
('a', 'b')``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from ..core import random as jr
from ..core.tree import flatten_with_names, unflatten_names

__all__ = [
    "Model", "register_model", "create_model", "check_cfg", "list_models", "from_module", "LiftedModule",
    "build_cfg",
    "Rule", "validate_cfg", "cfg_error", "POSITIVE_INT", "POSITIVE_ODD_INT", "POSITIVE_INTS", "POSITIVE_ODD_INTS",
    "PROBABILITY", "FLAG", "one_of",
]


@dataclass(frozen=True)
class Model:
    """A model as data: a name, a static cfg and pure init/apply functions.

    ``init_fn(cfg, key)`` and ``apply_fn(cfg, params, state, x, train, key)`` hold the maths;
    ``stride`` is the factor H and W must be divisible by.

    ``input_mean`` / ``input_std`` (3 floats each, for x in [0, 1]) are the normalisation a
    pretrained encoder was trained with (e.g. 0.5 / 0.5 for the packaged EfficientNet-Lite0); None
    means the library default (ImageNet's). The training code builds its ``Preprocess`` from them.
    """

    name: str
    cfg: Any
    init_fn: Callable = dataclasses.field(repr=False)
    apply_fn: Callable = dataclasses.field(repr=False)
    stride: int = 1
    in_channels: int = 3
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def init(self, key: torch.Tensor) -> tuple[dict, dict]:
        if not jr.is_key(key):
            raise TypeError(f"{self.name}.init: expected a key from functional_seg.core.random.key(seed)")
        return self.init_fn(self.cfg, key)

    def apply(self, params: dict, state: dict, x: torch.Tensor, *, train: bool, key: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict]:
        self.check_input(x)
        return self.apply_fn(self.cfg, params, state, x, train, key)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels or not x.is_floating_point():
            raise ValueError(
                f"{self.name}: x must be float [N, {self.in_channels}, H, W], got {x.dtype} {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(
                f"{self.name}: input size {h}x{w} must be divisible by the model's stride {self.stride}")


_REGISTRY: dict[str, Callable[..., Model]] = {}
_CHECKS: dict[str, Callable[[dict], Any]] = {}


def register_model(name: str, *, check: Callable[[dict], Any] | None = None):
    """Decorator: ``@register_model("segnet") def segnet(**cfg) -> Model``.

    ``check(cfg)`` validates a cfg without building the model (e.g. ``build_cfg(SegNetCfg, cfg)``);
    :func:`check_cfg` falls back to building the model where none is given.
    """
    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = factory
        if check is not None:
            _CHECKS[name] = check
        return factory
    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **cfg) -> Model:
    """Build a registered model; unknown names or cfg fields raise ValueError naming them."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    try:
        return _REGISTRY[name](**cfg)
    except TypeError as err:
        raise ValueError(f"bad cfg for model {name!r}: {err}") from None


def check_cfg(name: str, **cfg) -> None:
    """Validate ``create_model(name, **cfg)``'s arguments without building it (before data is read).

    Raises:
        ValueError: an unknown model or cfg field, or a bad value, named in one line.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if name not in _CHECKS:
        create_model(name, **cfg)
        return
    try:
        _CHECKS[name](cfg)
    except TypeError as err:
        raise ValueError(f"bad cfg for model {name!r}: {err}") from None


def build_cfg(cfg_cls, overrides: dict, *, name: str | None = None):
    """Instantiate a frozen cfg dataclass; unknown fields raise a one-line ValueError listing the valid ones.

    ``name`` (the model's registry name) starts the messages, in place of the class name that a
    cfg shared by several models (``LiftedCfg``) validates itself under.
    """
    label = name or cfg_cls.__name__
    fields = [f.name for f in dataclasses.fields(cfg_cls)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"{label}: unknown field(s) {unknown}; valid: {', '.join(fields)}")
    try:
        return cfg_cls(**overrides)
    except ValueError as err:
        prefix = f"{cfg_cls.__name__}: "
        if name and str(err).startswith(prefix):
            raise ValueError(f"{name}: {str(err)[len(prefix):]}") from None
        raise


# ----------------------------------------------------------------------------------------------
# Cfg validation: one contract for every model


@dataclass(frozen=True)
class Rule:
    """What one cfg field accepts: ``check(value)`` is true for a valid value, which ``convert`` then
    normalises (lists to tuples, numpy integers to int); ``expected`` words it for the error."""

    expected: str
    check: Callable[[Any], bool] = dataclasses.field(repr=False)
    convert: Callable[[Any], Any] = dataclasses.field(default=lambda v: v, repr=False)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int_tuple(check_item: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(_is_int(x) and check_item(x) for x in v)


POSITIVE_INT = Rule("a positive integer", lambda v: _is_int(v) and v >= 1, int)
POSITIVE_ODD_INT = Rule("a positive odd integer", lambda v: _is_int(v) and v >= 1 and v % 2 == 1, int)
POSITIVE_INTS = Rule("a non-empty tuple of positive integers (e.g. 8,16)", _int_tuple(lambda x: x >= 1),
                     lambda v: tuple(int(x) for x in v))
POSITIVE_ODD_INTS = Rule("a non-empty tuple of positive odd integers (e.g. 7,3)",
                         _int_tuple(lambda x: x >= 1 and x % 2 == 1), lambda v: tuple(int(x) for x in v))
PROBABILITY = Rule("a number in [0, 1)", lambda v: _is_real(v) and 0 <= v < 1, float)
FLAG = Rule("true or false", lambda v: isinstance(v, bool))


def one_of(*choices: str) -> Rule:
    return Rule(f"one of {', '.join(map(repr, choices))}", lambda v: isinstance(v, str) and v in choices)


def cfg_error(model: str, field: str, value: Any, expected: str) -> ValueError:
    """The one-line error every cfg check raises: ``{model}: {field} must be {expected}, got {value!r}``."""
    return ValueError(f"{model}: {field} must be {expected}, got {value!r}")


def validate_cfg(cfg, model: str | None, rules: dict[str, Rule]) -> None:
    """Check every field of the frozen dataclass ``cfg`` against ``rules`` (call from ``__post_init__``).

    ``model`` names the model in the messages; None: the cfg's class name (which
    :func:`build_cfg` then replaces with the registry name).

    Valid values are normalised in place (``object.__setattr__``: lists become tuples, numpy
    integers Python ints), so the cfg is hashable and JSON-encodes the same way wherever it came
    from. Raises ValueError (see :func:`cfg_error`) at the first bad field, in declaration order.
    """
    model = model or type(cfg).__name__
    fields = [f.name for f in dataclasses.fields(cfg)]
    if set(rules) != set(fields):  # a programming error: every field needs a rule
        raise TypeError(f"{type(cfg).__name__}: rules for {sorted(rules)} but fields {sorted(fields)}")
    for name in fields:
        rule, value = rules[name], getattr(cfg, name)
        if not rule.check(value):
            raise cfg_error(model, name, value, rule.expected)
        object.__setattr__(cfg, name, rule.convert(value))


# ----------------------------------------------------------------------------------------------
# Lifting torch.nn.Module


@dataclass(frozen=True)
class ModuleCfg:
    num_classes: int
    output_key: str = "out"

    def __post_init__(self):
        validate_cfg(self, None, {"num_classes": POSITIVE_INT,
                                           "output_key": Rule("a string", lambda v: isinstance(v, str))})


def _seed_from_key(key: torch.Tensor) -> int:
    if key.is_meta:  # a shapes-only run: any seed will do
        return 0
    k = key.detach().cpu()
    return int(k[0]) << 32 | int(k[1])


@contextlib.contextmanager
def seeded_rng(key: torch.Tensor, devices: list[torch.device]):
    """Seed torch's CPU RNG and those of ``devices`` from ``key``, restoring all of them afterwards.

    ``torch.manual_seed`` would also reseed every CUDA device without restoring it.
    """
    seed = _seed_from_key(key) % (2**63 - 1)
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


class _ModeCopies(threading.local):
    """Per-thread train-mode and eval-mode copies of a module on the meta device.

    ``functional_call`` swaps the given tensors into a module for the length of a call, so one
    module shared by two threads would let one thread's call read the other's params. Each
    thread gets its own pair, deep-copied (shapes only, no data) from the template on first use;
    their ``training`` flags are set once here and never touched again.
    """

    def __init__(self, template: torch.nn.Module):
        self.train_module = copy.deepcopy(template).train()
        self.eval_module = copy.deepcopy(template).eval()


class LiftedModule:
    """A ``torch.nn.Module`` as a pure call: ``lifted(params, state, x, train=..., key=None) -> (out, new_state)``.

    The one place a module becomes pure (shared by :func:`from_module` and the pretrained encoders
    in ``models.encoders``). Parameters are params, buffers are state, both nested dicts named as
    in the module's ``state_dict``. The module is copied once to the meta device (shapes only, no
    data) with separate train-mode and eval-mode copies per thread (:class:`_ModeCopies`), and every
    call supplies all tensors through ``torch.func.functional_call``, so a call never flips a
    ``training`` flag, never reads a tensor it was not given, and is safe from several threads,
    under ``vmap`` and under ``torch.compile``. Buffers the module updates in place (batch-norm
    statistics in training) are cloned first and come back as the new state; in eval the state
    passed in is returned as it is. Dropout inside the module draws from torch's RNG, seeded from
    ``key`` in eager mode.
    """

    def __init__(self, module: torch.nn.Module):
        with torch.no_grad():
            self.template = copy.deepcopy(module).to("meta")
        self._modes = _ModeCopies(self.template)
        # Under torch.compile the trace runs on the main thread's pair (threading.local is not traced)
        self._compiled_modes = (self._modes.train_module, self._modes.eval_module)

    def meta_trees(self) -> tuple[dict, dict]:
        """(params, state) of meta tensors shaped as the module's: names and shapes, nothing allocated."""
        return (unflatten_names({n: torch.empty_like(p, device="meta") for n, p in self.template.named_parameters()}),
                unflatten_names({n: torch.empty_like(b, device="meta") for n, b in self.template.named_buffers()}))

    @staticmethod
    def trees_of(module: torch.nn.Module) -> tuple[dict, dict]:
        """(params, state): detached copies of a real module's parameters and buffers."""
        return (unflatten_names({n: p.detach().clone() for n, p in module.named_parameters()}),
                unflatten_names({n: b.detach().clone() for n, b in module.named_buffers()}))

    def __call__(self, params: dict, state: dict, x: torch.Tensor, *, train: bool, key: torch.Tensor | None = None):
        if torch.compiler.is_compiling():
            target = self._compiled_modes[0] if train else self._compiled_modes[1]
        else:
            target = self._modes.train_module if train else self._modes.eval_module
        tensors = dict(flatten_with_names(params))
        if train:
            new_state = {n: b.clone() for n, b in flatten_with_names(state).items()}  # updated in place by BN
            tensors.update(new_state)
        else:
            tensors.update(flatten_with_names(state))
        if train and key is not None and not torch.compiler.is_compiling():
            with seeded_rng(key, [x.device]):
                out = functional_call(target, tensors, (x,), strict=True)
        else:
            out = functional_call(target, tensors, (x,), strict=True)
        return out, (unflatten_names(new_state) if train else state)


def from_module(module: torch.nn.Module, *, name: str | None = None, num_classes: int | None = None,
                stride: int = 1, in_channels: int = 3, output_key: str = "out") -> Model:
    """Lift a ``torch.nn.Module`` into the model protocol with ``torch.func.functional_call``.

    Parameters become params, buffers become state (batch-norm buffers come back updated in
    training, the input state untouched). A dict output (torchvision's segmentation models)
    yields ``output[output_key]``. ``apply`` is a :class:`LiftedModule` call: nothing here
    mutates ``module`` and the calls are pure (see there).

    ``init(key)`` re-runs each submodule's ``reset_parameters`` under a forked RNG seeded from the
    key, in a copy of the module made at lift time, so the caller's global RNG is left as it was;
    with a key on the meta device it draws nothing and returns meta tensors of the right shapes.
    """
    if num_classes is None:
        num_classes = getattr(module, "num_classes", None) or _guess_num_classes(module)
    label = name or type(module).__name__.lower()
    for field, value in (("stride", stride), ("in_channels", in_channels)):
        if not POSITIVE_INT.check(value):
            raise cfg_error(label, field, value, POSITIVE_INT.expected)
    cfg = build_cfg(ModuleCfg, {"num_classes": num_classes, "output_key": output_key}, name=label)
    init_module = copy.deepcopy(module)
    lifted = LiftedModule(module)

    def init_fn(cfg, key):
        if key.is_meta:  # shapes only (summaries, checking a checkpoint's names): nothing to draw
            return lifted.meta_trees()
        with seeded_rng(key, [t.device for t in init_module.parameters()]):
            for sub in init_module.modules():
                if hasattr(sub, "reset_parameters") and sub is not init_module:
                    sub.reset_parameters()
        return lifted.trees_of(init_module)

    def apply_fn(cfg, params, state, x, train, key):
        out, new_state = lifted(params, state, x, train=train, key=key)
        if isinstance(out, dict):
            out = out[cfg.output_key]
        return out, new_state

    return Model(name=label, cfg=cfg, init_fn=init_fn, apply_fn=apply_fn, stride=stride, in_channels=in_channels)


def _guess_num_classes(module: torch.nn.Module) -> int:
    last = None
    for sub in module.modules():
        if isinstance(sub, torch.nn.Conv2d):
            last = sub
    if last is None:
        raise ValueError("from_module: pass num_classes=... (no Conv2d found to infer it from)")
    return last.out_channels
