"""``fseg predict --uncertainty``: 16-bit entropy and mutual-information PNGs whose decoded values are
``uncertainty_maps`` of the members' (or flip views') full-size logits, built here from
``model.apply`` + ``F.interpolate``; one member has no disagreement; a single model with flip TTA
gets entropy only; without --uncertainty an ensemble checkpoint predicts with its best member.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_models import make_checkpoint, make_ensemble_checkpoint

from functional_seg.cli import main
from functional_seg.core.tree import tree_leaves, tree_map
from functional_seg.render import is_ours
from functional_seg.uncertainty import UINT16_PER_NAT, uncertainty_maps

S = 32
H, W = 40, 52
HALF_UNIT = 0.5 / UINT16_PER_NAT  # the 16-bit quantisation, in nats


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("in") / "pet.png"
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
    return path


def _member_logits(saved, params, state, path, *, flip: bool = False) -> torch.Tensor:
    """One model's full-size logits [1, C, H, W]: resize to S, apply, ``F.interpolate`` back."""
    model, _, _, pre = saved
    with Image.open(path) as im:
        fitted = np.array(im.convert("RGB").resize((S, S), Image.Resampling.BILINEAR))
    x = pre.model_input(torch.from_numpy(fitted).permute(2, 0, 1)[None])
    with torch.no_grad():
        logits = model.apply(params, state, x.flip(-1) if flip else x, train=False)[0]
    logits = logits.flip(-1) if flip else logits
    return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)


def _members(saved, path) -> torch.Tensor:
    """[K, 1, C, H, W]: every member of a stacked checkpoint."""
    _, params, state, _ = saved
    k = int(tree_leaves(params)[0].shape[0])
    return torch.stack([_member_logits(saved, *tree_map(lambda t, i=i: t[i], (params, state)), path)
                        for i in range(k)])


def _nats(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode.startswith("I;16") and is_ours(path)
        return np.asarray(im).astype(np.float64) / UINT16_PER_NAT


def _predict(ck, image_path, out, *extra) -> int:
    return main(["predict", "--checkpoint", str(ck), str(image_path), "--out", str(out), "--device", "cpu",
                 "--precision", "fp32", *extra])


def test_ensemble_entropy_and_mutual_information_are_the_members_maps(tmp_path, image_path, capsys):
    ck = tmp_path / "ens.safetensors"
    saved = make_ensemble_checkpoint(ck, "segnet", 3, size=S)
    assert _predict(ck, image_path, tmp_path / "out", "--uncertainty") == 0
    logits = _members(saved, image_path)
    entropy, mutual_info = (m[0].numpy() for m in uncertainty_maps(logits))
    assert mutual_info.max() > 1e-3  # the members disagree: the law below is not vacuous
    np.testing.assert_allclose(_nats(tmp_path / "out" / "pet_entropy.png"), entropy, rtol=0, atol=HALF_UNIT + 1e-5)
    np.testing.assert_allclose(_nats(tmp_path / "out" / "pet_mutual_info.png"), mutual_info, rtol=0,
                               atol=HALF_UNIT + 1e-5)
    # the mask is the argmax of the members' mean softmax, where that is not a float tie
    probs = torch.softmax(logits[:, 0], dim=1).mean(0)
    top2 = probs.topk(2, dim=0).values
    clear = (top2[0] - top2[1] > 1e-5).numpy()
    mask = np.asarray(Image.open(tmp_path / "out" / "pet_mask.png"))
    np.testing.assert_array_equal(mask[clear], probs.argmax(0).numpy()[clear])
    heat = Image.open(tmp_path / "out" / "pet_uncertainty.png")
    assert heat.mode == "RGB" and heat.size == (W, H) and is_ours(tmp_path / "out" / "pet_uncertainty.png")
    assert entropy.max() <= math.log(3) + 1e-6


def test_one_member_has_no_mutual_information(tmp_path, image_path):
    ck = tmp_path / "one.safetensors"
    saved = make_ensemble_checkpoint(ck, "segnet", 1, size=S, seed=4)
    assert _predict(ck, image_path, tmp_path / "out", "--uncertainty", "--no-overlay") == 0
    assert not _nats(tmp_path / "out" / "pet_mutual_info.png").any()
    entropy = uncertainty_maps(_members(saved, image_path))[0][0].numpy()
    np.testing.assert_allclose(_nats(tmp_path / "out" / "pet_entropy.png"), entropy, rtol=0, atol=HALF_UNIT + 1e-5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "pet_entropy.png", "pet_mask.png", "pet_mutual_info.png"]  # --no-overlay: no overlays


def test_flip_views_of_one_model_give_entropy_only(tmp_path, image_path, capsys):
    ck = tmp_path / "single.safetensors"
    saved = make_checkpoint(ck, "segnet", size=S, seed=2)
    assert _predict(ck, image_path, tmp_path / "out", "--uncertainty") == 2  # one model, one view: nothing to compare
    assert capsys.readouterr().err.strip().splitlines() == [
        "fseg: error: --uncertainty needs several predictions per pixel: an ensemble checkpoint (all its members) "
        "or --tta flip"]
    assert _predict(ck, image_path, tmp_path / "out", "--uncertainty", "--tta", "flip") == 0
    _, params, state, _ = saved
    views = torch.stack([_member_logits(saved, params, state, image_path, flip=f) for f in (False, True)])
    entropy = uncertainty_maps(views)[0][0].numpy()
    np.testing.assert_allclose(_nats(tmp_path / "out" / "pet_entropy.png"), entropy, rtol=0, atol=HALF_UNIT + 1e-5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "pet_entropy.png", "pet_mask.png", "pet_overlay.png", "pet_uncertainty.png"]


def test_without_uncertainty_an_ensemble_predicts_with_its_best_member(tmp_path, image_path):
    ck = tmp_path / "ens.safetensors"
    saved = make_ensemble_checkpoint(ck, "segnet", 3, size=S, seed=1, selection={"member": 2})
    assert _predict(ck, image_path, tmp_path / "out", "--no-overlay") == 0
    best = _members(saved, image_path)[2, 0]
    top2 = best.topk(2, dim=0).values
    clear = (top2[0] - top2[1] > 1e-4).numpy()
    mask = np.asarray(Image.open(tmp_path / "out" / "pet_mask.png"))
    np.testing.assert_array_equal(mask[clear], best.argmax(0).numpy()[clear])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pet_mask.png"]


def test_tiled_ensemble_uncertainty_covers_the_image(tmp_path, image_path):
    ck = tmp_path / "ens.safetensors"
    make_ensemble_checkpoint(ck, "segnet", 2, size=S, seed=3)
    assert _predict(ck, image_path, tmp_path / "out", "--uncertainty", "--tile", "16", "--tta", "flip") == 0
    entropy, mutual_info = _nats(tmp_path / "out" / "pet_entropy.png"), _nats(tmp_path / "out" / "pet_mutual_info.png")
    assert entropy.shape == mutual_info.shape == (H, W)
    assert (mutual_info <= entropy + 2 * HALF_UNIT).all() and entropy.max() <= math.log(3) + HALF_UNIT
