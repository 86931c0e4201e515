"""A torchinfo-style summary of any registered model: per-layer output shapes, parameters, mult-adds.

``summarize(model, (H, W), batch_size)`` initialises the model from ``key(0)``, runs
``apply(train=False)`` once on zeros [batch, C_in, H, W] under a ``TorchDispatchMode``, and sees
every aten op actually executed, so pure models and lifted ``torch.nn.Module``s are measured the
same way and the apply functions need to know nothing about it.

Rows (their granularity). A row is one *parameterised layer*, named by the dotted prefix of its
params and state (``encoder.0.1.conv``, ``blocks.3.attn.in_proj``, ``backbone.layer1.0.conv1`` for
a lifted torchvision model); a top-level tensor such as ``pos_embed`` is its own row. Each op is
assigned to the layer whose params or state it reads (followed through ops on the params alone,
such as ``weight.t()``). A row shows the shape of the last output of its ops (for a linear layer
on [N, L, C] the [N, L, C_out] it returns, not the flattened matmul), its own parameter count,
and its mult-adds. Parameter-free ops (ReLU, pooling, unpooling, resizing, the attention products
q k^T and (.) v) are not rows; their mult-adds go to the common dotted prefix of the layers
before and after them, so attention's products appear as e.g. ``blocks.3.attn`` (with 0
parameters), or to ``(other)`` if that prefix is empty.

Mult-adds are ``torch.utils.flop_counter``'s formulas divided by two (conv, mm/addmm/bmm/baddbmm,
scaled-dot-product attention), plus CPU's ``_scaled_dot_product_flash_attention_for_cpu``, which
``FlopCounterMode`` leaves uncounted. Like ``FlopCounterMode``, an op without a formula is first
decomposed, so mult-adds inside composite ops are found. Bias additions, normalisation and
element-wise ops count nothing. Compared with torchinfo (which counts (weight + bias numel) x
output pixels per conv and batch x params for every other layer): equal for bias-free convs;
torchinfo adds bias x output pixels to each biased conv, counts a transposed conv's weights at
every *output* pixel (4x the executed count for U-Net's 2x2 stride-2 up-convs), adds
batch x params for batch/layer norms and linears, and counts a linear on [N, L, C] once per
sample rather than per token. Totals of parameters agree exactly.

Sizes: ``param_bytes`` (params), ``state_bytes`` (batch-norm statistics), ``activation_bytes``
(the rows' outputs, one forward pass; torchinfo doubles its figure for the backward pass),
``input_bytes``.

Memory: every summary is first measured on the meta device (shapes only, nothing allocated, the
same figures). On a real device the model is then run only if its estimated total (params, state,
activations and input) fits in the memory available there (:func:`available_memory`: MemAvailable
from /proc/meminfo for the CPU, free memory for CUDA); otherwise a one-line ValueError names the
estimate, so ``widths=100000,...`` is refused in well under a second instead of allocating.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary

from .core import random as jr
from .core.tree import flatten_with_names, tree_bytes, tree_map, tree_size
from .runtime import host_memory_available

__all__ = ["LayerRow", "ModelSummary", "summarize", "format_summary", "available_memory", "check_fits"]

_aten = torch.ops.aten
_OTHER = "(other)"


@dataclass(frozen=True)
class LayerRow:
    """One parameterised layer (or a parameter-free group, see the module doc)."""

    name: str
    output_shape: tuple[int, ...] | None
    params: int
    mult_adds: int


@dataclass(frozen=True)
class ModelSummary:
    """Rows in execution order and totals; ``totals()`` is the JSON-ready dict."""

    model_name: str
    input_shape: tuple[int, ...]
    rows: tuple[LayerRow, ...]
    total_params: int
    trainable_params: int
    total_mult_adds: int
    param_bytes: int
    state_bytes: int
    activation_bytes: int
    input_bytes: int

    def totals(self) -> dict:
        out = asdict(self)
        del out["rows"]
        out["input_shape"] = list(self.input_shape)
        out["non_trainable_params"] = self.total_params - self.trainable_params
        out["total_bytes"] = self.param_bytes + self.state_bytes + self.activation_bytes + self.input_bytes
        return out


def _layer_of(name: str) -> str:
    head, _, _ = name.rpartition(".")
    return head or name


def _common_prefix(a: str | None, b: str | None) -> str:
    if not a or not b:
        return _OTHER
    common = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        common.append(x)
    return ".".join(common) or _OTHER


def _first_tensor(out) -> torch.Tensor | None:
    for leaf in tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


def _flops(func, args, kwargs, out) -> int:
    packet = func._overloadpacket
    if packet in flop_registry:
        return int(flop_registry[packet](*args, **kwargs, out_val=out))
    if packet is _aten._scaled_dot_product_flash_attention_for_cpu:
        q, k, v = args[:3]
        return int(sdpa_flop_count(q.shape, k.shape, v.shape))
    return 0


_VIEWS = {_aten._unsafe_view.default, _aten.reshape.default}
_RESHAPES = {_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default}


class _LayerTracer(TorchDispatchMode):
    """Attributes every executed op to the layer whose params it reads (see the module doc).

    Tags (weakly keyed by tensor): ("param", layer or None) for params, state and tensors computed
    from them alone (None: constants); ("act", shape-before-view or None) for everything else.
    Untagged tensors (the input) count as activations.
    """

    def __init__(self, named_tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.tags = WeakIdKeyDictionary()
        for name, t in named_tensors.items():
            self.tags[t] = ("param", _layer_of(name))
        self.acc: dict[str, list] = {}  # layer -> [output shape, element size, flops]
        self.last_layer: str | None = None
        self.pending_flops = 0
        self.pending_out: tuple | None = None
        self.pending_tensor: torch.Tensor | None = None

    def _entry(self, name: str) -> list:
        return self.acc.setdefault(name, [None, 4, 0])

    def _flush(self, next_layer: str | None) -> None:
        if self.pending_flops:
            entry = self._entry(_common_prefix(self.last_layer, next_layer))
            entry[2] += self.pending_flops
            if self.pending_out is not None:
                entry[0], entry[1] = self.pending_out
        self.pending_flops, self.pending_out, self.pending_tensor = 0, None, None

    def finish(self) -> None:
        self._flush(None)

    def _inputs(self, args, kwargs) -> tuple[list[str], list]:
        """The layers whose parameters an op reads (in order, once each) and its activations' tags."""
        layers: list[str] = []
        act_tags: list = []
        for t in tree_leaves((args, kwargs)):
            if not isinstance(t, torch.Tensor):
                continue
            tag = self.tags.get(t)
            if tag is not None and tag[0] == "param":
                if tag[1] is not None and tag[1] not in layers:
                    layers.append(tag[1])
            else:
                act_tags.append(tag)
        return layers, act_tags

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in flop_registry and func is not torch.ops.prim.device.default:
            with self:  # as FlopCounterMode: look inside composite ops for counted ones
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        flops = _flops(func, args, kwargs, out)

        layers, act_tags = self._inputs(args, kwargs)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        first = outs[0] if outs else None

        if not act_tags:  # computed from params/constants alone
            tag = ("param", layers[0] if layers else None)
            for t in outs:
                self.tags[t] = tag
            return out

        if layers:  # an op of layer `layer` applied to activations
            layer = layers[0]
            if layer != self.last_layer:
                self._flush(layer)
                self.last_layer = layer
            entry = self._entry(layer)
            entry[2] += flops
            if first is not None:
                shape = tuple(first.shape)
                before_view = act_tags[0][1] if act_tags[0] is not None else None
                if func._overloadpacket in (_aten.mm, _aten.addmm) and before_view is not None \
                        and math.prod(before_view[:-1]) == shape[0]:
                    shape = (*before_view[:-1], shape[-1])  # a linear on [..., C] flattened to 2-D
                entry[0], entry[1] = shape, first.element_size()
            for t in outs:
                self.tags[t] = ("act", None)
            return out

        # a parameter-free op on activations
        self.pending_flops += flops
        src = _first_tensor(args)
        is_view = func.is_view or func in _VIEWS
        reshaped = func in _RESHAPES and src is not None and src is self.pending_tensor
        if first is not None and (flops or reshaped):
            # the group's output: the last counted op's, followed through views (a bmm on [N*heads, L, d]
            # viewed back to [N, heads, L, d] reads as the fused attention kernel's output)
            self.pending_tensor = first
            self.pending_out = (tuple(first.shape), first.element_size())
        for t in outs:
            self.tags[t] = ("act", tuple(src.shape) if is_view and src is not None else None)
        return out


