"""The Oxford-IIIT Pet reader: locating the layout, split files, labels, and the real sample's quirks.

The real sample lives at ``../shared/data/oxford-pets-sample`` next to the repository (override
with ``FSEG_SAMPLE_DATA``); tests that need it skip with a reason only if it is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sample_data import SAMPLE

from functional_seg.data import (
    CLASS_NAMES,
    IGNORE_INDEX,
    NUM_CLASSES,
    DataError,
    find_root,
    make_synthetic_dataset,
    prepare,
    read_split,
)
from functional_seg.data.oxford_pets import image_path, load_sample, trimap_path, trimap_to_labels

needs_sample = pytest.mark.skipif(
    not SAMPLE.is_dir(), reason=f"real Oxford-IIIT Pet sample not found at {SAMPLE}"
)


def _listed(path: Path) -> list[str]:
    return [
        line.split()[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), n_trainval=20, n_test=10, size=(24, 40))


# ------------------------------------------------------------------------------------------ constants


def test_label_constants():
    assert CLASS_NAMES == ("pet", "background", "border")
    assert NUM_CLASSES == 3 and IGNORE_INDEX == 255
    assert issubclass(DataError, ValueError)


def test_trimap_to_labels_maps_1_2_3_to_0_1_2():
    trimap = np.array([[1, 2, 3], [3, 2, 1]], dtype=np.uint8)
    labels = trimap_to_labels(trimap)
    assert labels.dtype == np.uint8
    assert labels.tolist() == [[0, 1, 2], [2, 1, 0]]
    assert trimap_to_labels(trimap.astype(np.int32)).tolist() == labels.tolist()


@pytest.mark.parametrize("bad", [0, 4, 255, 1000])
def test_trimap_values_outside_1_2_3_name_the_file(bad):
    trimap = np.array([[1, 2], [3, bad]], dtype=np.int32)
    with pytest.raises(DataError, match=rf"t\.png: trimap values must be 1 .*found {bad} \(1 px\)"):
        trimap_to_labels(trimap, "t.png")


# ------------------------------------------------------------------------------------------ find_root


def test_find_root_accepts_layout_and_torchvision_parent(tmp_path, synthetic):
    assert find_root(synthetic) == synthetic
    parent = tmp_path / "tv"
    (parent).mkdir()
    (parent / "oxford-iiit-pet").symlink_to(synthetic, target_is_directory=True)
    assert find_root(parent) == parent / "oxford-iiit-pet"
    assert find_root(str(parent)) == parent / "oxford-iiit-pet"


def test_find_root_missing(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path / 'nope'} does not exist; expected images/"):
        find_root(tmp_path / "nope")


def test_find_root_empty(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path} is empty; expected images/.*oxford-iiit-pet"):
        find_root(tmp_path)


def test_find_root_partial_layout(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"has no annotations/; expected"):
        find_root(tmp_path)


def test_find_root_file(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        find_root(tmp_path / "f.txt")


# ------------------------------------------------------------------------------------------ splits


def test_official_splits_follow_the_files(synthetic):
    assert read_split(synthetic, "trainval") == _listed(synthetic / "annotations/trainval.txt")
    assert read_split(synthetic, "test") == _listed(synthetic / "annotations/test.txt")
    assert len(read_split(synthetic, "trainval")) == 20


def test_seeded_split_partitions_all_listed_names(synthetic):
    parts = {s: read_split(synthetic, s, seed=3) for s in ("train", "val", "holdout")}
    everything = set(read_split(synthetic, "trainval")) | set(read_split(synthetic, "test"))
    assert [len(p) for p in parts.values()] == [24, 3, 3]
    assert set().union(*parts.values()) == everything
    assert sum(len(p) for p in parts.values()) == len(everything)  # disjoint
    assert parts == {s: read_split(synthetic, s, seed=3) for s in parts}  # deterministic
    assert read_split(synthetic, "train", seed=4) != parts["train"]  # the seed matters


def test_split_file_comments_blank_lines_and_duplicates(tmp_path, synthetic):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synthetic, root)
    names = _listed(root / "annotations/trainval.txt")
    (root / "annotations/trainval.txt").write_text(
        "#Image CLASS-ID SPECIES BREED ID\n\n" + "\n".join(f"{n} 1 1 1" for n in names + names[:2]) + "\n"
    )
    assert read_split(root, "trainval") == names


def test_missing_split_file_and_unknown_split(tmp_path, synthetic):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synthetic, root)
    (root / "annotations/test.txt").unlink()
    with pytest.raises(DataError, match=r"test\.txt is missing; expected lines like"):
        read_split(root, "test")
    with pytest.raises(ValueError, match="trainval, test, train, val, holdout"):
        read_split(root, "validation")


def test_split_file_with_a_path_is_rejected(tmp_path, synthetic):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synthetic, root)
    (root / "annotations/test.txt").write_text("../../etc/passwd 1 1 1\n")
    with pytest.raises(DataError, match=r"test\.txt:1: '\.\./\.\./etc/passwd' is not an image name"):
        read_split(root, "test")


# ------------------------------------------------------------------------------------------ real sample


@pytest.fixture(scope="module")
def real_prepared(tmp_path_factory):
    if not SAMPLE.is_dir():
        pytest.skip(f"real Oxford-IIIT Pet sample not found at {SAMPLE}")
    cache = tmp_path_factory.mktemp("real_cache")
    return {s: prepare(SAMPLE, s, 64, cache_dir=cache) for s in ("trainval", "test")}


@needs_sample
def test_real_sample_layout_and_split_counts():
    assert find_root(SAMPLE) == SAMPLE
    for split in ("trainval", "test"):
        assert read_split(SAMPLE, split) == _listed(SAMPLE / f"annotations/{split}.txt")
    assert len(read_split(SAMPLE, "trainval")) == 300 and len(read_split(SAMPLE, "test")) == 298
    seeded = [read_split(SAMPLE, s) for s in ("train", "val", "holdout")]
    assert [len(p) for p in seeded] == [478, 60, 60]
    assert set().union(*seeded) == set(_listed(SAMPLE / "annotations/list.txt"))


@needs_sample
def test_real_sample_every_listed_image_loads(real_prepared):
    for split, data in real_prepared.items():
        assert data.names == tuple(read_split(SAMPLE, split))  # nothing skipped, file order kept
        assert data.images.shape == (len(data), 3, 64, 64) and data.images.dtype == torch.uint8
        assert data.masks.shape == (len(data), 64, 64) and data.masks.dtype == torch.uint8
        assert set(data.masks.unique().tolist()) == {0, 1, 2}
        counts = data.class_counts()
        assert counts.sum() == len(data) * 64 * 64 and (counts > 0).all()
        assert data.images.float().std() > 20  # real pictures, not blank canvases


@needs_sample
def test_real_sample_odd_files(real_prepared, tmp_path):
    on_disk = {p.stem for p in (SAMPLE / "images").iterdir()}
    listed = set(_listed(SAMPLE / "annotations/trainval.txt")) | set(_listed(SAMPLE / "annotations/test.txt"))
    # .mat files beside the JPEGs are never listed and never read.
    mats = sorted(p.name for p in (SAMPLE / "images").glob("*.mat"))
    assert len(mats) == 3 and not {Path(m).stem for m in mats} - on_disk
    # Images on disk that no split lists stay out of every split.
    unlisted = {p.stem for p in (SAMPLE / "images").glob("*.jpg")} - listed
    assert unlisted == {"Abyssinian_34", "Abyssinian_82"}
    assert not unlisted & set(real_prepared["trainval"].names + real_prepared["test"].names)
    # The RGBA PNG (listed in test) came through as RGB; the palette GIF (unlisted) decodes too.
    assert "Abyssinian_5" in real_prepared["test"].names
    for name in ("Abyssinian_5", "Abyssinian_34"):
        r = load_sample((0, name, str(image_path(SAMPLE, name)), str(trimap_path(SAMPLE, name)), 32, "pad"))
        assert r.error is None, r.error
        assert r.image.shape == (3, 32, 32) and r.image.dtype == np.uint8
        assert set(np.unique(r.mask).tolist()) <= {0, 1, 2, IGNORE_INDEX}
