"""Hypothesis strategies for segmentation losses and metrics: small (logits, target) batches.

Hypothesis draws the shape, the logit scale (up to 1e4, to probe saturated softmax), the
ignore label and a seed; a seeded local ``torch.Generator`` fills the tensors, which keeps
examples cheap and never touches torch's global RNG.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from hypothesis import strategies as st

IGNORE_LABELS = (None, 255, -1)


class SegBatch(NamedTuple):
    logits: torch.Tensor  # float32 [N, C, H, W]
    target: torch.Tensor  # int64 [N, H, W], labels in [0, C) or ignore_index
    ignore_index: int | None

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]

    @property
    def valid(self) -> torch.Tensor:
        """bool [N, H, W]: the pixels that count."""
        if self.ignore_index is None:
            return torch.ones_like(self.target, dtype=torch.bool)
        return self.target != self.ignore_index


@st.composite
def seg_batches(
    draw,
    *,
    max_n: int = 3,
    min_c: int = 2,
    max_c: int = 4,
    max_side: int = 5,
    ignore_labels=IGNORE_LABELS,
    scales=(1.0, 5.0, 1e4),
) -> SegBatch:
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(min_c, max_c))
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    scale = draw(st.sampled_from(scales))
    ignore_index = draw(st.sampled_from(ignore_labels))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    logits = scale * torch.randn(n, c, h, w, generator=g)
    # Few classes per batch on purpose: absent classes are a case the losses must handle.
    used = draw(st.integers(1, c))
    target = torch.randint(0, used, (n, h, w), generator=g)
    if ignore_index is not None:
        drop = torch.rand(n, h, w, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))
        target = torch.where(drop, torch.full_like(target, ignore_index), target)
    return SegBatch(logits, target, ignore_index)


def class_weights(c: int, seed: int) -> torch.Tensor:
    """Positive float32 [C] class weights."""
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 2.0 * torch.rand(c, generator=g)


def perfect_logits(batch: SegBatch, margin: float = 40.0) -> torch.Tensor:
    """Logits with ``margin`` on the true class at every counted pixel (others keep theirs)."""
    c = batch.num_classes
    safe = torch.where(batch.valid, batch.target, torch.zeros_like(batch.target))
    onehot = torch.nn.functional.one_hot(safe, c).permute(0, 3, 1, 2).to(batch.logits.dtype)
    return torch.where(batch.valid.unsqueeze(1), margin * onehot, batch.logits)