def available_memory(device: str | torch.device = "cpu") -> int | None:
    """Bytes that can be allocated on ``device`` now, or None where that is not known.

    CPU: ``runtime.host_memory_available`` (MemAvailable, capped by the process's cgroup); CUDA:
    the free memory ``torch.cuda.mem_get_info`` reports; meta: unlimited (None).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return host_memory_available()
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def check_fits(s: ModelSummary, device: str | torch.device = "cpu") -> None:
    """Raise a one-line ValueError if the summary's estimated total bytes exceed :func:`available_memory`."""
    available = available_memory(device)
    total = s.param_bytes + s.state_bytes + s.activation_bytes + s.input_bytes
    if available is not None and total > available:
        raise ValueError(
            f"{s.model_name}: input {list(s.input_shape)} needs an estimated {_gb(total)} on {torch.device(device)} "
            f"({s.total_params:,} parameters, {_gb(s.param_bytes)}; activations {_gb(s.activation_bytes)}; "
            f"state and input {_gb(s.state_bytes + s.input_bytes)}) but only {_gb(available)} is available")


def _init_on(model, device: torch.device) -> tuple[dict, dict]:
    if device.type == "meta":  # shapes only: nothing is drawn or allocated
        with torch.device("meta"):
            params, state = model.init(jr.key(0, device="meta"))
    else:
        params, state = model.init(jr.key(0))
    return tree_map(lambda t: t.to(device), params), tree_map(lambda t: t.to(device), state)


