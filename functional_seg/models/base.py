"""The model protocol, the registry, and lifting of ``torch.nn.Module``s.

A :class:`Model` binds a frozen cfg to two pure functions:

    init(key) -> (params, state)
    apply(params, state, x, *, train, key=None) -> (logits, state)

x is float [N, C_in, H, W] with H and W divisible by the model's stride; logits are
[N, num_classes, H, W]. params and state are nested dicts of tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from ..core import random as jr
from ..core.tree import flatten_with_names, unflatten_names

__all__ = ["Model", "register_model", "create_model", "list_models", "from_module"]


@dataclass(frozen=True)
class Model:
    """A model as data: a name, a static cfg and pure init/apply functions.

    ``init_fn(cfg, key)`` and ``apply_fn(cfg, params, state, x, train, key)`` hold the maths;
    ``stride`` is the factor H and W must be divisible by.
    """

    name: str
    cfg: Any
    init_fn: Callable = dataclasses.field(repr=False)
    apply_fn: Callable = dataclasses.field(repr=False)
    stride: int = 1
    in_channels: int = 3

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


def register_model(name: str):
    """Decorator: ``@register_model("segnet") def segnet(**cfg) -> Model``."""
    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = factory
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


def build_cfg(cfg_cls, overrides: dict):
    """Instantiate a frozen cfg dataclass, naming unknown fields in a ValueError."""
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{cfg_cls.__name__}: unknown field(s) {unknown}; valid: {sorted(fields)}")
    return cfg_cls(**overrides)


# ----------------------------------------------------------------------------------------------
# Lifting torch.nn.Module


@dataclass(frozen=True)
class ModuleCfg:
    num_classes: int
    output_key: str = "out"


def _seed_from_key(key: torch.Tensor) -> int:
    if key.is_meta:  # a shapes-only init (e.g. checking a checkpoint's names): any seed will do
        return 0
    k = key.detach().cpu()
    return int(k[0]) << 32 | int(k[1])


@contextlib.contextmanager
def _seeded_rng(key: torch.Tensor, devices: list[torch.device]):
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


def from_module(module: torch.nn.Module, *, name: str | None = None, num_classes: int | None = None,
                stride: int = 1, in_channels: int = 3, output_key: str = "out") -> Model:
    """Lift a ``torch.nn.Module`` into the model protocol with ``torch.func.functional_call``.

    Parameters become params, buffers become state (batch-norm buffers come back updated in
    training, the input state untouched). A dict output (torchvision's segmentation models)
    yields ``output[output_key]``. ``init(key)`` re-runs each submodule's ``reset_parameters``
    under a forked RNG seeded from the key, so the caller's global RNG is left as it was.
    Dropout inside a lifted module draws from torch's own RNG; the key seeds it in eager mode.
    """
    if num_classes is None:
        num_classes = getattr(module, "num_classes", None) or _guess_num_classes(module)
    cfg = ModuleCfg(num_classes=num_classes, output_key=output_key)

    def init_fn(cfg, key):
        with _seeded_rng(key, [t.device for t in module.parameters()]):
            for sub in module.modules():
                if hasattr(sub, "reset_parameters") and sub is not module:
                    sub.reset_parameters()
        params = unflatten_names({n: p.detach().clone() for n, p in module.named_parameters()})
        state = unflatten_names({n: b.detach().clone() for n, b in module.named_buffers()})
        return params, state

    def apply_fn(cfg, params, state, x, train, key):
        module.train(train)
        tensors = dict(flatten_with_names(params))
        new_state = {n: b.clone() for n, b in flatten_with_names(state).items()}  # updated in place by BN
        tensors.update(new_state)
        if train and key is not None and not torch.compiler.is_compiling():
            with _seeded_rng(key, [x.device]):
                out = functional_call(module, tensors, (x,), strict=True)
        else:
            out = functional_call(module, tensors, (x,), strict=True)
        if isinstance(out, dict):
            out = out[cfg.output_key]
        return out, unflatten_names(new_state) if train else state

    return Model(name=name or type(module).__name__.lower(), cfg=cfg, init_fn=init_fn, apply_fn=apply_fn,
                 stride=stride, in_channels=in_channels)


def _guess_num_classes(module: torch.nn.Module) -> int:
    last = None
    for sub in module.modules():
        if isinstance(sub, torch.nn.Conv2d):
            last = sub
    if last is None:
        raise ValueError("from_module: pass num_classes=... (no Conv2d found to infer it from)")
    return last.out_channels
