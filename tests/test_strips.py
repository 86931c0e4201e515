"""Full-size logits in strips: the resize equals ``F.interpolate`` (ATen's taps and weights, every
strip height), and the band-by-band window blend equals a blend over one full-size canvas,
emitting rows before the last windows are computed.

References are independent: ``F.interpolate`` itself (probed with one-hot inputs for its weights),
and a plain full-canvas accumulation written here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from functional_seg.strips import blended_strips, linear_taps, resized_strips, strip_rows, tiling, window_weight


def _logits(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _joined(strips, rows: int):
    firsts, parts = zip(*strips)
    heights = [p.shape[-2] for p in parts]
    assert all(0 < h <= rows for h in heights)
    assert list(firsts) == [sum(heights[:i]) for i in range(len(heights))]  # consecutive, from row 0
    return torch.cat(parts, dim=-2)


@settings(max_examples=20)
@given(h=st.integers(1, 20), w=st.integers(1, 20), out_h=st.integers(1, 50), out_w=st.integers(1, 50),
       rows=st.integers(1, 80), p=st.integers(1, 2), seed=st.integers(0, 2**31))
def test_resized_strips_join_to_interpolate(h, w, out_h, out_w, rows, p, seed):
    small = _logits((p, 3, h, w), seed)
    expected = F.interpolate(small, size=(out_h, out_w), mode="bilinear", align_corners=False)
    got = _joined(list(resized_strips(small, (out_h, out_w), rows)), rows)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=2e-6)


@given(n_in=st.integers(1, 40), n_out=st.integers(1, 300))
@settings(max_examples=20)
def test_linear_taps_are_the_weights_interpolate_applies(n_in, n_out):
    # column j of the probe is what interpolate makes of a one-hot input at source position j
    probe = F.interpolate(torch.eye(n_in)[:, None, None, :], size=(1, n_out), mode="bilinear",
                          align_corners=False)[:, 0, 0, :]
    i0, i1, w0, w1 = linear_taps(n_in, n_out, 0, n_out)
    mine = torch.zeros(n_in, n_out)
    cols = torch.arange(n_out)
    mine.index_put_((i0, cols), w0, accumulate=True)
    mine.index_put_((i1, cols), w1, accumulate=True)
    torch.testing.assert_close(mine, probe, rtol=0, atol=2e-6)
    assert ((i0 >= 0) & (i1 < n_in) & (i1 - i0 <= 1)).all()


def test_strip_rows_fit_the_budget():
    assert strip_rows(100, 10) == 10 and strip_rows(99, 10) == 9
    assert strip_rows(5, 10) == 1  # never zero rows


def _canvas_blend(field: torch.Tensor, plan, weight: torch.Tensor) -> torch.Tensor:
    """The blend over one full-size canvas (what predict did before strips): [P, C, H', W'] sums."""
    (win_h, win_w), (full_h, full_w) = plan.window, plan.canvas
    total = torch.zeros(field.shape[0], field.shape[1], full_h, full_w)
    norm = torch.zeros(1, full_h, full_w)
    for y, x in plan.boxes:
        total[:, :, y:y + win_h, x:x + win_w] += _window_logits(field, y, x, plan) * weight
        norm[:, y:y + win_h, x:x + win_w] += weight
    h, w = plan.size
    return (total / norm)[:, :, :h, :w]


def _window_logits(field: torch.Tensor, y: int, x: int, plan) -> torch.Tensor:
    """A window's logits: the field under it plus a box-dependent offset, so windows disagree."""
    win_h, win_w = plan.window
    return field[:, :, y:y + win_h, x:x + win_w] + 0.1 * (y + 2 * x) / (1 + plan.canvas[0] + plan.canvas[1])


@given(h=st.integers(1, 60), w=st.integers(1, 60), tile=st.sampled_from([8, 12, 16]),
       overlap=st.sampled_from([0.0, 0.25, 0.5, 0.75]), batch=st.integers(1, 6), rows=st.integers(1, 12),
       p=st.integers(1, 2), seed=st.integers(0, 2**31))
def test_band_by_band_blend_equals_the_full_canvas_blend(h, w, tile, overlap, batch, rows, p, seed):
    plan = tiling((h, w), tile, overlap, stride=4)
    field = _logits((p, 2, *plan.canvas), seed)
    calls: list[list[tuple[int, int]]] = []

    def windows(boxes):
        calls.append(list(boxes))
        return torch.stack([_window_logits(field, y, x, plan) for y, x in boxes], dim=1)

    weight = window_weight(*plan.window)
    got = _joined(list(blended_strips(windows, plan, batch_size=batch, rows=rows)), rows)
    torch.testing.assert_close(got, _canvas_blend(field, plan, weight), rtol=1e-6, atol=1e-6)
    assert [b for c in calls for b in c] == plan.boxes and all(len(c) <= batch for c in calls)
    for c in calls:  # one band's windows, or whole bands: the sums held stay about one window high
        rows = {y for y, _ in c}
        assert len(rows) == 1 or len(c) == len(rows) * len(plan.xs)


def test_rows_are_emitted_before_the_last_windows_run():
    """Bounded memory: the top rows leave before the bottom bands are computed."""
    plan = tiling((100, 40), 16, 0.25, stride=4)
    assert len(plan.ys) >= 6
    field = _logits((1, 2, *plan.canvas), 0)
    computed = []

    def windows(boxes):
        computed.extend(boxes)
        return torch.stack([_window_logits(field, y, x, plan) for y, x in boxes], dim=1)

    seen_at_first_yield = None
    for first, strip in blended_strips(windows, plan, batch_size=len(plan.xs), rows=4):
        if seen_at_first_yield is None:
            seen_at_first_yield = len(computed)
            # every window over the strip is in; none from the third band on
            assert all(y >= first + strip.shape[-2] for y, _ in plan.boxes[len(computed):])
    assert seen_at_first_yield <= 2 * len(plan.xs) < len(plan.boxes)


def test_a_side_shorter_than_a_window_gets_one_window_rounded_to_the_stride():
    plan = tiling((10, 50), 16, 0.5, stride=4)
    assert plan.window == (12, 16) and plan.canvas == (12, 50) and plan.ys == (0,)
    assert plan.xs[0] == 0 and plan.xs[-1] == 50 - 16
