"""Where the tests find the real Oxford-IIIT Pet sample: ``../shared/data/oxford-pets-sample``
beside the repository, or the folder named by ``FSEG_SAMPLE_DATA``."""

import os
from pathlib import Path

_BESIDE_REPO = Path(__file__).resolve().parents[2] / "shared" / "data" / "oxford-pets-sample"
SAMPLE = Path(os.environ.get("FSEG_SAMPLE_DATA") or _BESIDE_REPO)
