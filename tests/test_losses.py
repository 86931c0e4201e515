"""Tests for functional_seg.losses: hand-worked values, laws (hypothesis), torch cross-checks,
and grad / vmap / compile.

The hand-worked batch is one image of two pixels and two classes:
pixel A has target 1 and logits (0, ln 3), so p = (1/4, 3/4);
pixel B has target 0 and logits (0, 0), so p = (1/2, 1/2).
Soft counts per class: I = (1/2, 3/4), P = (3/4, 5/4), T = (1, 1).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies_seg import SegBatch, class_weights, perfect_logits, seg_batches

from functional_seg import losses as L

LN3 = math.log(3.0)
OVERLAP = ("soft_iou", "soft_iou_log", "dice", "tversky")


@pytest.fixture
def hand() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor([[[[0.0, 0.0]], [[LN3, 0.0]]]], dtype=torch.float64)  # [1, 2, 1, 2]
    target = torch.tensor([[[1, 0]]])  # [1, 1, 2]
    return logits, target


def close(actual: torch.Tensor, expected: float, tol: float = 1e-12) -> None:
    assert actual.shape == ()
    assert abs(actual.item() - expected) <= tol, (actual.item(), expected)


# ----------------------------------------------------------------------------- hand-worked values


def test_cross_entropy_by_hand(hand):
    logits, target = hand
    nll_a, nll_b = math.log(4 / 3), math.log(2)
    close(L.cross_entropy(logits, target), (nll_a + nll_b) / 2)
    # weight (2, 1): pixel B (class 0) counts twice; the mean divides by the summed weight 3.
    close(
        L.cross_entropy(logits, target, weight=torch.tensor([2.0, 1.0], dtype=torch.float64)), (nll_a + 2 * nll_b) / 3
    )
    close(L.cross_entropy(logits, target, ignore_index=0), nll_a)
    # smoothing 0.1 over C = 2: 0.9 * nll + 0.05 * (sum over classes of -log p).
    smooth_a = 0.9 * nll_a + 0.05 * (math.log(4) + math.log(4 / 3))
    smooth_b = 0.9 * nll_b + 0.05 * (2 * math.log(2))
    close(L.cross_entropy(logits, target, label_smoothing=0.1), (smooth_a + smooth_b) / 2)


def test_focal_by_hand(hand):
    logits, target = hand
    # (1 - p_t)^2 * (-log p_t): A has p_t = 3/4, B has p_t = 1/2.
    expected = (0.25**2 * math.log(4 / 3) + 0.5**2 * math.log(2)) / 2
    close(L.focal(logits, target, gamma=2.0), expected)
    close(L.focal(logits, target, gamma=1.0, ignore_index=1), 0.5 * math.log(2))


def test_soft_iou_by_hand(hand):
    logits, target = hand
    # eps = 1: class 0 (0.5 + 1) / (1.25 + 1) = 2/3, class 1 (0.75 + 1) / (1.5 + 1) = 0.7.
    m = (2 / 3 + 0.7) / 2
    close(L.soft_iou(logits, target), 1 - m)
    close(L.soft_iou(logits, target, log=True), -math.log(m))
    # Without smoothing the scores are plain I / U = 0.4 and 0.5.
    close(L.soft_iou(logits, target, eps=1e-12), 1 - 0.45, 1e-9)
    # weight (3, 1) makes the class mean (3 * 2/3 + 0.7) / 4.
    w = torch.tensor([3.0, 1.0], dtype=torch.float64)
    close(L.soft_iou(logits, target, weight=w), 1 - (2 + 0.7) / 4)
    # Ignoring class 0 leaves pixel A: I = (0, 3/4), P = (1/4, 3/4), T = (0, 1), U = (1/4, 1).
    close(L.soft_iou(logits, target, ignore_index=0), 1 - (1 / 1.25 + 1.75 / 2) / 2)


def test_dice_by_hand(hand):
    logits, target = hand
    # (I + 1) / ((P + T) / 2 + 1): class 0 1.5 / 1.875 = 0.8, class 1 1.75 / 2.125.
    close(L.dice(logits, target), 1 - (0.8 + 1.75 / 2.125) / 2)
    # Without smoothing: 2 I / (P + T) = 4/7 and 2/3.
    close(L.dice(logits, target, eps=1e-12), 1 - (4 / 7 + 2 / 3) / 2, 1e-9)


def test_tversky_by_hand(hand):
    logits, target = hand
    # FP = P - I = (1/4, 1/2), FN = T - I = (1/2, 1/4); alpha = 0.3 on FP, beta = 0.7 on FN.
    t0 = 1.5 / (0.5 + 0.3 * 0.25 + 0.7 * 0.5 + 1)
    t1 = 1.75 / (0.75 + 0.3 * 0.5 + 0.7 * 0.25 + 1)
    close(L.tversky(logits, target, alpha=0.3, beta=0.7), 1 - (t0 + t1) / 2)


def test_combine_and_ce_dice_by_hand(hand):
    logits, target = hand
    ce = (math.log(4 / 3) + math.log(2)) / 2
    dice = 1 - (0.8 + 1.75 / 2.125) / 2
    close(L.combine({L.cross_entropy: 1.0, L.dice: 0.5})(logits, target), ce + 0.5 * dice)
    close(L.ce_dice(logits, target), ce + dice)
    close(L.get_loss("ce_dice")(logits, target), ce + dice)


# ----------------------------------------------------------------------------- laws


def all_losses(batch: SegBatch, logits: torch.Tensor | None = None, **kw) -> dict[str, torch.Tensor]:
    logits = batch.logits if logits is None else logits
    return {name: L.get_loss(name, ignore_index=batch.ignore_index, **kw)(logits, batch.target) for name in L.LOSSES}


@given(seg_batches(), st.booleans(), st.integers(0, 2**31))
def test_losses_are_finite_and_nonnegative(batch, weighted, seed):
    weight = class_weights(batch.num_classes, seed) if weighted else None
    logits = batch.logits.requires_grad_(True)
    for name, value in all_losses(batch, logits, weight=weight).items():
        assert value.shape == () and torch.isfinite(value) and value >= 0, (name, value)
        (grad,) = torch.autograd.grad(value, logits)
        assert torch.isfinite(grad).all(), name


@given(seg_batches(scales=(1.0, 1e4)))
def test_perfect_logits_drive_losses_to_zero(batch):
    for name, value in all_losses(batch, perfect_logits(batch)).items():
        assert value < 1e-5, (name, value)


@given(seg_batches(), st.booleans(), st.integers(0, 2**31))
def test_tversky_half_is_dice_and_one_is_soft_iou(batch, log, seed):
    kw = dict(ignore_index=batch.ignore_index, log=log, weight=class_weights(batch.num_classes, seed))
    args = (batch.logits, batch.target)
    torch.testing.assert_close(L.tversky(*args, alpha=0.5, beta=0.5, **kw), L.dice(*args, **kw))
    torch.testing.assert_close(L.tversky(*args, alpha=1.0, beta=1.0, **kw), L.soft_iou(*args, **kw))


@given(seg_batches(), st.booleans(), st.integers(0, 2**31))
def test_focal_with_gamma_zero_is_cross_entropy(batch, weighted, seed):
    kw = dict(ignore_index=batch.ignore_index, weight=class_weights(batch.num_classes, seed) if weighted else None)
    focal = L.focal(batch.logits, batch.target, gamma=0.0, **kw)
    assert torch.equal(focal, L.cross_entropy(batch.logits, batch.target, **kw))


@given(seg_batches(), st.randoms(use_true_random=False))
def test_permuting_the_batch_leaves_every_loss_unchanged(batch, rnd):
    perm = list(range(batch.logits.shape[0]))
    rnd.shuffle(perm)
    permuted = SegBatch(batch.logits[perm], batch.target[perm], batch.ignore_index)
    before, after = all_losses(batch), all_losses(permuted)
    for name in L.LOSSES:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-6)


@given(seg_batches(scales=(1.0, 1e4), ignore_labels=(255, -1)), st.integers(0, 2**31))
def test_ignored_pixels_add_nothing_to_value_or_gradient(batch, seed):
    ignored = ~batch.valid
    g = torch.Generator().manual_seed(seed)
    # Any other logits at the ignored pixels must give the very same value.
    noise = 1e3 * torch.randn(batch.logits.shape, generator=g)
    scrambled = torch.where(ignored.unsqueeze(1), noise, batch.logits)
    weight = class_weights(batch.num_classes, seed)
    for name in L.LOSSES:
        loss = L.get_loss(name, ignore_index=batch.ignore_index, weight=weight)
        grad, value = torch.func.grad_and_value(loss)(batch.logits, batch.target)
        assert torch.all(grad.permute(0, 2, 3, 1)[ignored] == 0), name
        assert torch.equal(loss(scrambled, batch.target), value), name


@given(seg_batches(), st.floats(0.1, 10.0))
def test_uniform_class_weight_changes_nothing(batch, k):
    weight = torch.full((batch.num_classes,), k)
    plain, weighted = all_losses(batch), all_losses(batch, weight=weight)
    for name in L.LOSSES:
        torch.testing.assert_close(weighted[name], plain[name], rtol=1e-5, atol=1e-5)


@given(seg_batches(), st.booleans(), st.sampled_from([0.0, 0.1, 1.0]), st.integers(0, 2**31))
def test_cross_entropy_matches_torch(batch, weighted, smoothing, seed):
    assume(bool(batch.valid.any()))  # torch gives NaN when every pixel is ignored
    weight = class_weights(batch.num_classes, seed) if weighted else None
    ours = L.cross_entropy(
        batch.logits, batch.target, weight=weight, ignore_index=batch.ignore_index, label_smoothing=smoothing
    )
    ignore = -100 if batch.ignore_index is None else batch.ignore_index
    theirs = F.cross_entropy(batch.logits, batch.target, weight=weight, ignore_index=ignore, label_smoothing=smoothing)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_every_pixel_ignored_gives_zero_not_nan():
    logits = torch.randn(2, 3, 2, 2)
    target = torch.full((2, 2, 2), 255)
    for name in L.LOSSES:
        loss = L.get_loss(name, ignore_index=255)
        grad, value = torch.func.grad_and_value(loss)(logits, target)
        assert value == 0 and torch.all(grad == 0), name


def test_extreme_logits_and_absent_classes_stay_finite():
    logits = torch.tensor([1e4, -1e4, 0.0, 1e4]).view(1, 4, 1, 1).expand(2, 4, 3, 3).contiguous()
    for target_label in (0, 1, 3):  # the winning class, a hopeless one, a tied winner
        target = torch.full((2, 3, 3), target_label)
        for name in L.LOSSES:
            for gamma in (0.5, 2.0) if name == "focal" else (None,):
                kw = {} if gamma is None else {"gamma": gamma}
                grad, value = torch.func.grad_and_value(L.get_loss(name, **kw))(logits, target)
                assert torch.isfinite(value) and torch.isfinite(grad).all(), (name, target_label)


def test_half_precision_logits_are_computed_in_float32():
    logits = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    target = torch.randint(0, 3, (2, 4, 4))
    for name in L.LOSSES:
        value = L.get_loss(name)(logits, target)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, L.get_loss(name)(logits.float(), target))


# ----------------------------------------------------------------------------- transforms


@pytest.fixture
def small() -> SegBatch:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 4, 5, generator=g)
    target = torch.randint(0, 3, (3, 4, 5), generator=g)
    target[0, 0, :2] = 255
    return SegBatch(logits, target, 255)


@pytest.mark.parametrize("name", list(L.LOSSES))
def test_grad_and_vmap(name, small):
    loss = L.get_loss(name, ignore_index=255, weight=torch.tensor([1.0, 2.0, 0.5]))
    # vmap over an ensemble axis: E models' logits for the same batch.
    ensemble = torch.stack([small.logits, 2 * small.logits, -small.logits])
    values = torch.func.vmap(loss, in_dims=(0, None))(ensemble, small.target)
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(0, None))(ensemble, small.target)
    for i in range(3):
        logits = ensemble[i].clone().requires_grad_(True)
        value = loss(logits, small.target)
        (grad,) = torch.autograd.grad(value, logits)
        torch.testing.assert_close(values[i], value)
        torch.testing.assert_close(grads[i], grad)
    # vmap over the batch: per-image losses (each image a batch of one).
    per_image = torch.func.vmap(lambda x, t: loss(x[None], t[None]))(small.logits, small.target)
    expected = torch.stack([loss(small.logits[i : i + 1], small.target[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(per_image, expected)


@pytest.fixture
def fresh_dynamo():
    """Every compiled grad_and_value shares one code object; reset so tests do not pile up its cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(L.LOSSES))
