"""An encoder (``models.encoders``) and a pure decoder bound into one model; freezing the encoder.

Every encoder-decoder model (``unet`` with an encoder, ``fpn``, ``deeplabv3plus``) is made by
:func:`encoder_decoder_model`. Its trees keep the encoder under the top-level key ``encoder`` (so an
optimizer can select it by prefix, for a learning-rate multiplier or for freezing) and the
decoder's own keys beside it::

    params = {"encoder": {...backbone names...}, "decoder": {...}, "head": {...}}
    state  = {"encoder": {...BN statistics...}, "decoder": {...}}

``init(key)``: the encoder's tensors come from ``cfg.encoder_weights`` (read by ``models.weights``,
never for a meta-device key) or from its random init; the decoder draws from its own subkey.
``apply``: features = encoder(x), logits = decoder(features) at the input size. With
:func:`freeze_encoder` the encoder runs in eval mode (batch norm uses and keeps its running
statistics) and its features are detached, so no gradient reaches it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core import random as jr
from .base import Model, Rule
from .encoders import Encoder
from .weights import is_pretrained, load_encoder_weights, normalisation

__all__ = ["EncoderDecoder", "encoder_decoder_model", "freeze_encoder", "model_encoder", "ENCODER_KEY",
           "ENCODER", "ENCODER_WEIGHTS"]

ENCODER_KEY = "encoder"

ENCODER = Rule("a timm model name or 'torchvision:<name>' (e.g. 'resnet34', 'efficientnet_lite0')",
               lambda v: isinstance(v, str) and bool(v.strip()))
ENCODER_WEIGHTS = Rule("None, 'none', 'imagenet', a timm tag, a file path or 'package:<name>'",
                       lambda v: v is None or isinstance(v, str))


@dataclass(frozen=True, eq=False)
class EncoderDecoder:
    """The init and apply of an encoder-decoder model (bound methods of this object are the model's
    ``init_fn`` / ``apply_fn``).

    ``decoder_init(cfg, key, encoder) -> (params, state)`` builds every key but ``encoder``;
    ``decoder_apply(cfg, params, state, features, size, train, key) -> (logits, decoder_state)`` maps the
    encoder's features to logits [N, num_classes, *size] and returns the decoder's new state (every
    key but ``encoder``). ``frozen``: see :func:`freeze_encoder`.
    """

    encoder: Encoder
    decoder_init: Callable
    decoder_apply: Callable
    frozen: bool = False

    def init(self, cfg, key: torch.Tensor) -> tuple[dict, dict]:
        enc_key, dec_key = jr.split(key)
        if key.is_meta:  # shapes only: how checkpoints are rebuilt; nothing is read
            enc_params, enc_state = self.encoder.meta_trees()
        elif is_pretrained(cfg.encoder_weights):
            enc_params, enc_state = load_encoder_weights(self.encoder, cfg.encoder_weights, device=key.device)
        else:
            enc_params, enc_state = self.encoder.init(enc_key)
        dec_params, dec_state = self.decoder_init(cfg, dec_key, self.encoder)
        return {ENCODER_KEY: enc_params, **dec_params}, {ENCODER_KEY: enc_state, **dec_state}

    def apply(self, cfg, params: dict, state: dict, x: torch.Tensor, train: bool, key: torch.Tensor | None
              ) -> tuple[torch.Tensor, dict]:
        features, enc_state = self.encoder.apply(params[ENCODER_KEY], state[ENCODER_KEY], x,
                                                 train=train and not self.frozen)
        if self.frozen:
            features = [f.detach() for f in features]
        decoder_state = {k: v for k, v in state.items() if k != ENCODER_KEY}
        logits, new_decoder_state = self.decoder_apply(cfg, params, decoder_state, features, x.shape[-2:], train, key)
        if not train:
            return logits, state
        return logits, {ENCODER_KEY: enc_state, **new_decoder_state}


def encoder_decoder_model(name: str, cfg, encoder: Encoder, decoder_init: Callable, decoder_apply: Callable
                          ) -> Model:
    """A :class:`Model` over ``encoder``: stride = the encoder's largest reduction; input mean/std from
    the pretrained weights named by ``cfg.encoder_weights`` (None for random init: the library default)."""
    bound = EncoderDecoder(encoder, decoder_init, decoder_apply)
    mean, std = normalisation(encoder, cfg.encoder_weights)
    return Model(name=name, cfg=cfg, init_fn=bound.init, apply_fn=bound.apply, stride=encoder.stride,
                 in_channels=cfg.in_channels, input_mean=mean, input_std=std)


def _bound(model: Model) -> EncoderDecoder | None:
    owner = getattr(model.apply_fn, "__self__", None)
    return owner if isinstance(owner, EncoderDecoder) else None


def model_encoder(model: Model) -> Encoder | None:
    """The encoder of an encoder-decoder model, or None for any other model."""
    bound = _bound(model)
    return bound.encoder if bound is not None else None


def freeze_encoder(model: Model) -> Model:
    """The same model whose ``apply`` runs the encoder with ``train=False`` (batch norm uses and keeps its
    running statistics) and detaches its features, so no gradient reaches ``params["encoder"]``.

    For "freeze the encoder for the first N epochs": train with the frozen model, then with ``model``;
    params, state and checkpoints are the same trees. The optimizer must leave the ``encoder`` subtree
    alone too (decoupled weight decay would still shrink it). Raises ValueError for a model without a
    lifted encoder.
    """
    bound = _bound(model)
    if bound is None:
        raise ValueError(f"freeze_encoder: {model.name} has no pretrained-style encoder (set encoder=...)")
    frozen = dataclasses.replace(bound, frozen=True)
    return dataclasses.replace(model, init_fn=frozen.init, apply_fn=frozen.apply)
