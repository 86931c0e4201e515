"""``prepare``: decoding, resizing policies, the safetensors cache, and every bad-input case.

Bad-input cases run on a handful of files copied from the real sample into a temp dir (or, when
the sample is absent, from a synthetic dataset with the same warts), so the shared data is never
touched.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sample_data import SAMPLE

import functional_seg.data.cache as prepare_module
from functional_seg.data import (
    IGNORE_INDEX,
    DataError,
    DataWarning,
    PreparedData,
    make_synthetic_dataset,
    prepare,
    read_split,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("syn"), n_trainval=24, n_test=8, size=(20, 44), warts=True
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The real sample if present, else a synthetic dataset with the same warts."""
    if SAMPLE.is_dir():
        return SAMPLE
    return make_synthetic_dataset(tmp_path_factory.mktemp("warty"), n_trainval=8, n_test=4, warts=True)


@pytest.fixture
def sample_copy(tmp_path, source) -> Path:
    """Six trainval and three test samples (the RGBA one among them if real), plus the .mat files."""
    root = tmp_path / "pets"
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    trainval = read_split(source, "trainval")[:6]
    test = [n for n in read_split(source, "test") if n == "Abyssinian_5"] + read_split(source, "test")[:2]
    for name in trainval + test:
        shutil.copyfile(source / "images" / f"{name}.jpg", root / "images" / f"{name}.jpg")
        shutil.copyfile(
            source / "annotations/trimaps" / f"{name}.png", root / "annotations/trimaps" / f"{name}.png"
        )
    for mat in (source / "images").glob("*.mat"):
        shutil.copyfile(mat, root / "images" / mat.name)
    (root / "annotations/trainval.txt").write_text("".join(f"{n} 1 1 1\n" for n in trainval))
    (root / "annotations/test.txt").write_text("".join(f"{n} 1 1 1\n" for n in test))
    return root


def _first(root: Path, split: str = "trainval") -> str:
    return read_split(root, split)[0]


# ------------------------------------------------------------------------------------------ happy path