def test_every_loss_and_its_gradient_capture_as_one_graph(name, small, fresh_dynamo):
    loss = L.get_loss(name, ignore_index=255, weight=torch.tensor([1.0, 2.0, 0.5]))
    step = torch.func.grad_and_value(loss)
    grad, value = torch.compile(step, fullgraph=True, backend="aot_eager")(small.logits, small.target)
    eager_grad, eager_value = step(small.logits, small.target)
    torch.testing.assert_close(value, eager_value)
    torch.testing.assert_close(grad, eager_grad)


@pytest.mark.parametrize("loss", [L.cross_entropy, L.soft_iou], ids=["cross_entropy", "soft_iou"])
def test_compiles_with_inductor_fullgraph(loss, small, fresh_dynamo):
    fn = functools.partial(loss, ignore_index=255)
    compiled = torch.compile(torch.func.grad_and_value(fn), fullgraph=True)
    grad, value = compiled(small.logits, small.target)
    eager_grad, eager_value = torch.func.grad_and_value(fn)(small.logits, small.target)
    torch.testing.assert_close(value, eager_value)
    torch.testing.assert_close(grad, eager_grad)


# ----------------------------------------------------------------------------- registry and validation


def test_registry_binds_keywords(small):
    args = (small.logits, small.target)
    w = torch.tensor([1.0, 2.0, 0.5])
    assert set(L.LOSSES) == {"ce", "soft_iou", "soft_iou_log", "dice", "tversky", "focal", "ce_dice"}
    torch.testing.assert_close(
        L.get_loss("soft_iou_log", ignore_index=255)(*args), L.soft_iou(*args, log=True, ignore_index=255)
    )
    torch.testing.assert_close(
        L.get_loss("dice", ignore_index=255, weight=w)(*args), L.dice(*args, ignore_index=255, weight=w)
    )
    torch.testing.assert_close(
        L.get_loss("focal", gamma=1.0, ignore_index=255)(*args), L.focal(*args, gamma=1.0, ignore_index=255)
    )
    torch.testing.assert_close(
        L.get_loss("ce_dice", ignore_index=255)(*args),
        L.cross_entropy(*args, ignore_index=255) + L.dice(*args, ignore_index=255),
    )
    combined = L.combine({L.get_loss("ce"): 2.0, L.get_loss("tversky", alpha=0.5, beta=0.5): 1.0})
    torch.testing.assert_close(
        combined(*args, ignore_index=255),
        2 * L.cross_entropy(*args, ignore_index=255) + L.dice(*args, ignore_index=255),
    )


