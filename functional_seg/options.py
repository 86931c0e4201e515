"""Names of the choices the library offers, importable without torch (so ``fseg --help`` is instant)."""

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "poly", "step")
