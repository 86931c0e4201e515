"""Data: readers per layout, the prepared cache, an in-memory loader and pure on-device augmentation.

Data flows one way::

    files --prepare--> PreparedData (uint8 [N, 3, S, S], masks uint8 [N, S, S], names, class_names)
          --Loader.epoch(key)--> uint8 images [B, 3, S, S], int64 masks [B, S, S] on the device
          --to_float, augment(key, ..., cfg), normalize--> float model input

``prepare(root, ...)`` detects the layout (``detect``): Oxford-IIIT Pet (``oxford_pets``), a
generic ``images/`` + ``masks/`` folder (``generic``) or Pascal VOC (``voc``); all of them decode
through ``read_rgb`` / ``read_mask`` (``decode``) and one sample loader (``sample``).

Oxford labels: 0 = pet, 1 = background, 2 = border (``CLASS_NAMES``); in every layout
``IGNORE_INDEX`` (255) marks ignored and padded pixels.
"""

from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    AugmentConfig,
    augment,
    augment_preset,
    normalize,
    to_float,
)
from .decode import read_mask, read_rgb
from .layouts import LAYOUTS, detect
from .loader import Loader
from .oxford_pets import (
    CLASS_NAMES,
    IGNORE_INDEX,
    NUM_CLASSES,
    POLICIES,
    SPLITS,
    DataError,
    DataWarning,
    find_root,
    read_split,
)
from .prepared import PreparedData, overlap, prepare
from .synthetic import make_generic_dataset, make_synthetic_dataset, make_voc_dataset

__all__ = [
    "CLASS_NAMES",
    "NUM_CLASSES",
    "IGNORE_INDEX",
    "SPLITS",
    "POLICIES",
    "DataError",
    "DataWarning",
    "find_root",
    "read_split",
    "PreparedData",
    "prepare",
    "overlap",
    "Loader",
    "AugmentConfig",
    "PRESETS",
    "augment",
    "augment_preset",
    "normalize",
    "to_float",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "make_synthetic_dataset",
    "make_generic_dataset",
    "make_voc_dataset",
    "LAYOUTS",
    "detect",
    "read_rgb",
    "read_mask",
]
