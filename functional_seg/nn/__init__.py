"""Pure layers: ``init_X(key, ...) -> params`` builds, ``X(params, ...)`` applies."""

from .activation import channel_dropout, dropout, gelu, relu, sigmoid, silu
from .attention import dot_product_attention, init_self_attention, self_attention
from .conv import (
    conv2d,
    conv_transpose2d,
    init_conv2d,
    init_conv_transpose2d,
    init_separable_conv2d,
    separable_conv2d,
)
from .linear import init_linear, linear
from .norm import (
    batch_norm,
    batch_stats_reducer,
    group_norm,
    init_batch_norm,
    init_group_norm,
    init_layer_norm,
    layer_norm,
)
from .pool import max_pool2d, max_pool2d_with_indices, max_unpool2d, resize

__all__ = [
    "batch_norm", "batch_stats_reducer", "channel_dropout", "conv2d", "conv_transpose2d", "dot_product_attention",
    "dropout", "gelu", "group_norm", "init_batch_norm", "init_conv2d", "init_conv_transpose2d", "init_group_norm",
    "init_layer_norm", "init_linear", "init_self_attention", "init_separable_conv2d", "layer_norm", "linear",
    "max_pool2d", "max_pool2d_with_indices", "max_unpool2d", "relu", "resize", "self_attention", "separable_conv2d",
    "sigmoid", "silu",
]
