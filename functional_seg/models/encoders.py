"""Backbones as encoders: a timm or torchvision classification network cut into stages, as pure functions.

``create_encoder(name, in_channels=3, depth=5, output_stride=32)`` builds an :class:`Encoder`:

    init(key) -> (params, state)                     random init, as the backbone's own code draws it
    apply(params, state, x, *, train) -> (features, new_state)
        x float [N, C_in, H, W] -> features: ``depth`` tensors [N, channels[i], H / reductions[i], W / reductions[i]]

``name`` is a timm model name (``efficientnet_lite0``, ``resnet34``, timm's tiny ``test_efficientnet``),
built with ``features_only=True, pretrained=False, out_indices=range(depth)``, or
``torchvision:<name>`` for torchvision's ResNet family (``torchvision:resnet34``), whose stages
(``relu``, ``layer1`` .. ``layer4``) are taken with torchvision's feature extraction. ``channels`` and
``reductions`` come from timm's ``feature_info`` (torchvision: one shapes-only pass on the meta
device), so decoders are built for any encoder. ``output_stride`` (8, 16 or 32) replaces the last
strides by dilation where the backbone supports it (DeepLabV3+ asks for 16); the reductions then
stop at it.

The module is lifted with :class:`functional_seg.models.base.LiftedModule` (``functional_call``):
parameters are params, buffers (batch-norm statistics) are state, named as in the backbone's
``state_dict`` (``conv_stem.weight``, ``blocks.0.0.bn1.running_mean``). Nothing is downloaded here;
pretrained weights are read by ``models.weights`` inside a model's ``init``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..core.tree import tree_map
from .base import LiftedModule, seeded_rng

__all__ = ["Encoder", "EncoderError", "create_encoder", "TORCHVISION_PREFIX", "IMAGENET_MEAN", "IMAGENET_STD"]

TORCHVISION_PREFIX = "torchvision:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUT_STRIDES = (8, 16, 32)
_TV_STAGES = ("relu", "layer1", "layer2", "layer3", "layer4")
_TV_FAMILIES = ("resnet", "resnext", "wide_resnet")


class EncoderError(ValueError):
    """An encoder that cannot be built as asked; the message names it and what was expected."""


@dataclass(frozen=True, eq=False)
class Encoder:
    """A backbone's first ``depth`` stages as pure functions (see the module doc).

    ``build()`` makes a freshly initialised ``torch.nn.Module`` of the stages (from torch's global
    RNG); ``build_classifier()`` the whole classification network the pretrained checkpoints are
    saved from, on the meta device (names and shapes for ``models.weights``). ``first_conv`` names
    the stem convolution (its weight is adapted when ``in_channels`` differs from a checkpoint's 3).
    ``mean`` / ``std`` are the input normalisation of the backbone's default pretrained weights.
    """

    name: str
    kind: str
    arch: str
    in_channels: int
    depth: int
    output_stride: int
    channels: tuple[int, ...]
    reductions: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    first_conv: str | None
    build: Callable[[], torch.nn.Module] = field(repr=False)
    build_classifier: Callable[[], torch.nn.Module] = field(repr=False)
    lifted: LiftedModule = field(repr=False)
    channels_last_output: bool = False

    @property
    def stride(self) -> int:
        """The largest reduction: H and W must be divisible by it."""
        return max(self.reductions)

    def meta_trees(self) -> tuple[dict, dict]:
        """(params, state) as meta tensors: names and shapes, nothing drawn or allocated."""
        return self.lifted.meta_trees()

    def init(self, key: torch.Tensor) -> tuple[dict, dict]:
        """Random (params, state), drawn by the backbone's own initialisers under torch's RNG seeded from
        ``key`` (the caller's global RNG is left as it was); a meta key returns :meth:`meta_trees`."""
        if key.is_meta:
            return self.meta_trees()
        with seeded_rng(key, []):
            module = self.build()
        params, state = LiftedModule.trees_of(module)
        return tree_map(lambda t: t.to(key.device), params), tree_map(lambda t: t.to(key.device), state)

    def apply(self, params: dict, state: dict, x: torch.Tensor, *, train: bool) -> tuple[list[torch.Tensor], dict]:
        """x [N, C_in, H, W] -> (features, new_state); new_state is ``state`` itself in eval."""
        out, new_state = self.lifted(params, state, x, train=train)
        features = list(out.values()) if isinstance(out, dict) else list(out)
        if self.channels_last_output:  # NHWC feature maps (some timm models): NCHW for the decoders
            features = [f.permute(0, 3, 1, 2) for f in features]
        return features, new_state


def create_encoder(name: str, *, in_channels: int = 3, depth: int = 5, output_stride: int = 32) -> Encoder:
    """Build (and cache) the encoder ``name``; see the module doc. Raises :class:`EncoderError` in one line."""
    if not isinstance(name, str) or not name:
        raise EncoderError(f"encoder must be a timm model name or {TORCHVISION_PREFIX}<name>, got {name!r}")
    if output_stride not in OUTPUT_STRIDES:
        raise EncoderError(f"encoder {name}: output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    return _create_encoder(name, int(in_channels), int(depth), int(output_stride))


@functools.lru_cache(maxsize=64)
def _create_encoder(name: str, in_channels: int, depth: int, output_stride: int) -> Encoder:
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_encoder(name, name[len(TORCHVISION_PREFIX):], in_channels, depth, output_stride)
    return _timm_encoder(name, in_channels, depth, output_stride)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def _on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build on the meta device (no memory, no draws); modules that cannot be built there are built on
    the CPU under a forked RNG (the caller's global RNG untouched) and moved."""
    try:
        with torch.device("meta"):
            return build()
    except Exception:  # noqa: BLE001 - some constructors compute with real tensors; fall back
        with torch.random.fork_rng(devices=[]):
            return build().to("meta")


# ----------------------------------------------------------------------------------------------
# timm


def _timm_encoder(name: str, in_channels: int, depth: int, output_stride: int) -> Encoder:
    timm = importlib.import_module("timm")
    if "." in name or not timm.is_model(name):
        raise EncoderError(f"encoder {name!r} is neither a timm model name (timm.list_models()) nor "
                           f"{TORCHVISION_PREFIX}<name>; pretrained tags go in encoder_weights")
    kwargs = dict(features_only=True, pretrained=False, in_chans=in_channels, out_indices=tuple(range(depth)))
    if output_stride != 32:
        kwargs["output_stride"] = output_stride

    def build():
        return timm.create_model(name, **kwargs)

    try:
        template = _on_meta(build)
    except Exception as err:  # timm raises many kinds for an unsupported depth or output stride
        raise EncoderError(f"encoder {name}: cannot build it with depth={depth}, output_stride={output_stride}: "
                           f"{_first_line(err)}") from None
    info = template.feature_info
    pretrained = timm.models.get_pretrained_cfg(name)
    mean = tuple(pretrained.mean) if pretrained is not None else IMAGENET_MEAN
    std = tuple(pretrained.std) if pretrained is not None else IMAGENET_STD
    first_conv = pretrained.first_conv if pretrained is not None else None
    fmt = str(getattr(template, "output_fmt", "NCHW"))
    return Encoder(
        name=name, kind="timm", arch=name, in_channels=in_channels, depth=depth, output_stride=output_stride,
        channels=tuple(info.channels()), reductions=tuple(info.reduction()), mean=mean, std=std,
        first_conv=first_conv if isinstance(first_conv, str) else None, build=build,
        build_classifier=lambda: _on_meta(lambda: timm.create_model(name, pretrained=False, in_chans=in_channels)),
        lifted=LiftedModule(template), channels_last_output=fmt.endswith("NHWC"))


# ----------------------------------------------------------------------------------------------
# torchvision


def _torchvision_encoder(name: str, arch: str, in_channels: int, depth: int, output_stride: int) -> Encoder:
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    family = [n for n in torchvision.models.list_models(torchvision.models) if n.startswith(_TV_FAMILIES)]
    if arch not in family:
        raise EncoderError(f"encoder {name!r}: torchvision encoders are the ResNet family ({', '.join(family)})")
    if in_channels != 3:
        raise EncoderError(f"encoder {name}: torchvision backbones take 3 input channels, got {in_channels}")
    if not 1 <= depth <= len(_TV_STAGES):
        raise EncoderError(f"encoder {name}: depth must be in 1..{len(_TV_STAGES)}, got {depth}")
    dilate = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}[output_stride]

    def build_classifier():
        return torchvision.models.get_model(arch, weights=None, replace_stride_with_dilation=dilate)

    def build():
        nodes = {node: str(i) for i, node in enumerate(_TV_STAGES[:depth])}
        return create_feature_extractor(build_classifier(), return_nodes=nodes)

    try:
        template = _on_meta(build)
    except NotImplementedError as err:  # BasicBlock ResNets (18, 34) have no dilation
        raise EncoderError(f"encoder {name}: output_stride {output_stride} is not supported ({_first_line(err)}); "
                           "use 32 or a timm encoder") from None
    with torch.device("meta"):
        probe = list(template(torch.zeros(1, 3, 64, 64)).values())
    return Encoder(
        name=name, kind="torchvision", arch=arch, in_channels=in_channels, depth=depth, output_stride=output_stride,
        channels=tuple(f.shape[1] for f in probe), reductions=tuple(64 // f.shape[-1] for f in probe),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="conv1", build=build,
        build_classifier=lambda: _on_meta(build_classifier), lifted=LiftedModule(template))
