"""Fine-tuning a pretrained encoder-decoder model through ``fit``: the encoder's learning-rate
multiplier, freezing it (and its batch-norm statistics) for the first epochs, starting from another
run's weights with another number of classes, and resuming without the pretrained weights file.

Model: a U-Net decoder over timm's tiny ``test_efficientnet`` encoder, whose "pretrained" weights
are a safetensors file the test writes; data: 16 synthetic images at 32 px, batch 8.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from functional_seg import checkpoint as ckpt
from functional_seg.core import random as jr
from functional_seg.core.tree import flatten_with_names
from functional_seg.data import Splits, make_generic_dataset, make_synthetic_dataset, prepare
from functional_seg.models import create_encoder, create_model
from functional_seg.train import FitConfig, OptimizerConfig, fit

CFG = dict(encoder="test_efficientnet", decoder_channels=(16, 8, 8, 8, 8))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A "pretrained" encoder: random weights saved as a state dict file, as a user would have one."""
    encoder = create_encoder("test_efficientnet")
    params, state = encoder.init(jr.key(7))
    path = tmp_path_factory.mktemp("w") / "encoder.safetensors"
    save_file({**flatten_with_names(params), **flatten_with_names(state)}, str(path))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "pets", n_trainval=16, n_test=4, size=48)
    return prepare(root, "trainval", 32, cache_dir=tmp_path_factory.mktemp("cache"), workers=1)


def _config(**kw):
    return FitConfig(batch_size=8, epochs=kw.pop("epochs", 2), optimizer=OptimizerConfig(name="adamw", lr=1e-2,
                     weight_decay=0.1), device="cpu", augment="none", log_every=1, **kw)


def _encoder(tree, k=None):
    return flatten_with_names(tree["encoder"])


def _run(model, data, out, **kw):
    fit(model, Splits(data), _config(**kw), out_dir=out, hooks=[])
    return ckpt.load(out / "last.safetensors")[0]


def test_the_encoder_starts_from_its_weights_and_frozen_epochs_leave_it_alone(weights, data, tmp_path):
    model = create_model("unet", **CFG, encoder_weights=str(weights))
    params, state = model.init(jr.key(0))
    given = dict(zip(flatten_with_names(params["encoder"]), flatten_with_names(params["encoder"]).values()))
    from safetensors.torch import load_file

    file = load_file(str(weights))
    assert all(torch.equal(given[n], file[n]) for n in given)  # init read the file
    one = _run(model, data, tmp_path / "frozen", epochs=1, freeze_encoder_epochs=1)
    for name, value in flatten_with_names(one["params"]["encoder"]).items():
        assert torch.equal(value, file[name]), name  # no gradient, and AdamW's decay did not shrink it
    for name, value in flatten_with_names(one["state"]["encoder"]).items():
        assert torch.equal(value, file[name]), name  # batch-norm statistics frozen with it
    assert not all(torch.equal(a, b) for a, b in zip(flatten_with_names(one["params"]["decoder"]).values(),
                                                     flatten_with_names(params["decoder"]).values()))
    two = _run(model, data, tmp_path / "thawed", epochs=2, freeze_encoder_epochs=1)
    moved = [n for n, v in flatten_with_names(two["params"]["encoder"]).items() if not torch.equal(v, file[n])]
    assert moved  # from epoch 2 on the encoder trains


def test_an_encoder_learning_rate_multiplier_of_zero_freezes_its_weights_only(weights, data, tmp_path):
    model = create_model("unet", **CFG, encoder_weights=str(weights))
    out = _run(model, data, tmp_path / "run", epochs=1, encoder_lr=0.0)
    from safetensors.torch import load_file

    file = load_file(str(weights))
    assert all(torch.equal(v, file[n]) for n, v in flatten_with_names(out["params"]["encoder"]).items())
    with pytest.raises(ValueError, match="apply to encoder-decoder models only"):
        fit(create_model("segnet", widths=(4, 8), convs_per_stage=(1, 1)), Splits(data), _config(encoder_lr=0.1),
            out_dir=tmp_path / "segnet", hooks=[])


def test_init_from_another_run_re_initialises_only_the_head_of_another_class_count(weights, data, tmp_path):
    model = create_model("unet", **CFG, encoder_weights=str(weights))
    source = _run(model, data, tmp_path / "pets", epochs=1)
    root = make_generic_dataset(tmp_path / "five", num_classes=5, n=20, size=48, seed=1)
    five = prepare(root, "train", 32, cache_dir=tmp_path / "cache", workers=1)
    other = create_model("unet", **CFG, num_classes=len(five.class_names))
    named = r"2 of \d+ tensors re-initialised .*params\.head\.weight \(\[3, 8, 3, 3\] -> \[5, 8, 3, 3\]\)"
    with pytest.warns(UserWarning, match=named):
        fit(other, Splits(five), _config(epochs=1, max_steps=1, init_from=str(tmp_path / "pets" / "last.safetensors")),
            out_dir=tmp_path / "five_run", hooks=[])
    with pytest.raises(ValueError, match="shares no tensor"):
        fit(create_model("segnet", widths=(4, 8), convs_per_stage=(1, 1)), Splits(data),
            _config(init_from=str(tmp_path / "pets" / "last.safetensors")), out_dir=tmp_path / "bad", hooks=[])
    assert source["params"]["head"]["weight"].shape[0] == 3


def test_a_pretrained_run_resumes_after_its_weights_file_is_gone(weights, data, tmp_path):
    copy = tmp_path / "encoder.safetensors"
    copy.write_bytes(weights.read_bytes())
    model = create_model("unet", **CFG, encoder_weights=str(copy))
    whole = _run(model, data, tmp_path / "whole", epochs=2)
    _run(model, data, tmp_path / "half", epochs=1)
    copy.unlink()  # the machine that resumes has no weights file: the checkpoint holds every weight
    resumed = fit(model, Splits(data), _config(epochs=2), out_dir=tmp_path / "half", resume=True, hooks=[])
    a, b = flatten_with_names(resumed.train_state.params), flatten_with_names(whole["params"])
    assert all(torch.equal(a[n], b[n]) for n in b)
