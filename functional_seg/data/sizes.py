"""Training sizes: S (an S x S square) or (H, W), as ``prepare``, ``Preprocess`` and the CLI's
``--size S`` / ``--size HxW`` give them; one spelling of each for file names and messages."""

from __future__ import annotations

__all__ = ["size_hw", "size_text"]


def _side(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` of a size: S means S x S.

    Raises:
        ValueError: not a positive int S or a pair (H, W) of them.
    """
    if _side(size):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(_side(v) for v in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"size must be a positive int S or a pair (H, W) of them, got {size!r}")


def size_text(size: int | tuple[int, int]) -> str:
    """"128" for a square, "512x1024" (H x W) otherwise."""
    h, w = size_hw(size)
    return str(h) if h == w else f"{h}x{w}"
