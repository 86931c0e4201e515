"""Tiny models and checkpoints shared by several test modules (test modules never import each other).

``TINY`` holds a cfg per registry model that runs (and exports) in a few seconds on a CPU;
``make_checkpoint`` writes a freshly initialised one through the narrowest API
(``init_train_state`` + ``checkpoint.save`` with the model's metadata), ``make_ensemble_checkpoint``
K of them stacked as an ensemble; ``bn_free_model`` is a
two-conv model without batch norm, for laws that hold exactly only without it (accumulation,
data parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from functional_seg import checkpoint
from functional_seg.core import random as jr
from functional_seg.core.tree import tree_map
from functional_seg.data.preprocess import Preprocess
from functional_seg.models import create_model
from functional_seg.models.base import Model
from functional_seg.models.saved import model_metadata
from functional_seg.train import init_ensemble, init_train_state, make_optimizer

OXFORD_NAMES = ("pet", "background", "border")

# Tiny cfgs: each exports in a few seconds on a CPU.
TINY = {
    # no ReLU on the logits: at init most of them would be 0, and the parity tests vacuous
    "segnet": dict(widths=(4, 8), convs_per_stage=(1, 1), final_relu=False),
    "segnet_dsc": dict(widths=(4, 8), convs_per_stage=(1, 1), final_relu=False),
    "unet": dict(base_width=4, depth=2),
    "segformer": dict(dims=(8, 16), depths=(1, 1), num_heads=(1, 2), sr_ratios=(2, 1), patch_sizes=(3, 3),
                      patch_strides=(4, 2), decoder_dim=8),
    "vit": dict(image_size=32, patch_size=8, dim=16, depth=1, num_heads=2, mlp_dim=32),
}
SIZE = 32


def make_checkpoint(path, name: str, *, size: int | tuple[int, int] = SIZE, policy: str = "resize", seed: int = 0,
                    preprocess: bool = True, class_names=OXFORD_NAMES, layout: str | None = None,
                    perturb_stats: bool = True, **cfg):
    """Write a checkpoint of a freshly initialised ``name`` (tiny cfg unless given) to ``path``.

    Batch-norm statistics are moved off their init values (mean 0, var 1), so eval-mode
    normalisation is exercised (``perturb_stats=False`` keeps them: a tiny segnet then predicts
    every class on a photo, where perturbed ones predict one class everywhere). Returns
    ``(model, params, state, preprocess)``.
    """
    model = create_model(name, **(cfg or TINY[name]))
    ts = init_train_state(model, make_optimizer(), jr.key(seed))
    gen = torch.Generator().manual_seed(seed)
    if perturb_stats:
        ts = ts._replace(state=tree_map(
            lambda t: t + 0.5 * torch.rand(t.shape, generator=gen) if t.is_floating_point() else t, ts.state))
    pre = Preprocess(size=size, policy=policy, class_names=tuple(class_names), layout=layout)
    meta = {**model_metadata(model), "args": {"size": size}, "ensemble": 0}
    if preprocess:
        meta["preprocess"] = pre.to_dict()
    checkpoint.save(path, ts, meta)
    return model, ts.params, ts.state, pre


def make_ensemble_checkpoint(path, name: str, members: int, *, size: int = SIZE, seed: int = 0, selection=None,
                             class_names=OXFORD_NAMES, **cfg):
    """Write a checkpoint of ``members`` freshly initialised ``name`` models stacked as an ensemble
    (``init_ensemble`` + ``checkpoint.save``, meta ``ensemble`` = K, as ``fit`` writes one).

    Each member gets its own init and perturbed batch-norm statistics. Returns ``(model, params,
    state, preprocess)`` with every leaf of params and state stacked [K, ...].
    """
    model = create_model(name, **(cfg or TINY[name]))
    ts = init_ensemble(model, make_optimizer(), jr.key(seed), members)
    gen = torch.Generator().manual_seed(seed)
    stats = tree_map(lambda t: t + 0.5 * torch.rand(t.shape, generator=gen) if t.is_floating_point() else t,
                     ts.state)
    ts = ts._replace(state=stats)
    pre = Preprocess(size=size, class_names=tuple(class_names))
    meta = {**model_metadata(model), "args": {"size": size}, "ensemble": members, "preprocess": pre.to_dict()}
    if selection is not None:
        meta["selection"] = selection
    checkpoint.save(path, ts, meta)
    return model, ts.params, ts.state, pre


@dataclass(frozen=True)
class _ConvCfg:
    num_classes: int = 3
    width: int = 4


def _conv_init(cfg, key):
    k1, k2 = jr.split(key)
    return ({"c1": {"weight": 0.3 * jr.normal(k1, (cfg.width, 3, 3, 3)), "bias": torch.zeros(cfg.width)},
             "c2": {"weight": 0.3 * jr.normal(k2, (cfg.num_classes, cfg.width, 3, 3)),
                    "bias": torch.zeros(cfg.num_classes)}}, {})


def _conv_apply(cfg, params, state, x, train, key):
    h = F.relu(F.conv2d(x, params["c1"]["weight"], params["c1"]["bias"], padding=1))
    return F.conv2d(h, params["c2"]["weight"], params["c2"]["bias"], padding=1), state


def bn_free_model() -> Model:
    return Model("tiny_conv", _ConvCfg(), _conv_init, _conv_apply)

