"""Data: readers per layout, the sharded prepared cache, a prefetching loader and pure on-device augmentation.

Data flows one way::

    files --prepare--> shards on disk --> PreparedData (uint8 [N, 3, H, W], masks uint8 [N, H, W],
          names, class_names; in memory, or read from the shards per batch)
          --Loader.epoch(key)--> uint8 images [B, 3, H, W], int64 masks [B, H, W] on the device
          --to_float, augment(key, ..., cfg), normalize--> float model input

``prepare(root, ...)`` detects the layout (``detect``): Oxford-IIIT Pet (``oxford_pets``), a
generic ``images/`` + ``masks/`` folder (``generic``) or Pascal VOC (``voc``); all of them decode
through ``read_rgb`` / ``read_mask`` (``decode``) and one sample loader (``sample``).

``labels`` sits below them all (``IGNORE_INDEX`` = 255 marks ignored and padded pixels in every
layout); each layout names its own classes (Oxford: 0 = pet, 1 = background, 2 = border).

The names below are imported on first use (PEP 562), so the pure train step, which needs only
``augmentation``, ``labels`` and ``preprocess``, never imports PIL or a dataset reader, and
``fseg --help`` (``DataConfig``'s flags) imports no torch.
"""

from __future__ import annotations

from ..core.lazy import lazy_exports

_EXPORTS = {
    "augmentation": ("IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "AugmentConfig", "augment", "augment_preset",
                "normalize", "to_float"),
    "decode": ("read_mask", "read_rgb"),
    "labels": ("IGNORE_INDEX", "POLICIES", "LabelMap", "unnamed"),
    "splits": ("DataConfig", "Splits", "split_data"),
    "errors": ("DataError", "DataWarning"),
    "layouts": ("LAYOUTS", "detect"),
    "loader": ("Loader",),
    "oxford_pets": ("CLASS_NAMES", "NUM_CLASSES", "SPLITS", "find_root", "read_split"),
    "prepared": ("PreparedData", "overlap"),
    "cache": ("prepare",),
    "synthetic": ("make_generic_dataset", "make_synthetic_dataset", "make_voc_dataset"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
