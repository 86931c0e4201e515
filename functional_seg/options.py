"""Names of the choices the library offers, importable without torch (``fseg --help`` builds its
flags from the configs, which name their choices from here); tests check each against its registry."""

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "poly", "step")
PRECISIONS = ("fp32", "bf16")
WEIGHTS = ("auto", "params", "ema")
LOSSES = ("ce", "soft_iou", "soft_iou_log", "dice", "tversky", "focal", "ce_dice")
AUGMENT_PRESETS = ("none", "flip", "flip_jitter", "flip_jitter_full", "flip_jitter_crop")
AUDIT_METHODS = ("self_confidence", "normalized_margin", "adjusted_self_confidence")
TTA_MODES = ("none", "flip")  # test-time views: the image, or the image and its mirror
