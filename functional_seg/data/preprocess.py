"""The preprocessing contract: how raw RGB becomes model input, and what its labels mean.

One ``Preprocess`` is built when a run starts, recorded in every checkpoint's metadata
(``meta["preprocess"]``) and read back by ``fseg eval``, ``predict``, ``export`` and the
experiments, so a model is always fed the way it was trained::

    uint8 [N, 3, H, W] --to_float--> [0, 1] --normalize(mean, std)--> (channels_last) --> model

``size`` (None: any size, for steps and tests that do not care; S for S x S, recorded as an int
as it always was, so every checkpoint still loads; or (H, W), e.g. (512, 1024), with ``hw``
giving (H, W) either way) and ``policy`` say how the prepared data was made (stretch to the size,
or keep the aspect ratio and pad with ignored pixels);
``precision`` and ``channels_last`` how the model ran; ``class_names`` what label i means
(C = its length), ``ignore_index`` the label that no loss or metric counts, and ``layout`` the
dataset layout the labels came from ("oxford_pets", "generic", "voc"; the series' own figures,
which ignore Oxford's class 1, are reported for "oxford_pets" only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .augmentation import IMAGENET_MEAN, IMAGENET_STD, normalize, to_float
from .labels import IGNORE_INDEX, POLICIES

__all__ = ["Preprocess"]


def _is_side(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@dataclass(frozen=True)
class Preprocess:
    size: int | tuple[int, int] | None = None
    policy: str = "resize"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels_last: bool = False
    precision: str = "fp32"
    class_names: tuple[str, ...] | None = None
    ignore_index: int = IGNORE_INDEX
    layout: str | None = None

    def __post_init__(self):
        size = self.size
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_side(v) for v in size):
            # one spelling per size: (S, S) is recorded as S, as square sizes always were
            object.__setattr__(self, "size", int(size[0]) if size[0] == size[1] else (int(size[0]), int(size[1])))
        elif size is not None and not _is_side(size):
            raise ValueError(f"preprocess size must be a positive integer S or a pair (H, W), got {size!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"preprocess precision must be fp32 or bf16 (resolved), got {self.precision!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; expected one of {', '.join(POLICIES)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {self.mean!r}, {self.std!r}")
        if self.class_names is not None and not self.class_names:
            raise ValueError("class_names must name at least one class (or be None: not known)")

    @property
    def hw(self) -> tuple[int, int] | None:
        """(H, W) of the model input: (S, S) for a square size, None when the size is not fixed."""
        if self.size is None:
            return None
        return (self.size, self.size) if isinstance(self.size, int) else self.size

    @property
    def num_classes(self) -> int | None:
        """C, or None when the contract names no classes (a step that only normalises)."""
        return None if self.class_names is None else len(self.class_names)

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] (or float in [0, 1]) -> normalised float32 [N, 3, H, W] for the model."""
        x = to_float(images) if images.dtype == torch.uint8 else images.float()
        x = normalize(x, self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocess:
        """From checkpoint metadata; fields a file does not record keep their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**values)