def summarize(model, input_size: int | Sequence[int] = (128, 128), batch_size: int = 1, *,
              device: str | torch.device = "cpu") -> ModelSummary:
    """Measure ``model`` (a :class:`functional_seg.models.Model`) on a [batch, C_in, H, W] input.

    Args:
        input_size: H, W (or one int for a square); must be divisible by the model's stride.
        batch_size: N; mult-adds and activation sizes scale with it.
        device: where to run. "meta" dispatches the same ops on shapes only and gives the same
            figures in a fraction of the time (initialising a big model on CPU dominates otherwise).
    Returns:
        A :class:`ModelSummary`.
    Raises:
        ValueError: the input size does not suit the model, or (on a real device) the estimate from
            the meta-device pass does not fit in the memory available there (:func:`check_fits`).
    """
    device = torch.device(device)
    estimate = _measure(model, input_size, batch_size, torch.device("meta"))
    if device.type == "meta":
        return estimate
    check_fits(estimate, device)
    return _measure(model, input_size, batch_size, device)


def _measure(model, input_size: int | Sequence[int], batch_size: int, device: torch.device) -> ModelSummary:
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    x = torch.zeros(batch_size, model.in_channels, h, w, device=device)
    model.check_input(x)
    params, state = _init_on(model, device)

    named = {**flatten_with_names(params), **flatten_with_names(state)}
    own_params: dict[str, int] = {}
    for name, t in flatten_with_names(params).items():
        own_params[_layer_of(name)] = own_params.get(_layer_of(name), 0) + t.numel()

    tracer = _LayerTracer(named)
    with torch.no_grad(), tracer:
        model.apply(params, state, x, train=False)
    tracer.finish()

    rows = [LayerRow(name, shape, own_params.get(name, 0), flops // 2)
            for name, (shape, _, flops) in tracer.acc.items()]
    rows += [LayerRow(name, None, n, 0) for name, n in own_params.items() if name not in tracer.acc]
    activation_bytes = sum(math.prod(shape) * size for shape, size, _ in tracer.acc.values() if shape is not None)
    total_params = tree_size(params)
    trainable = sum(t.numel() for t in flatten_with_names(params).values() if t.is_floating_point())
    return ModelSummary(
        model_name=model.name,
        input_shape=tuple(x.shape),
        rows=tuple(rows),
        total_params=total_params,
        trainable_params=trainable,
        total_mult_adds=sum(r.mult_adds for r in rows),
        param_bytes=tree_bytes(params),
        state_bytes=tree_bytes(state),
        activation_bytes=activation_bytes,
        input_bytes=x.numel() * x.element_size(),
    )


def _num(n: int) -> str:
    return f"{n:,}" if n else "--"


def _scaled(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:,}"


def format_summary(s: ModelSummary) -> str:
    """The summary as a torchinfo-like text table."""
    name_w = max([len("Layer (dotted name)"), *(len(r.name) for r in s.rows)])
    shapes = [str(list(r.output_shape)) if r.output_shape is not None else "--" for r in s.rows]
    shape_w = max([len("Output shape"), *(len(x) for x in shapes)])
    cols = (name_w, shape_w, 14, 18)
    rule = "=" * (sum(cols) + 3 * 2)

    def line(a, b, c, d):
        return f"{a:<{cols[0]}}  {b:<{cols[1]}}  {c:>{cols[2]}}  {d:>{cols[3]}}"

    mb = 1 / 2**20
    out = [
        f"{s.model_name}: input {list(s.input_shape)}",
        rule,
        line("Layer (dotted name)", "Output shape", "Param #", "Mult-adds"),
        rule,
        *(line(r.name, shape, _num(r.params), _num(r.mult_adds)) for r, shape in zip(s.rows, shapes)),
        rule,
        f"Total params: {s.total_params:,}",
        f"Trainable params: {s.trainable_params:,}",
        f"Non-trainable params: {s.total_params - s.trainable_params:,}",
        f"Total mult-adds: {s.total_mult_adds:,} ({_scaled(s.total_mult_adds)})",
        rule,
        f"Input size (MB): {s.input_bytes * mb:.2f}",
        f"Forward pass size (MB): {s.activation_bytes * mb:.2f}",
        f"Params size (MB): {s.param_bytes * mb:.2f}",
        f"State (batch-norm statistics) size (MB): {s.state_bytes * mb:.2f}",
        f"Estimated total size (MB): {(s.input_bytes + s.activation_bytes + s.param_bytes + s.state_bytes) * mb:.2f}",
        rule,
    ]
    return "\n".join(out)
