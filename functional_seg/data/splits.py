"""Which images a run trains, validates and tests on: ``DataConfig`` and ``split_data``.

    split_data(root, DataConfig(size=128), seed=0) -> Splits(train, val, test, notes)

``train`` is ``train_split`` prepared at ``size`` (its first ``limit`` images); ``val`` is a seeded
``val_fraction`` carved from it (``val_split="carve"``, the default), another split by name, or
none; ``test`` is ``test_split`` (first ``test_limit`` images) or none. A training split that shares
images with the validation or test split is warned about, naming one. ``root=None`` is the built-in
synthetic dataset (Oxford layout), generated once into a temporary folder.

Every named split is looked up before any is prepared: a split the dataset lacks (VOC publishes
no ``test`` masks) is refused at once as a bad value of its setting (``--test-split: ...``, naming
the split file and the splits there are), not after minutes of decoding the training split.

``fseg train`` builds its ``--data``-side flags from ``DataConfig``'s fields (``core.settings``),
and the experiments call ``split_data`` too, so both see the same images for the same settings.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.settings import flag_of, invalid, setting
from .labels import POLICIES

__all__ = ["DataConfig", "Splits", "split_data", "check_splits", "parse_size", "synthetic_root", "fold_ids"]

# The built-in dataset: enough images that a small SegNet learns visibly in 3 CPU epochs at 64 px
# (about 0.6 mean IoU), generated in seconds.
SYNTHETIC_TRAINVAL, SYNTHETIC_TEST = 256, 64


def parse_size(text: str | int | tuple) -> int | tuple[int, int]:
    """'128' -> 128 (square S x S); '512x1024' -> (512, 1024) (H x W)."""
    if isinstance(text, (int, tuple)):
        return text
    parts = str(text).lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"expected S or HxW in pixels (e.g. 128 or 512x1024), got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ValueError(f"expected S or HxW in pixels (e.g. 128 or 512x1024), got {text!r}")


@dataclass(frozen=True)
class DataConfig:
    """The data side of a run: sizes, splits and the prepared cache."""

    size: int | tuple = setting(64, help="input side S, or HxW (e.g. 512x1024)", parse=parse_size, metavar="S")
    policy: str = setting("resize", choices=POLICIES,
                          help="resize: stretch to the size; pad: keep the aspect ratio and pad (ignored pixels)")
    train_split: str = setting("trainval", help="split to train on")
    val_split: str = setting("carve", help="split evaluated after every epoch to select best.safetensors: 'carve' "
                             "(a seeded --val-fraction of the training split), a split name, or 'none'; naming "
                             "the test split selects the model on it")
    val_fraction: float = setting(0.1, help="share of the training split carved for validation")
    test_split: str = setting("test", help="split evaluated once at the end with the selected weights "
                              "(RUN_DIR/test.json), or 'none'")
    limit: int | None = setting(None, help="train on the first N images of the training split only")
    test_limit: int | None = setting(None, help="test on the first N images of the test split only")
    cache_dir: str | None = setting(None, help="where prepared tensors are cached (default: "
                                    "$XDG_CACHE_HOME/functional_seg, else ~/.cache/functional_seg; never inside "
                                    "the data folder)")
    workers: int | None = setting(None, help="decoding processes (default: all cores)")
    skip_bad: bool = setting(False, help="skip unreadable or inconsistent samples and summarise them in one warning "
                             "(default: stop, counting the bad files and naming the first few)")
    binary_255: bool = setting(False, help="binary masks saved 0/255 (images/ + masks/ layout): read 255 as class 1, "
                               "not as ignore")
    full_res_test: bool = setting(False, help="also score the test split at full resolution: each image at its "
                                  "own size against its original mask (test.json's full_res), as papers report")

    def __post_init__(self):
        size = parse_size(self.size)
        sides = size if isinstance(size, tuple) else (size,)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sides):
            raise invalid("size", f"must be a positive integer S or HxW, got {self.size!r}")
        object.__setattr__(self, "size", size)
        if self.policy not in POLICIES:
            raise invalid("policy", f"must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise invalid("val_fraction", f"must lie strictly between 0 and 1, got {self.val_fraction!r}")
        for name in ("limit", "test_limit", "workers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise invalid(name, f"must be a positive integer, got {value!r}")

    def prepare_kwargs(self) -> dict[str, Any]:
        """The keywords ``prepare`` takes from this config."""
        return {"policy": self.policy, "cache_dir": self.cache_dir, "workers": self.workers,
                "strict": not self.skip_bad, "binary_255": self.binary_255}


@dataclass(frozen=True)
class Splits:
    """Prepared train / validation / test data, and one line saying where validation came from."""

    train: Any
    val: Any = None
    test: Any = None
    val_note: str = "none"
    test_split: str | None = None
    root: Path | None = None  # the dataset they were prepared from (full-resolution scoring reads it)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.train.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def synthetic_root(path: str | os.PathLike | None = None) -> Path:
    """The built-in synthetic dataset's folder, generated there first if it is not complete.

    Default: ``$FSEG_SYNTHETIC_DIR`` or a folder in the temporary directory named by its size.
    """
    from .synthetic import make_synthetic_dataset

    default = Path(tempfile.gettempdir()) / f"functional_seg-synthetic-{SYNTHETIC_TRAINVAL}-{SYNTHETIC_TEST}"
    root = Path(path) if path else Path(os.environ.get("FSEG_SYNTHETIC_DIR", default))
    if not (root / "annotations" / "test.txt").exists():
        print(f"generating the synthetic dataset in {root}", file=sys.stderr)
        make_synthetic_dataset(root, n_trainval=SYNTHETIC_TRAINVAL, n_test=SYNTHETIC_TEST, seed=0)
    return root


def _head(data, n: int | None):
    return data if n is None or n >= len(data) else data.subset(range(n))


def check_splits(root: str | os.PathLike, cfg: DataConfig, *, seed: int = 0) -> None:
    """Refuse, before anything is prepared, a named split the dataset at ``root`` does not have.

    Raises:
        SettingError: naming the setting (``test_split`` -> ``--test-split``), the missing split
            file and what to pass instead.
        DataError: no dataset at ``root`` (as ``prepare`` would).
    """
    from .errors import MissingSplit
    from .layouts import open_source

    named = {"train_split": cfg.train_split, "val_split": cfg.val_split, "test_split": cfg.test_split}
    for field, split in named.items():
        if split in ("carve", "none") and field != "train_split":
            continue
        try:
            open_source(root, split, seed=seed, binary_255=cfg.binary_255)
        except MissingSplit as err:
            held = " with --train-split train (trainval holds val)" if cfg.train_split == "trainval" else ""
            instead = {"train_split": "name a split the dataset has",
                       "val_split": f"pass {flag_of(field)} carve (a share of the training split) or none",
                       "test_split": f"pass {flag_of(field)} none, or {flag_of(field)} val{held}"}[field]
            raise invalid(field, f"{err}; {instead}") from None


def split_data(root: str | os.PathLike | None, cfg: DataConfig | None = None, *, seed: int = 0,
               progress: bool | None = None) -> Splits:
    """Prepare the run's splits as ``cfg`` says (see the module docstring).

    Raises:
        DataError: a missing or bad dataset (the message names the file and the fix).
    """
    from .cache import prepare
    from .prepared import overlap

    cfg = cfg or DataConfig()
    root = Path(root) if root is not None else synthetic_root()
    check_splits(root, cfg, seed=seed)

    def load(split: str, limit: int | None = None):
        return _head(prepare(root, split, cfg.size, progress=progress, **cfg.prepare_kwargs()), limit)

    train = load(cfg.train_split, cfg.limit)
    if cfg.val_split == "carve":
        train, val = train.carve(cfg.val_fraction, seed)
        note = f"{len(val)} images carved from {cfg.train_split} (fraction {cfg.val_fraction}, seed {seed})"
    elif cfg.val_split == "none":
        val, note = None, "none"
    else:
        val, note = load(cfg.val_split), cfg.val_split
        if cfg.val_split == cfg.test_split:
            note += " (best.safetensors is then selected on the test split: its score is no longer unbiased)"
    test = load(cfg.test_split, cfg.test_limit) if cfg.test_split != "none" else None
    for name, other in (("validation", val), ("test", test)):
        shared = overlap(train, other) if other is not None else []
        if shared:
            warnings.warn(f"{len(shared)} of the {len(other)} {name} images are also training images "
                          f"(e.g. {shared[0]}): their scores overstate what the model learned", stacklevel=2)
    return Splits(train, val, test, note, None if test is None else cfg.test_split, root)


def fold_ids(names, folds: int, seed: int):
    """int64 [N]: the K-fold fold of each sample, a seeded function of the sample names only
    (``source.seeded_order``; the same on every machine, whatever the data order), sizes within 1."""
    import torch

    from .source import seeded_order

    rank = {name: i for i, name in enumerate(seeded_order(names, seed))}
    return torch.tensor([rank[n] % folds for n in names], dtype=torch.int64)
