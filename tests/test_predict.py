"""Predict: masks at each input's own size (real sample images), tiles that change nothing when one
tile holds the image, flip TTA that is flip-equivariant, outputs that never overwrite each other,
a bad file that stops nothing, 16-bit PNGs read at the right scale, and letterboxed pad-policy input.

The CLI is called through ``functional_seg.cli.main``; the laws are checked on ``Predictor`` logits.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sample_data import SAMPLE
from tiny_models import make_checkpoint

from functional_seg.cli import main
from functional_seg.data.labels import unnamed
from functional_seg.data.preprocess import Preprocess
from functional_seg.models import load_checkpoint
from functional_seg.models.saved import preprocess_of
from functional_seg.predict import Predictor, output_names
from functional_seg.render import is_ours
from functional_seg.runtime import resolve_runtime

S = 32
NAMES = ("pet", "background", "border")
SAMPLE_IMAGES = sorted((SAMPLE / "images").glob("*.jpg"))
needs_sample = pytest.mark.skipif(not SAMPLE_IMAGES, reason=f"the real sample is not at {SAMPLE}")


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "segnet.safetensors"
    make_checkpoint(path, "segnet", size=S)
    return path


def _predictor(ck, **kwargs) -> Predictor:
    return Predictor.from_checkpoint(load_checkpoint(ck), resolve_runtime("cpu", "fp32"), **kwargs)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _distinct_sizes(n: int):
    seen, out = set(), []
    for path in SAMPLE_IMAGES:
        with Image.open(path) as im:
            if im.size not in seen:
                seen.add(im.size)
                out.append(path)
        if len(out) == n:
            break
    return out


@needs_sample
def test_masks_have_each_input_size_and_shares_name_classes(ck, tmp_path, capsys):
    images = _distinct_sizes(3)
    assert main(["predict", "--checkpoint", str(ck), *map(str, images), "--out", str(tmp_path), "--device", "cpu",
                 "--batch-size", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3
    for path, line in zip(images, out):
        with Image.open(path) as im:
            size = im.size
        mask = Image.open(tmp_path / f"{path.stem}_mask.png")
        assert mask.mode == "P" and mask.size == size
        assert set(np.unique(np.asarray(mask))) <= {0, 1, 2}
        assert mask.getpalette()[:9] != [0] * 9  # classes get colours
        overlay = Image.open(tmp_path / f"{path.stem}_overlay.png")
        assert overlay.size[0] >= size[0] and overlay.size[1] > size[1]  # image above its legend
        assert str(path) in line and all(f"{name} " in line for name in NAMES) and "%" in line
    shares = [float(part.split()[-1].rstrip("%)")) for part in out[0].split("(")[1].split(",")]
    assert sum(shares) == pytest.approx(100, abs=0.2)


@needs_sample
def test_a_folder_is_all_its_images_sorted(ck, tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for path in SAMPLE_IMAGES[:2]:
        shutil.copy(path, folder / path.name)
    shutil.copy(SAMPLE_IMAGES[2], folder / "sub" / SAMPLE_IMAGES[2].name)  # not recursive
    (folder / "notes.txt").write_text("not an image")
    assert main(["predict", "--checkpoint", str(ck), str(folder), "--out", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" -> ")[0] for line in lines] == [str(folder / p.name) for p in SAMPLE_IMAGES[:2]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{p.stem}_{kind}.png" for p in SAMPLE_IMAGES[:2] for kind in ("mask", "overlay"))


def test_tiled_equals_untiled_when_one_tile_holds_the_image(ck):
    image = _image(S, S)
    whole = _predictor(ck).logits([image])[0]
    for tile in (S, 2 * S):
        tiled = _predictor(ck, tile=tile).logits([image])[0]
        torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


def test_tiled_blends_overlapping_windows_to_the_image_size(ck):
    image = _image(70, 100, seed=1)
    predictor = _predictor(ck, tile=S, tile_overlap=0.5, batch_size=5)
    logits = predictor.logits([image])[0]
    assert logits.shape == (3, 70, 100) and torch.isfinite(logits).all()
    # inside the first window and outside all others' reach, the blend is that window alone
    first = _predictor(ck).logits([image[:S, :S]])[0]
    torch.testing.assert_close(logits[:, :4, :4], first[:, :4, :4], atol=1e-5, rtol=1e-5)
    # overlapping windows are averaged: not simply the last one written
    assert not torch.allclose(logits[:, S // 2:S, S // 2:S], first[:, S // 2:S, S // 2:S], atol=1e-3)


def test_flip_tta_is_flip_equivariant_and_changes_the_logits(ck):
    image = _image(S, S, seed=2)
    tta, plain = _predictor(ck, tta="flip"), _predictor(ck)
    a = tta.logits([image])[0]
    b = tta.logits([np.ascontiguousarray(image[:, ::-1])])[0]
    torch.testing.assert_close(b, a.flip(-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, plain.logits([image])[0], atol=1e-4)
    # a horizontally symmetric image gets a symmetric TTA prediction
    sym = np.concatenate([image[:, : S // 2], image[:, : S // 2][:, ::-1]], axis=1)
    c = tta.logits([sym])[0]
    torch.testing.assert_close(c, c.flip(-1), atol=1e-5, rtol=1e-5)


def test_batches_give_what_single_images_give(ck):
    images = [_image(40 + 8 * i, 50, seed=i) for i in range(3)]
    one = _predictor(ck, batch_size=1).logits(images)
    many = _predictor(ck, batch_size=3).logits(images)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_same_names_in_two_folders_give_two_outputs(ck, tmp_path, capsys):
    for folder, seed in (("a", 0), ("b", 1)):
        (tmp_path / folder).mkdir()
        Image.fromarray(_image(40, 48, seed)).save(tmp_path / folder / "cat.png")
    Image.fromarray(_image(40, 48, 3)).save(tmp_path / "a" / "cat.jpg")
    inputs = [tmp_path / "a" / "cat.png", tmp_path / "b" / "cat.png", tmp_path / "a" / "cat.jpg"]
    assert main(["predict", "--checkpoint", str(ck), *map(str, inputs), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--no-overlay"]) == 0
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["a/cat_jpg_mask.png", "a/cat_png_mask.png", "b/cat_mask.png"]
    assert output_names(inputs[:1]) == [output_names(inputs[:1])[0]] and str(output_names(inputs[:1])[0]) == "cat"


def test_a_bad_image_stops_nothing(ck, tmp_path, capsys):
    good = [tmp_path / "a.png", tmp_path / "c.png"]
    for i, path in enumerate(good):
        Image.fromarray(_image(36, 44, i)).save(path)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rc = main(["predict", "--checkpoint", str(ck), str(good[0]), str(bad), str(good[1]), "--out",
               str(tmp_path / "out"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 2
    for path in good:
        assert (tmp_path / "out" / f"{path.stem}_mask.png").exists()
    assert not (tmp_path / "out" / "b_mask.png").exists()
    errors = captured.err.splitlines()
    assert len([line for line in errors if str(bad) in line]) == 1
    assert errors[-1] == f"fseg: error: 1 of 3 images failed; the other 2 were written to {tmp_path / 'out'}"
    assert len(captured.out.splitlines()) == 2


def test_a_16_bit_png_is_predicted_from_correctly_scaled_pixels(ck, tmp_path):
    grey8 = _image(40, 52, seed=5)[..., 0]
    Image.fromarray(grey8, mode="L").save(tmp_path / "g8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # mode I;16
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    from functional_seg.data.decode import read_rgb

    predictor = _predictor(ck)
    a, b = predictor.logits([read_rgb(tmp_path / "g8.png"), read_rgb(tmp_path / "g16.png")])
    torch.testing.assert_close(b, a)
    assert not torch.allclose(predictor.logits([np.full((40, 52, 3), 255, np.uint8)])[0], a)  # not clipped white


def test_pad_policy_letterboxes_and_crops_the_logits_back(tmp_path):
    path = tmp_path / "pad.safetensors"
    model, params, state, pre = make_checkpoint(path, "segnet", size=S, policy="pad")
    assert load_checkpoint(path).preprocess.policy == "pad"
    predictor = _predictor(path)
    image = _image(S // 2, S, seed=6)  # fits the width exactly: no resampling, rows 8..24 of the canvas
    logits = predictor.logits([image])[0]
    canvas = np.zeros((S, S, 3), np.uint8)
    canvas[S // 4:S // 4 + S // 2] = image
    x = pre.model_input(torch.from_numpy(canvas).permute(2, 0, 1)[None])
    with torch.no_grad():
        full = model.apply(params, state, x, train=False)[0][0]
    torch.testing.assert_close(logits, full[:, S // 4:S // 4 + S // 2], atol=1e-5, rtol=1e-5)
    assert predictor.logits([_image(50, 30)])[0].shape == (3, 50, 30)


def test_checkpoints_without_preprocess_fall_back_to_their_size(tmp_path):
    path = tmp_path / "old.safetensors"
    make_checkpoint(path, "segnet", size=S, preprocess=False)
    assert load_checkpoint(path).preprocess == Preprocess(size=S, class_names=unnamed(3))
    assert preprocess_of({"args": {"size": 48}}, 2) == Preprocess(size=48, class_names=unnamed(2))
    assert preprocess_of({"preprocess": Preprocess(size=64, policy="pad").to_dict()}, 3).policy == "pad"


def test_cli_options_reach_the_predictor(ck, tmp_path, capsys):
    Image.fromarray(_image(80, 90)).save(tmp_path / "big.png")
    assert main(["predict", "--checkpoint", str(ck), str(tmp_path / "big.png"), "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--tile", "32", "--tile-overlap", "0.5", "--tta", "flip"]) == 0
    assert Image.open(tmp_path / "o" / "big_mask.png").size == (90, 80)
    assert main(["predict", "--checkpoint", str(ck), str(tmp_path / "big.png"), "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--tile", "2"]) == 2
    assert "smaller than the model's stride" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(ck), str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
                 "--device", "cpu"]) == 2
    assert "nothing" in capsys.readouterr().err


def test_a_second_run_into_the_input_folder_skips_our_outputs_and_never_touches_the_users(ck, tmp_path, capsys):
    folder = tmp_path / "pets"
    folder.mkdir()
    Image.fromarray(_image(36, 44, 0)).save(folder / "x.jpg")
    Image.fromarray(_image(30, 40, 1)).save(folder / "y.jpg")
    Image.fromarray(np.full((36, 44), 1, np.uint8), mode="L").save(folder / "x_mask.png")  # the user's own mask
    users = (folder / "x_mask.png").read_bytes()
    argv = ["predict", "--checkpoint", str(ck), str(folder), "--out", str(folder), "--device", "cpu"]
    assert main(argv) == 2
    first = capsys.readouterr()
    refused = [line for line in first.err.splitlines() if "x_mask.png" in line and "not overwriting" in line]
    assert len(refused) == 1 and str(folder / "x.jpg") in refused[0]
    assert (folder / "x_mask.png").read_bytes() == users
    ours = {"y_mask.png", "y_overlay.png", "x_mask_mask.png", "x_mask_overlay.png"}  # the user's PNG is an image
    assert ours <= {p.name for p in folder.iterdir()} and all(is_ours(folder / name) for name in ours)
    assert main(argv) == 2
    second = capsys.readouterr()
    assert f"fseg: skipped {len(ours)} PNG file(s) that fseg wrote" in second.err
    assert [line.split(" -> ")[0] for line in second.out.splitlines()] == [str(folder / "x_mask.png"),
                                                                          str(folder / "y.jpg")]
    assert (folder / "x_mask.png").read_bytes() == users and not is_ours(folder / "x_mask.png")
    assert second.err.splitlines()[-1] == f"fseg: error: 1 of 3 images failed; the other 2 were written to {folder}"


def test_hidden_files_in_a_folder_are_not_images(ck, tmp_path, capsys):
    folder = tmp_path / "copied"
    folder.mkdir()
    Image.fromarray(_image(30, 30, 2)).save(folder / "x.jpg")
    (folder / "._x.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")  # AppleDouble
    Image.fromarray(_image(30, 30, 3)).save(folder / ".hidden.png")  # readable, but hidden all the same
    assert main(["predict", "--checkpoint", str(ck), str(folder), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--no-overlay"]) == 0
    assert [line.split(" -> ")[0] for line in capsys.readouterr().out.splitlines()] == [str(folder / "x.jpg")]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x_mask.png"]


def test_only_our_pngs_carry_the_mark(ck, tmp_path):
    assert main(["predict", "--checkpoint", str(ck), str(_save(tmp_path / "a.png", _image(20, 20))), "--out",
                 str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert is_ours(tmp_path / "out" / "a_mask.png") and is_ours(tmp_path / "out" / "a_overlay.png")
    with Image.open(tmp_path / "out" / "a_mask.png") as im:
        assert im.info["Software"] == "functional_seg"
    Image.fromarray(_image(20, 20)).save(tmp_path / "b.jpg")
    (tmp_path / "c.png").write_bytes(b"not a png")
    for other in ("a.png", "b.jpg", "c.png", "missing.png"):
        assert not is_ours(tmp_path / other)
    assert not is_ours(tmp_path)  # a folder


def _save(path, image: np.ndarray):
    Image.fromarray(image).save(path)
    return path
