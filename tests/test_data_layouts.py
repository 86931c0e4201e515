"""Your own data: the generic images/ + masks/ layout and Pascal VOC, detected by ``prepare``, and
every bad file they can hold named in a one-line DataError."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from functional_seg.data import (
    IGNORE_INDEX,
    DataError,
    DataWarning,
    detect,
    generic,
    make_generic_dataset,
    make_synthetic_dataset,
    make_voc_dataset,
    prepare,
    voc,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Nothing here may write into the real ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="module")
def gen5(tmp_path_factory) -> Path:
    return make_generic_dataset(tmp_path_factory.mktemp("gen5"), n=20, num_classes=5, seed=1)


@pytest.fixture
def gen_copy(tmp_path, gen5) -> Path:
    root = tmp_path / "gen"
    shutil.copytree(gen5, root)
    return root


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return make_voc_dataset(tmp_path_factory.mktemp("voc"), n=12, seed=2)


def _prep(root, split="train", **kw):
    kw.setdefault("cache_dir", Path(root).parent / "cache")
    kw.setdefault("workers", 1)
    return prepare(root, split, 16, **kw)


# ------------------------------------------------------------------------------------------ detection


def test_detect_each_layout(tmp_path, gen5, voc_root):
    pets = make_synthetic_dataset(tmp_path / "pets", n_trainval=2, n_test=1, size=12)
    assert detect(pets) == ("oxford_pets", pets)
    assert detect(gen5) == ("generic", gen5)
    assert detect(voc_root) == ("voc", voc_root)
    devkit = tmp_path / "tv" / "VOCdevkit"
    devkit.mkdir(parents=True)
    (devkit / "VOC2012").symlink_to(voc_root, target_is_directory=True)
    assert detect(tmp_path / "tv") == ("voc", devkit / "VOC2012")


def test_unknown_layout_lists_what_it_found(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "labels.csv").write_text("x")
    with pytest.raises(DataError, match=r"holds no known layout \(it has labels\.csv, photos/\); expected images/"):
        detect(tmp_path)


# ------------------------------------------------------------------------------------------ generic


def test_generic_with_classes_txt(gen5):
    data = _prep(gen5, "train")
    assert data.class_names == ("background", "shape_1", "shape_2", "shape_3", "shape_4")
    assert data.num_classes == 5 and data.class_counts().shape == (5,)
    assert set(data.masks.unique().tolist()) <= {0, 1, 2, 3, 4, IGNORE_INDEX}
    assert (data.class_counts() > 0).all()
    assert data.cache_path.name.startswith("generic-train-16-resize-")


def test_generic_infers_c_from_every_mask(gen_copy):
    (gen_copy / "classes.txt").unlink()
    data = _prep(gen_copy, "test")  # 2 images: not every class is in this split
    assert data.class_names == ("class_0", "class_1", "class_2", "class_3", "class_4")
    again = _prep(gen_copy, "test")
    assert again.class_names == data.class_names and again.cache_path == data.cache_path
    # A new top label in any mask (outside this split) changes C and the cache key.
    other = next(n for n in sorted(p.stem for p in (gen_copy / "masks").glob("*.png")) if n not in data.names)
    m = np.asarray(Image.open(gen_copy / "masks" / f"{other}.png")).copy()
    m[0, 0] = 6
    Image.fromarray(m).save(gen_copy / "masks" / f"{other}.png")
    with pytest.warns(DataWarning, match=rf"no mask holds 5; the values above the gap come from .*{other}\.png"):
        assert _prep(gen_copy, "test").num_classes == 7  # named, and counted: it is a paired mask


def test_generic_split_files_are_respected(tmp_path):
    root = make_generic_dataset(tmp_path / "g", n=10, split_files=True)
    for split in ("train", "val", "test"):
        listed = (root / f"{split}.txt").read_text().split()
        assert _prep(root, split).names == tuple(listed)
    trainval = _prep(root, "trainval")
    assert trainval.names == tuple((root / "train.txt").read_text().split() + (root / "val.txt").read_text().split())
    (root / "test.txt").unlink()
    with pytest.raises(DataError, match=r"test\.txt is missing; expected one image stem per line .*has train\.txt"):
        _prep(root, "test")


def test_generic_seeded_split_is_deterministic_and_disjoint(gen5):
    parts = {s: generic.source(gen5, s, seed=3).names for s in ("train", "val", "test")}
    assert [len(p) for p in parts.values()] == [16, 2, 2]
    everything = {p.stem for p in (gen5 / "images").iterdir()}
    assert set().union(*parts.values()) == everything
    assert sum(len(p) for p in parts.values()) == len(everything)
    assert parts == {s: generic.source(gen5, s, seed=3).names for s in parts}
    assert generic.source(gen5, "train", seed=4).names != parts["train"]
    assert set(generic.source(gen5, "trainval", seed=3).names) == set(parts["train"]) | set(parts["val"])
    with pytest.raises(ValueError, match="train, val, test, trainval"):
        generic.source(gen5, "holdout")


def test_generic_warts_are_survived(tmp_path):
    root = make_generic_dataset(tmp_path / "w", n=8, warts=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = _prep(root, "trainval")
    names = set(data.names) | set(_prep(root, "test").names)
    assert names == {f"img_{k}" for k in range(8)}  # .png and .JPG images in, junk out


def test_generic_duplicate_stem_and_bad_classes_file(gen_copy):
    shutil.copyfile(gen_copy / "images/img_3.jpg", gen_copy / "images/img_3.png")
    with pytest.raises(DataError, match=r"img_3\.jpg and img_3\.png share the stem 'img_3'"):
        _prep(gen_copy)
    (gen_copy / "images/img_3.png").unlink()
    (gen_copy / "classes.txt").write_text("background\n\ncat\n")
    with pytest.raises(DataError, match=r"classes\.txt:2: empty class name"):
        _prep(gen_copy)
    (gen_copy / "classes.txt").write_text("background\ncat\ncat\n")
    with pytest.raises(DataError, match=r"classes\.txt:3: class 'cat' is named twice"):
        _prep(gen_copy)


# ------------------------------------------------------------------------------------------ VOC


def test_voc_layout_keeps_255_as_ignore(voc_root):
    data = _prep(voc_root, "train", policy="pad")
    assert data.class_names == voc.CLASS_NAMES and data.num_classes == 21
    assert data.class_names[0] == "background" and data.class_names[-1] == "tvmonitor"
    assert data.names == tuple((voc_root / "ImageSets/Segmentation/train.txt").read_text().split())
    assert len(data) == 8 and len(_prep(voc_root, "val")) == 4 and len(_prep(voc_root, "trainval")) == 12
    values = set(data.masks.unique().tolist())
    assert IGNORE_INDEX in values and values - {IGNORE_INDEX} <= set(range(21)) and len(values) > 3
    resized = _prep(voc_root, "train")
    raw = np.asarray(Image.open(voc_root / "SegmentationClass" / f"{data.names[0]}.png"))
    assert Image.open(voc_root / "SegmentationClass" / f"{data.names[0]}.png").mode == "P"
    want = Image.fromarray(raw).resize((16, 16), Image.Resampling.NEAREST)
    assert torch.equal(resized.masks[0], torch.from_numpy(np.array(want)))  # palette index = label


def test_voc_missing_split_file(voc_root):
    with pytest.raises(DataError, match=r"Segmentation/test\.txt is missing; expected one image id per line"):
        _prep(voc_root, "test")


# ------------------------------------------------------------------------------------------ bad files


def _break(root: Path, case: str, layout: str) -> str:
    """Damage one sample of ``root`` as ``case`` says; return a regex the message must match."""
    img_dir, mask_dir = ("images", "masks") if layout == "generic" else ("JPEGImages", "SegmentationClass")
    listed = root / ("train.txt" if layout == "generic" else "ImageSets/Segmentation/train.txt")
    name = listed.read_text().split()[0]
    image, mask = root / img_dir / f"{name}.jpg", root / mask_dir / f"{name}.png"
    if case == "corrupt":
        image.write_bytes(b"\x00 not a JPEG" * 40)
        return rf"{name}\.jpg: cannot decode image '{name}' \(UnidentifiedImageError.*expected a readable JPEG"
    if case == "truncated":
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 3])
        return rf"{name}\.jpg: cannot decode image .{name}. \(OSError: (image file is truncated|Truncated File Read)"
    if case == "no_mask":
        mask.unlink()
        return rf"{name}\.png: mask for image '{name}' is missing; expected .*PNG"
    if case == "size":
        m = Image.open(mask)
        m.resize((m.width + 2, m.height), Image.Resampling.NEAREST).save(mask)
        return rf"{name}\.png: mask is \d+x\d+ \(WxH\) but its image .*{name}\.jpg is \d+x\d+; expected the same size"
    if case == "label":
        m = Image.open(mask)
        a = np.asarray(m).copy()
        a[:1, :3] = 30
        out = Image.fromarray(a, mode=m.mode)
        if m.mode == "P":
            out.putpalette(m.getpalette())
        out.save(mask)
        c = 5 if layout == "generic" else 21
        return rf"{name}\.png: mask values must be class indices 0\.\.{c - 1} or 255 \(ignore\); found 30 \(3 px\)"
    if case == "no_image":
        listed.write_text(listed.read_text() + "ghost_1\n")
        return rf"{listed.name} lists 'ghost_1' but its image .*ghost_1\.jpg is missing"
    raise AssertionError(case)


CASES = ["corrupt", "truncated", "no_mask", "size", "label", "no_image"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", ["generic", "voc"])
def test_bad_file_is_a_data_error_naming_it(tmp_path, case, layout):
    root = (
        make_generic_dataset(tmp_path / "g", n=10, split_files=True)
        if layout == "generic"
        else make_voc_dataset(tmp_path / "v", n=10)
    )
    n = len(_prep(root, "train"))
    match = _break(root, case, layout)
    with pytest.raises(DataError, match=match):
        _prep(root, "train")
    with pytest.warns(DataWarning, match=match):
        data = _prep(root, "train", strict=False)
    assert len(data) == n - (case != "no_image") and len(data.skipped) == 1


# ------------------------------------------------------------------------------------------ all bad files


def _corrupt(root: Path, names: list[str]) -> None:
    for name in names:
        (root / "images" / f"{name}.jpg").write_bytes(b"broken")


def test_strict_error_counts_the_bad_files_and_names_the_first_few(tmp_path):
    root = make_generic_dataset(tmp_path / "g", n=12, split_files=True)
    train = (root / "train.txt").read_text().split()  # 7 names
    _corrupt(root, train[:3])
    with pytest.raises(DataError, match=r"3 of 7 samples of split 'train' are bad: ") as err:
        _prep(root, "train")
    assert all(f"{n}.jpg: cannot decode image" in str(err.value) for n in train[:3])
    assert "\n" not in str(err.value) and "--skip-bad" in str(err.value)
    _corrupt(root, train[3:])
    with pytest.raises(DataError, match=r"7 of 7 samples .*; and 2 more; strict=False") as err:
        _prep(root, "train")
    assert train[4] in str(err.value) and train[6] not in str(err.value)


def test_not_strict_skips_every_bad_file_with_one_warning(tmp_path):
    root = make_generic_dataset(tmp_path / "g", n=12, split_files=True)
    train = (root / "train.txt").read_text().split()
    _corrupt(root, train[:2])
    (root / "masks" / f"{train[5]}.png").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = _prep(root, "train", strict=False)
    data_warnings = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(data_warnings) == 1
    text = str(data_warnings[0].message)
    assert text.startswith("prepare: 3 of 7 samples of split 'train' are bad: ") and text.endswith("skipped them")
    assert all(n in text for n in (train[0], train[1], train[5]))
    assert data.names == tuple(n for n in train if n not in (train[0], train[1], train[5]))
    assert len(data.skipped) == 3
    with pytest.warns(DataWarning, match=r"3 of 7 .*; skipped them \(from cache generic-train-"):
        again = _prep(root, "train", strict=False)
    assert again.names == data.names
