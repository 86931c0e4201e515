"""Full-resolution evaluation (``fseg eval --full-res``) and non-square sizes at the edges (predict,
export, the CLI).

The scorer's counts are checked against an independent count: the original trimaps read with PIL,
mapped by hand (1 pet, 2 background, 3 border -> 0, 1, 2) and counted with numpy, against the
predictor's argmax at each image's own size.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sample_data import SAMPLE
from tiny_models import TINY, make_checkpoint

from functional_seg.cli import main
from functional_seg.data import make_synthetic_dataset
from functional_seg.data.errors import DataError
from functional_seg.data.splits import DataConfig
from functional_seg.models import create_model, load_checkpoint
from functional_seg.predict import Predictor
from functional_seg.runtime import resolve_runtime
from functional_seg.train import FitConfig, fit
from functional_seg.train.full_res import evaluate_full_res
from functional_seg.train.log import format_fit_result

PETS = SAMPLE / "oxford-iiit-pet" if (SAMPLE / "oxford-iiit-pet").is_dir() else SAMPLE
pytestmark = pytest.mark.skipif(not (PETS / "annotations" / "test.txt").is_file(), reason="no pet sample")
C = 3


def _names() -> list[str]:
    """Four test images of different sizes, and the palette-mode one (a wart of the release)."""
    lines = (PETS / "annotations" / "test.txt").read_text().splitlines()
    names = [line.split()[0] for line in lines if line.strip()]
    return names[:4] + ["Abyssinian_5"]


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    """A copy of five test samples in the official layout (the scorer reads the original files)."""
    root = tmp_path_factory.mktemp("pets") / "oxford-iiit-pet"
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    lines = {line.split()[0]: line for line in (PETS / "annotations" / "test.txt").read_text().splitlines() if line}
    for name in _names():
        shutil.copy(PETS / "images" / f"{name}.jpg", root / "images")
        shutil.copy(PETS / "annotations" / "trimaps" / f"{name}.png", root / "annotations" / "trimaps")
    (root / "annotations" / "test.txt").write_text("".join(f"{lines[n]}\n" for n in _names()))
    (root / "annotations" / "trainval.txt").write_text(f"{lines[_names()[0]]}\n")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "best.safetensors"
    make_checkpoint(path, "segnet", size=32, layout="oxford_pets", perturb_stats=False)  # predicts every class
    return path


def _numpy_confusion(pets, checkpoint) -> np.ndarray:
    """sum over images of bincount(truth * C + argmax), truth from the trimap file, at its own size."""
    loaded = load_checkpoint(checkpoint, device="cpu")
    predictor = Predictor.from_checkpoint(loaded, resolve_runtime("cpu"))
    total = np.zeros((C, C), np.int64)
    for name in _names():
        image = np.asarray(Image.open(pets / "images" / f"{name}.jpg").convert("RGB"))
        trimap = np.asarray(Image.open(pets / "annotations" / "trimaps" / f"{name}.png"))
        truth = trimap.astype(np.int64) - 1  # 1, 2, 3 -> pet 0, background 1, border 2
        pred = predictor.logits([image])[0].argmax(0).numpy()
        assert pred.shape == truth.shape == image.shape[:2]
        total += np.bincount((truth * C + pred).reshape(-1), minlength=C * C).reshape(C, C)
    assert (total > 0).all()  # every (truth, prediction) pair occurs: the count can tell pixels apart
    return total


def test_full_res_counts_match_numpy_on_the_original_trimaps(pets, checkpoint, capsys):
    expected = _numpy_confusion(pets, checkpoint)
    assert expected.sum() == sum(np.asarray(Image.open(pets / "annotations" / "trimaps" / f"{n}.png")).size
                                 for n in _names())
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(pets.parent), "--split", "test",
                 "--full-res", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["resolution"] == "full" and result["images"] == len(_names())
    summary = result["summary"]
    np.testing.assert_array_equal(np.asarray(summary["confusion"]), expected)
    tp = np.diag(expected)
    iou = tp / (expected.sum(0) + expected.sum(1) - tp)
    assert summary["mean_iou"] == pytest.approx(float(np.nanmean(iou)))
    assert summary["pixel_accuracy"] == pytest.approx(tp.sum() / expected.sum())
    assert "series_iou" in summary and "boundary_width_px" not in summary  # Oxford figures; the band varies
    assert 0.0 <= summary["mean_boundary_iou"] <= 1.0 and sum(summary["calibration_counts"][0]) == expected.sum()


def test_full_res_differs_from_the_prepared_square_and_says_which_is_which(pets, checkpoint, capsys, tmp_path):
    common = ["eval", "--checkpoint", str(checkpoint), "--data", str(pets.parent), "--split", "test",
              "--device", "cpu", "--cache-dir", str(tmp_path)]
    assert main(common) == 0
    square = capsys.readouterr().out
    assert main([*common, "--full-res"]) == 0
    full = capsys.readouterr().out
    assert "at 32x32 (resize), the prepared images and masks" in square.splitlines()[0]
    assert "at full resolution" in full.splitlines()[0]
    loaded = load_checkpoint(checkpoint, device="cpu")
    full_total = evaluate_full_res(loaded, pets.parent, "test", runtime=resolve_runtime("cpu"))
    assert np.asarray(full_total["summary"]["confusion"]).sum() > 5 * 32 * 32  # original pixels, not the square


def test_full_res_names_a_mask_of_the_wrong_size(pets, checkpoint, tmp_path):
    bad = tmp_path / "oxford-iiit-pet"
    shutil.copytree(pets, bad)
    name = _names()[1]
    Image.open(bad / "annotations" / "trimaps" / f"{name}.png").resize((7, 5)).save(
        bad / "annotations" / "trimaps" / f"{name}.png")
    with pytest.raises(DataError, match=rf"{name}\.png.*7x5.*expected the same size"):
        evaluate_full_res(checkpoint, tmp_path, "test", runtime=resolve_runtime("cpu"))
    with pytest.warns(UserWarning, match="1 of 5 samples"):
        result = evaluate_full_res(checkpoint, tmp_path, "test", runtime=resolve_runtime("cpu"), strict=False)
    assert result["images"] == 4


def test_full_res_with_tiles_covers_every_pixel_once(pets, checkpoint):
    whole = evaluate_full_res(checkpoint, pets.parent, "test", runtime=resolve_runtime("cpu"))
    tiled = evaluate_full_res(checkpoint, pets.parent, "test", runtime=resolve_runtime("cpu"), tile=64)
    assert np.asarray(tiled["summary"]["confusion"]).sum() == np.asarray(whole["summary"]["confusion"]).sum()


def test_a_non_square_checkpoint_predicts_and_exports_at_its_size(tmp_path, capsys):
    path = tmp_path / "wide.safetensors"
    make_checkpoint(path, "unet", size=(16, 32))
    loaded = load_checkpoint(path, device="cpu")
    assert loaded.preprocess.size == (16, 32)
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    logits = Predictor.from_checkpoint(loaded, resolve_runtime("cpu")).logits([image])[0]
    assert logits.shape == (C, 50, 70)
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "wide.pt2"), "--format", "pt2"]) == 0
    program = torch.export.load(str(tmp_path / "wide.pt2"))
    assert program.module()(torch.rand(1, 3, 16, 32)).shape == (1, C, 16, 32)
    out = capsys.readouterr().out
    assert "[N, 3, H, W]" in out or "[N, 3, 16, 32]" in out


@pytest.mark.parametrize("flag", ["0x32", "16x", "wide"])
def test_size_flags_refuse_a_malformed_size(flag, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["predict", "--checkpoint", str(tmp_path / "x.safetensors"), str(tmp_path), "--out", str(tmp_path),
              "--size", flag])
    assert "--size" in capsys.readouterr().err


def test_fit_scores_the_test_split_at_full_resolution_too(tmp_path, capsys):
    root = make_synthetic_dataset(tmp_path / "syn", n_trainval=16, n_test=5, size=(40, 56))
    config = FitConfig(batch_size=8, epochs=1, device="cpu", augment="none", log_every=1,
                       data=DataConfig(size=32, val_split="none", test_limit=4, full_res_test=True))
    result = fit(create_model("segnet", **TINY["segnet"]), root, config, out_dir=tmp_path / "run", hooks=[])
    test = json.loads((tmp_path / "run" / "test.json").read_text())
    assert test["resolution"] == "32x32 (resize)" and test["full_res"]["resolution"] == "full"
    assert test["full_res"]["images"] == 4 == test["images"]
    names = [line.split()[0] for line in (root / "annotations" / "test.txt").read_text().splitlines()][:4]
    pixels = np.zeros(C, np.int64)  # the original trimaps' labelled pixels per class, counted with numpy
    for name in names:
        trimap = np.asarray(Image.open(root / "annotations" / "trimaps" / f"{name}.png")).astype(np.int64)
        pixels += np.bincount(trimap.reshape(-1) - 1, minlength=C)[:C]
    np.testing.assert_array_equal(np.asarray(test["full_res"]["summary"]["confusion"]).sum(1), pixels)
    assert np.asarray(test["summary"]["confusion"]).sum() == 4 * 32 * 32
    assert "at full resolution: 4 images at their own size" in format_fit_result(result)