def test_registry_errors():
    with pytest.raises(ValueError, match="valid names: ce, soft_iou"):
        L.get_loss("iou")
    with pytest.raises(TypeError, match="gamma"):
        L.get_loss("dice", gamma=2.0)
    with pytest.raises(ValueError, match="non-empty"):
        L.combine({})


@pytest.mark.parametrize(
    ("logits", "target", "kw", "match"),
    [
        (torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), {}, "logits must be a float tensor"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4, dtype=torch.long), {}, "logits must"),
        (torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.int32), {}, "target must be int64"),
        (torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long), {}, r"matching logits' N, H, W"),
        (torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), {"weight": torch.ones(2)}, "weight"),
        (torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), {"eps": 0.0}, "eps"),
    ],
)
def test_bad_arguments_name_the_argument(logits, target, kw, match):
    loss = L.soft_iou if "eps" in kw else L.cross_entropy
    with pytest.raises(ValueError, match=match):
        loss(logits, target, **kw)


def test_bad_hyperparameters():
    logits, target = torch.randn(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="gamma"):
        L.focal(logits, target, gamma=-1.0)
    with pytest.raises(ValueError, match="alpha and beta"):
        L.tversky(logits, target, alpha=-0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.cross_entropy(logits, target, label_smoothing=1.5)
