#!/usr/bin/env bash
# Build what a GPU machine without network needs, in two git-ignored folders of the repository:
#   .whl/      torchopt + optree + graphviz wheels for Python 3.12 (the GPU image lacks them)
#   .devdata/  the Oxford-IIIT Pet sample downsized (short side 192 px, trimaps nearest): ~13 MB
# Then, on the GPU machine (carry .whl and .devdata):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   SUITE_SECONDS=540 bash benchmarks/gpu_suite.sh .devdata/oxford-pets-sample-small
#   (issue 12's figures only: PARTS=efficiency SUITE_SECONDS=540 bash benchmarks/gpu_suite.sh ...)
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLE="${1:-../shared/data/oxford-pets-sample}"
PY="${PYTHON:-python3}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl torchopt==0.7.3 optree==0.20.0 graphviz
"$PY" - "$SAMPLE" <<'PYEOF'
import shutil
import sys
from pathlib import Path

from PIL import Image

src, dst = Path(sys.argv[1]), Path(".devdata/oxford-pets-sample-small")
(dst / "images").mkdir(parents=True, exist_ok=True)
(dst / "annotations/trimaps").mkdir(parents=True, exist_ok=True)
for name in ("trainval.txt", "test.txt", "list.txt"):
    shutil.copy(src / "annotations" / name, dst / "annotations" / name)
count = 0
for image_path in sorted((src / "images").glob("*.jpg")):
    trimap = src / "annotations/trimaps" / (image_path.stem + ".png")
    if not trimap.exists():
        continue
    with Image.open(image_path) as im:
        im = im.convert("RGB")
    scale = 192 / min(im.size)
    size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
    im.resize(size, Image.BILINEAR).save(dst / "images" / image_path.name, quality=92)
    with Image.open(trimap) as tm:
        tm.resize(size, Image.NEAREST).save(dst / "annotations/trimaps" / trimap.name)
    count += 1
print(f"{count} images -> {dst} (Oxford-IIIT Pet, Parkhi et al. 2012, CC BY-SA 4.0)")
PYEOF
du -sh .whl .devdata