def test_prepare_shapes_dtypes_and_names(synthetic, tmp_path):
    data = prepare(synthetic, "trainval", 32, cache_dir=tmp_path, workers=1)
    assert isinstance(data, PreparedData) and len(data) == 24
    assert data.images.shape == (24, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.masks.shape == (24, 32, 32) and data.masks.dtype == torch.uint8
    assert set(data.masks.unique().tolist()) == {0, 1, 2}
    assert data.names == tuple(read_split(synthetic, "trainval"))
    assert data.class_counts().tolist() == [int((data.masks == c).sum()) for c in range(3)]


def test_warty_files_decode_to_rgb(synthetic, tmp_path):
    """The synthetic warts: palette GIF, RGBA PNG and greyscale JPEG behind .jpg names, .mat files."""
    data = prepare(synthetic, "trainval", 16, cache_dir=tmp_path, workers=1)
    assert len(data) == 24  # nothing skipped
    grey = data.names.index("Star_1")  # the greyscale one: three equal channels
    assert torch.equal(data.images[grey, 0], data.images[grey, 1])
    assert "Ellipse_9999" not in data.names  # on disk, listed nowhere


def test_process_pool_matches_serial(synthetic, tmp_path):
    serial = prepare(synthetic, "trainval", 24, cache_dir=tmp_path / "a", workers=1)
    pooled = prepare(synthetic, "trainval", 24, cache_dir=tmp_path / "b", workers=2)
    assert torch.equal(serial.images, pooled.images) and torch.equal(serial.masks, pooled.masks)
    assert serial.names == pooled.names


def test_resize_matches_pil_antialiased_bilinear_and_nearest(synthetic, tmp_path):
    data = prepare(synthetic, "test", 12, cache_dir=tmp_path, workers=1)
    name = data.names[0]
    img = (
        Image.open(synthetic / "images" / f"{name}.jpg")
        .convert("RGB")
        .resize((12, 12), Image.Resampling.BILINEAR)
    )
    tri = Image.open(synthetic / "annotations/trimaps" / f"{name}.png").resize(
        (12, 12), Image.Resampling.NEAREST
    )
    assert np.array_equal(data.images[0].permute(1, 2, 0).numpy(), np.asarray(img))
    assert np.array_equal(data.masks[0].numpy(), np.asarray(tri) - 1)


def test_pad_policy_keeps_aspect_and_pads_with_ignore(synthetic, tmp_path):
    data = prepare(synthetic, "trainval", 32, policy="pad", cache_dir=tmp_path, workers=1)
    for i, name in enumerate(data.names[:8]):
        w, h = Image.open(synthetic / "annotations/trimaps" / f"{name}.png").size
        valid = data.masks[i] != IGNORE_INDEX
        rows, cols = valid.any(1).sum().item(), valid.any(0).sum().item()
        assert max(rows, cols) == 32
        assert abs(cols / rows - w / h) < 0.1 * max(w / h, 1)  # aspect kept to rounding
        assert (data.images[i][:, ~valid] == 0).all()  # black canvas under the padding
    assert (data.masks == IGNORE_INDEX).any() and data.class_counts().sum() < data.masks.numel()


def test_repeat_and_mean_std(synthetic, tmp_path):
    data = prepare(synthetic, "test", 8, cache_dir=tmp_path, workers=1)
    big = data.repeat(20)
    assert len(big) == 20 and big.names[8] == data.names[0]
    assert torch.equal(big.images[16:], data.images[:4])
    assert len(data.repeat(3)) == 3
    mean, std = data.mean_std()
    assert len(mean) == 3 and all(0 < m < 1 for m in mean) and all(0 < s < 0.5 for s in std)
    torch.testing.assert_close(
        torch.tensor(mean, dtype=torch.float32),
        data.images.float().mean(dim=(0, 2, 3)) / 255,
        atol=1e-4,
        rtol=0,
    )


def test_unknown_split_policy_size(synthetic, tmp_path):
    with pytest.raises(ValueError, match="holdout"):
        prepare(synthetic, "validation", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="resize, pad"):
        prepare(synthetic, policy="crop", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="size"):
        prepare(synthetic, size=0, cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------ cache


def test_cache_is_reused_without_decoding(synthetic, tmp_path, monkeypatch):
    first = prepare(synthetic, "test", 16, cache_dir=tmp_path, workers=1)
    assert first.cache_path is not None and first.cache_path.parent == tmp_path
    assert first.cache_path.name.startswith("oxford_pets-test-16-resize-")
    files = sorted(p for p in first.cache_path.iterdir() if not p.name.startswith("."))  # not the .lock
    mtimes = [p.stat().st_mtime_ns for p in files]

    def no_decoding(task):
        raise AssertionError("decoded although a cache existed")

    monkeypatch.setattr(prepare_module, "load_sample", no_decoding)
    again = prepare(synthetic, "test", 16, cache_dir=tmp_path, workers=1)
    assert again.cache_path == first.cache_path
    assert sorted(p for p in again.cache_path.iterdir() if p.name != ".lock") == files
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    assert torch.equal(again.images, first.images) and torch.equal(again.masks, first.masks)
    assert again.names == first.names
    assert not list(tmp_path.rglob("*.tmp"))  # the atomic writes left no temporary behind
    assert [p.name for p in files] == ["index.json", "shard-00000.safetensors"]
    stored = load_file(files[1])  # any safetensors reader opens a shard
    assert set(stored) == {"images", "masks"} and torch.equal(stored["images"], first.images)


def test_cache_key_covers_arguments(synthetic, tmp_path):
    paths = {
        prepare(synthetic, "test", 16, cache_dir=tmp_path, workers=1).cache_path,
        prepare(synthetic, "test", 12, cache_dir=tmp_path, workers=1).cache_path,
        prepare(synthetic, "test", 16, policy="pad", cache_dir=tmp_path, workers=1).cache_path,
        prepare(synthetic, "val", 16, cache_dir=tmp_path, workers=1).cache_path,
        prepare(synthetic, "val", 16, seed=1, cache_dir=tmp_path, workers=1).cache_path,
    }
    assert len(paths) == 5


def test_a_touched_mask_alone_gives_a_new_cache_folder(sample_copy, tmp_path):
    before = prepare(sample_copy, "trainval", 16, cache_dir=tmp_path, workers=1)
    assert prepare(sample_copy, "trainval", 16, cache_dir=tmp_path, workers=1).cache_path == before.cache_path
    os.utime(sample_copy / "annotations" / "trimaps" / f"{before.names[-1]}.png", ns=(1, 1))
    after = prepare(sample_copy, "trainval", 16, cache_dir=tmp_path, workers=1)
    assert after.cache_path != before.cache_path and torch.equal(after.masks, before.masks)


def test_changed_source_invalidates_the_cache(sample_copy, tmp_path):
    before = prepare(sample_copy, "trainval", 16, cache_dir=tmp_path, workers=1)
    name = before.names[0]
    path = sample_copy / "images" / f"{name}.jpg"
    Image.open(path).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path, format="JPEG")
    after = prepare(sample_copy, "trainval", 16, cache_dir=tmp_path, workers=1)
    assert after.cache_path != before.cache_path
    assert not torch.equal(after.images[0], before.images[0])
    assert torch.equal(after.images[1:], before.images[1:])


def test_damaged_index_is_rebuilt_from_the_shards(synthetic, tmp_path, monkeypatch):
    first = prepare(synthetic, "test", 16, cache_dir=tmp_path, workers=1)
    index = first.cache_path / "index.json"
    good = index.read_bytes()
    index.write_bytes(b"not an index")
    monkeypatch.setattr(prepare_module, "load_sample", lambda task: pytest.fail("decoded a whole shard again"))
    with pytest.warns(RuntimeWarning, match="unreadable cache"):
        again = prepare(synthetic, "test", 16, cache_dir=tmp_path, workers=1)
    assert torch.equal(again.images, first.images) and again.names == first.names
    assert index.read_bytes() == good


def test_default_cache_dir_is_never_inside_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert prepare_module.default_cache_dir() == tmp_path / "xdg" / "functional_seg"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert prepare_module.default_cache_dir() == Path.home() / ".cache" / "functional_seg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert prepare_module.default_cache_dir() == Path.home() / ".cache" / "functional_seg"


def _listing(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_prepare_leaves_the_dataset_folder_untouched(tmp_path, monkeypatch):
    root = make_synthetic_dataset(tmp_path / "data", n_trainval=4, n_test=2, size=16)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = _listing(root)
    data = prepare(root, "trainval", 8, workers=1)
    assert data.cache_path.parent == tmp_path / "xdg" / "functional_seg"
    prepare(root, "trainval", 8, workers=1)  # and from the cache
    assert _listing(root) == before


# ------------------------------------------------------------------------------------------ bad input


def _expect(root: Path, match: str, split: str = "trainval", **kw) -> None:
    """strict=True raises DataError matching ``match``; strict=False warns the same and skips one sample."""
    n = len(read_split(root, split))
    with pytest.raises(DataError, match=match):
        prepare(root, split, 16, cache_dir=root.parent / "cache", workers=1, **kw)
    with pytest.warns(DataWarning, match=match):
        data = prepare(root, split, 16, cache_dir=root.parent / "cache", strict=False, workers=1, **kw)
    assert len(data) == n - 1 and len(data.skipped) == 1


def test_corrupt_image(sample_copy):
    name = _first(sample_copy)
    (sample_copy / "images" / f"{name}.jpg").write_bytes(b"\x00garbage, not a JPEG" * 50)
    _expect(sample_copy, rf"{name}\.jpg: cannot decode image '{name}' .*expected a readable JPEG")


def test_truncated_image(sample_copy):
    name = _first(sample_copy)
    path = sample_copy / "images" / f"{name}.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    _expect(sample_copy, rf"{name}\.jpg: cannot decode image '{name}' \(OSError: image file is truncated")


def test_missing_trimap(sample_copy):
    name = _first(sample_copy)
    (sample_copy / "annotations/trimaps" / f"{name}.png").unlink()
    _expect(sample_copy, rf"trimaps/{name}\.png: trimap for image '{name}' is missing; expected a single-channel PNG")


def test_trimap_size_differs_from_image(sample_copy):
    name = _first(sample_copy)
    path = sample_copy / "annotations/trimaps" / f"{name}.png"
    tri = Image.open(path)
    tri.resize((tri.width + 3, tri.height), Image.Resampling.NEAREST).save(path)
    _expect(
        sample_copy,
        rf"trimaps/{name}\.png: trimap is \d+x\d+ \(WxH\) but its image .*{name}\.jpg is .*same size",
    )


def test_trimap_values_outside_1_2_3(sample_copy):
    name = _first(sample_copy)
    path = sample_copy / "annotations/trimaps" / f"{name}.png"
    arr = np.asarray(Image.open(path)).copy()
    arr[:2, :2] = 7
    Image.fromarray(arr).save(path)
    _expect(
        sample_copy,
        rf"trimaps/{name}\.png: trimap values must be 1 \(pet\), 2 \(background\) .*found 7 \(4 px\)",
    )


def test_trimap_with_colour_channels(sample_copy):
    name = _first(sample_copy)
    path = sample_copy / "annotations/trimaps" / f"{name}.png"
    Image.open(path).convert("RGB").save(path)
    _expect(sample_copy, rf"trimaps/{name}\.png: trimap has mode RGB; expected a single-channel PNG")


def test_split_names_a_missing_image(sample_copy):
    with open(sample_copy / "annotations/trainval.txt", "a") as f:
        f.write("Ghost_cat_1 1 1 1\n")
    _expect(sample_copy, r"trainval\.txt lists 'Ghost_cat_1' but its image .*Ghost_cat_1\.jpg is missing")


def test_non_image_files_in_images_are_ignored(sample_copy, tmp_path):
    (sample_copy / "images" / "notes.txt").write_text("not an image")
    (sample_copy / "images" / "Abyssinian_999.mat").write_bytes(b"MATLAB 5.0 MAT-file")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = prepare(sample_copy, "trainval", 16, cache_dir=tmp_path, workers=1)
    assert len(data) == 6 and len(list((sample_copy / "images").glob("*.mat"))) >= 1


def test_empty_and_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"does not exist; expected images/<name>\.jpg"):
        prepare(tmp_path / "missing", cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty is empty; expected images/<name>\.jpg"):
        prepare(tmp_path / "empty", cache_dir=tmp_path)


def test_empty_split_file(sample_copy):
    (sample_copy / "annotations/test.txt").write_text("\n")
    with pytest.raises(DataError, match=r"test\.txt: split 'test' lists no images"):
        prepare(sample_copy, "test", 16, cache_dir=sample_copy.parent / "cache", workers=1)


def test_every_sample_bad_is_an_error_even_when_not_strict(sample_copy):
    names = read_split(sample_copy, "test")  # 3 with the real sample, 2 with the synthetic stand-in
    for name in names:
        (sample_copy / "annotations/trimaps" / f"{name}.png").unlink()
    with pytest.warns(DataWarning), pytest.raises(DataError, match=f"none of the {len(names)} samples of split 'test'"):
        prepare(sample_copy, "test", 16, cache_dir=sample_copy.parent / "cache", strict=False, workers=1)


def test_worker_errors_come_back_as_data_error(synthetic, tmp_path):
    """Through the process pool (32 samples, 2 workers) a bad file is a DataError, not a pool traceback."""
    root = tmp_path / "copy"
    shutil.copytree(synthetic, root)
    names = read_split(root, "trainval") + read_split(root, "test")
    (root / "annotations/trainval.txt").write_text("".join(f"{n} 1 1 1\n" for n in names))
    bad = names[20]
    (root / "images" / f"{bad}.jpg").write_bytes(b"broken")
    with pytest.raises(DataError, match=rf"{bad}\.jpg: cannot decode image"):
        prepare(root, "trainval", 16, cache_dir=tmp_path / "cache", workers=2)
    with pytest.warns(DataWarning, match=rf"{bad}\.jpg"):
        data = prepare(root, "trainval", 16, cache_dir=tmp_path / "cache", workers=2, strict=False)
    assert len(data) == len(names) - 1 and bad not in data.names


def test_skips_are_warned_again_from_the_cache(sample_copy, tmp_path):
    name = _first(sample_copy)
    (sample_copy / "annotations/trimaps" / f"{name}.png").unlink()
    with pytest.warns(DataWarning, match=name):
        prepare(sample_copy, "trainval", 16, cache_dir=tmp_path, strict=False, workers=1)
    with pytest.warns(DataWarning, match=rf"{name}.*from cache"):
        data = prepare(sample_copy, "trainval", 16, cache_dir=tmp_path, strict=False, workers=1)
    assert name not in data.names


# ------------------------------------------------------------------------------------------ synthetic


def test_synthetic_layout_and_determinism(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", n_trainval=5, n_test=3, seed=7)
    b = make_synthetic_dataset(tmp_path / "b", n_trainval=5, n_test=3, seed=7)
    c = make_synthetic_dataset(tmp_path / "c", n_trainval=5, n_test=3, seed=8)
    lines = (a / "annotations/trainval.txt").read_text().splitlines()
    assert len(lines) == 5 and lines[0] == "Ellipse_1 1 1 1"
    assert all(len(line.split()) == 4 for line in lines)
    listed = [x for x in (a / "annotations/list.txt").read_text().splitlines() if not x.startswith("#")]
    assert len(listed) == 8
    for rel in ("images/Polygon_1.jpg", "annotations/trimaps/Star_2.png", "annotations/test.txt"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "images/Polygon_1.jpg").read_bytes() != (c / "images/Polygon_1.jpg").read_bytes()
    sizes = {Image.open(p).size for p in (a / "images").glob("*.jpg")}
    assert len(sizes) > 1  # sizes and aspect ratios vary
    tri = np.asarray(Image.open(a / "annotations/trimaps/Ellipse_1.png"))
    assert set(np.unique(tri).tolist()) == {1, 2, 3}


def test_synthetic_is_learnable(tmp_path):
    """Colour alone separates pet from background: a saturation threshold fitted on trainval gives a
    test pet IoU far above chance (predicting all "background" gives 0), so a small CNN can learn it."""
    root = make_synthetic_dataset(tmp_path / "syn", n_trainval=32, n_test=16)
    train = prepare(root, "trainval", 32, cache_dir=tmp_path / "cache", workers=1)
    test = prepare(root, "test", 32, cache_dir=tmp_path / "cache", workers=1)

    def saturation(images):
        x = images.float()
        return x.amax(1) - x.amin(1)

    def pet_iou(threshold, data):
        pred, target = saturation(data.images) > threshold, data.masks == 0
        return ((pred & target).sum() / (pred | target).sum()).item()

    best = max(range(0, 255, 5), key=lambda t: pet_iou(t, train))
    assert pet_iou(best, test) > 0.7
