"""torchvision's segmentation models, lifted into the model protocol with ``from_module``.

Each factory builds the torchvision module with random weights (nothing is downloaded: weights and
backbone weights are None), inside a forked RNG so the caller's global RNG is left alone, and lifts
it: parameters become params, buffers (batch-norm statistics) become state, and ``apply`` returns
the ``"out"`` logits [N, num_classes, H, W] (torchvision upsamples them to the input size). The aux
classifier is off. Parameter names are torchvision's (``backbone.conv1.weight``, ...).

Randomness: ``init(key)`` re-draws every submodule's ``reset_parameters`` under a seed taken from the
key. In training, the heads' dropout (FCN 0.1, DeepLabV3's ASPP 0.5) draws from torch's RNG seeded
from the key in eager mode; a key is required then. Under ``torch.compile`` that seeding is skipped
(torch's global RNG drives the dropout), see ``functional_seg.models.base.from_module``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision.models import segmentation as tv_seg

from .base import POSITIVE_INT, Model, build_cfg, from_module, register_model, validate_cfg

__all__ = ["LiftedCfg", "fcn_resnet50", "deeplabv3_mobilenet", "lraspp_mobilenet"]


@dataclass(frozen=True)
class LiftedCfg:
    """Only the number of classes is configurable; torchvision fixes the rest (3 input channels)."""

    num_classes: int = 3

    def __post_init__(self):
        validate_cfg(self, None, {"num_classes": POSITIVE_INT})


def _has_dropout(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


def _lift(name: str, build: Callable[[int], torch.nn.Module], stride: int, overrides: dict) -> Model:
    cfg = build_cfg(LiftedCfg, overrides, name=name)
    with torch.random.fork_rng(devices=[]):  # torchvision initialises from the global RNG
        module = build(cfg.num_classes)
    model = from_module(module, name=name, num_classes=cfg.num_classes, stride=stride)
    if not _has_dropout(module):
        return model
    lifted_apply = model.apply_fn

    def apply_fn(cfg, params, state, x, train, key):
        if train and key is None:
            raise ValueError(f"{name}: training (the head has dropout) needs a key (key=...), got None")
        return lifted_apply(cfg, params, state, x, train, key)

    return dataclasses.replace(model, apply_fn=apply_fn)


@register_model("fcn_resnet50", check=lambda cfg: build_cfg(LiftedCfg, cfg, name="fcn_resnet50"))
def fcn_resnet50(**cfg) -> Model:
    """torchvision FCN with a dilated ResNet-50 backbone (output stride 8), random init."""
    return _lift("fcn_resnet50", lambda n: tv_seg.fcn_resnet50(
        weights=None, weights_backbone=None, num_classes=n, aux_loss=False), 8, cfg)


@register_model("deeplabv3_mobilenet", check=lambda cfg: build_cfg(LiftedCfg, cfg, name="deeplabv3_mobilenet"))
def deeplabv3_mobilenet(**cfg) -> Model:
    """torchvision DeepLabV3 with a dilated MobileNetV3-Large backbone (output stride 16), random init."""
    return _lift("deeplabv3_mobilenet", lambda n: tv_seg.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=n, aux_loss=False), 16, cfg)


@register_model("lraspp_mobilenet", check=lambda cfg: build_cfg(LiftedCfg, cfg, name="lraspp_mobilenet"))
def lraspp_mobilenet(**cfg) -> Model:
    """torchvision LR-ASPP with a dilated MobileNetV3-Large backbone (output stride 16), random init."""
    return _lift("lraspp_mobilenet", lambda n: tv_seg.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=n), 16, cfg)
