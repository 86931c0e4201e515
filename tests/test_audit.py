"""The label audit: K folds in one vmapped run, each image scored by the member that never learned its
labels, and a grossly wrong mask found.

Data: a synthetic Oxford-layout set of 40 images at 32 px; a 2-stage SegNet with 4/8 channels.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from functional_seg import checkpoint as ckpt
from functional_seg.audit import audit, out_of_sample_probs
from functional_seg.core.tree import flatten_with_names
from functional_seg.data import PreparedData, Splits, make_synthetic_dataset, prepare
from functional_seg.data.splits import fold_ids
from functional_seg.models import create_model, load_checkpoint
from functional_seg.runtime import resolve_runtime
from functional_seg.train import FitConfig, OptimizerConfig, fit


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "pets", n_trainval=40, n_test=4, size=48)
    return prepare(root, "trainval", 32, cache_dir=tmp_path_factory.mktemp("cache"), workers=1)


def _model():
    return create_model("segnet", widths=(4, 8), convs_per_stage=(1, 1))


def _config(**kw):
    return FitConfig(batch_size=8, epochs=kw.pop("epochs", 1), optimizer=OptimizerConfig(lr=1e-2), device="cpu",
                     log_every=1, augment="none", **kw)


def _relabelled(data, names, label):
    """``data`` with the masks of ``names`` set to ``label`` wherever they are labelled."""
    images, masks = data.gather(range(len(data)))
    hit = torch.tensor([n in names for n in data.names])
    masks = torch.where(hit[:, None, None] & (masks != 255), torch.tensor(label, dtype=torch.uint8), masks)
    return PreparedData(images, masks, data.names, class_names=data.class_names, layout=data.layout,
                        policy=data.policy)


def _member(tree, k):
    return {n: t[k] for n, t in flatten_with_names(tree).items()}


def test_member_k_never_learns_the_labels_of_fold_k(data, tmp_path):
    """Relabel every image of fold 0: member 0's weights do not move by a bit, member 1's do."""
    folds = fold_ids(data.names, 2, seed=0)
    fold0 = {n for n, f in zip(data.names, folds.tolist()) if f == 0}
    assert 0 < len(fold0) < len(data)
    config = _config(folds=2)
    fit(_model(), Splits(data), config, out_dir=tmp_path / "a", hooks=[])
    fit(_model(), Splits(_relabelled(data, fold0, 2)), config, out_dir=tmp_path / "b", hooks=[])
    a, b = (ckpt.load(tmp_path / run / "last.safetensors")[0]["params"] for run in ("a", "b"))
    a0, b0, a1, b1 = _member(a, 0), _member(b, 0), _member(a, 1), _member(b, 1)
    assert a0.keys() == b0.keys() and all(torch.equal(a0[n], b0[n]) for n in a0)
    assert not all(torch.equal(a1[n], b1[n]) for n in a1)


def test_out_of_sample_probabilities_come_from_the_member_that_held_the_image_out(data, tmp_path):
    """Each image's probabilities, recomputed by hand from its fold's member: softmax of the image
    (tta="none"), or the mean of the softmax of the image and of its mirror, flipped back ("flip")."""
    folds = fold_ids(data.names, 2, seed=0)
    run = fit(_model(), Splits(data), _config(folds=2), out_dir=tmp_path / "run", hooks=[])
    members = [load_checkpoint(run.checkpoint, weights="params", member=k) for k in (0, 1)]
    runtime = resolve_runtime("cpu")
    for tta in ("none", "flip"):
        seen = torch.zeros(len(data), dtype=torch.bool)
        for index, probs, masks in out_of_sample_probs(run.checkpoint, data, folds, runtime=runtime, batch_size=8,
                                                       tta=tta):
            images, want_masks = data.gather(index)
            assert torch.equal(masks, want_masks.long())
            for j, i in enumerate(index.tolist()):
                m = members[int(folds[i])]
                x = m.preprocess.model_input(images[j:j + 1])
                with torch.no_grad():
                    want = m.model.apply(m.params, m.state, x, train=False)[0].softmax(1)
                    if tta == "flip":
                        mirror = m.model.apply(m.params, m.state, x.flip(-1), train=False)[0].softmax(1).flip(-1)
                        want = (want + mirror) / 2
                torch.testing.assert_close(probs[j:j + 1], want, rtol=1e-5, atol=1e-6)
                seen[i] = True
        assert seen.all()


def test_the_audit_ranks_grossly_wrong_masks_first_and_writes_its_files(data, tmp_path):
    wrong = set(data.names[:3])
    corrupted = _relabelled(data, wrong, 1)  # three pets labelled background everywhere
    result = audit(_model(), corrupted, _config(epochs=6), folds=4, out_dir=tmp_path / "run", top=4, hooks=[])
    top = {result.names[i] for i in result.order[:5]}
    assert len(wrong & top) >= 2, [result.names[i] for i in result.order[:8]]
    rows = list(csv.DictReader((tmp_path / "run" / "audit.csv").open()))
    assert [r["name"] for r in rows] == [result.names[i] for i in result.order]
    assert [int(r["rank"]) for r in rows] == list(range(1, len(data) + 1))
    saved = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert saved["folds"] == 4 and len(saved["thresholds"]) == 3 and saved["method"] == "self_confidence"
    assert saved["tta"] == "flip"  # the default: out-of-sample probabilities of the image and its mirror
    assert (tmp_path / "run" / "audit_top.png").stat().st_size > 0
    # a resumed audit of a finished run trains nothing and ranks the same
    again = audit(_model(), corrupted, _config(epochs=6), folds=4, out_dir=tmp_path / "run", resume=True, top=0,
                  hooks=[])
    assert again.order == result.order and again.fit.history == result.fit.history


def test_an_audit_needs_two_folds_and_a_known_method(data, tmp_path):
    with pytest.raises(ValueError, match="--folds must be at least 2"):
        audit(_model(), data, _config(), folds=1, out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="unknown audit method"):
        audit(_model(), data, _config(), folds=2, method="vibes", out_dir=tmp_path / "b")
    with pytest.raises(ValueError, match="unknown tta 'sideways'; expected one of none, flip"):
        audit(_model(), data, _config(), folds=2, tta="sideways", out_dir=tmp_path / "c")
