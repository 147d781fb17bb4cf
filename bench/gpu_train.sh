#!/usr/bin/env bash
# Train the default-size SDDuSR on a GPU within a time budget, from photos carried to the machine.
#
# The device machine reaches no package registry, so the photos travel with the call: put the
# photo cache (photos.json, the photos it lists and the packages' copyright files, as
# `python -m sddusr_engine.data fetch` leaves them) in .gpu_carry/photos, ignored by git, and an
# optional starting point in .gpu_carry/init.safetensors. Usage (from the repo root):
#   bench/gpu_train.sh SECONDS OUTDIR
# Writes OUTDIR/weights_gpu.safetensors and OUTDIR/train_log.jsonl. The recipe is the one of
# weights/MODEL_CARD.md's runs, with the paper's 128-px crops and a larger batch.
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:?time budget in seconds}
dest=${2:?output folder}
cache=${SDDUSR_PHOTO_CACHE:-$HOME/.cache/sddusr/photos}
work=${GPU_TRAIN_WORK:-/tmp/sddusr_gpu_train}
mkdir -p "$dest" "$work" "$cache"
# photos.json names the photos by absolute path under the cache it was made in
src_cache=$(python -c "import json; print(json.load(open('.gpu_carry/photos/photos.json'))['cache'])")
if [[ "$src_cache" != "$cache" ]]; then
    echo "gpu_train.sh: photos.json was made for $src_cache; set SDDUSR_PHOTO_CACHE to that" >&2
    exit 2
fi
cp -a .gpu_carry/photos/. "$cache/"
t0=$SECONDS
python -m sddusr_engine.data prepare --cache "$cache" --out "$work/pairs" >"$work/prepare.log"
echo "gpu_train.sh: pairs made in $((SECONDS - t0)) s"
init=()
[[ -f .gpu_carry/init.safetensors ]] && init=(--init .gpu_carry/init.safetensors)
python -m sddusr_engine.train --data "$work/pairs" --out "$work/run" --device "${GPU_TRAIN_DEVICE:-cuda}" \
    ${init[@]+"${init[@]}"} --time-budget "$budget" --steps 100000 \
    --batch-size 8 --crop 128 --p-center 0.9 --lr 2e-4 --lr-min 1e-6 --warmup 20 \
    --mask-weight 1e-2 --match-weight 1e-2 --match-temperature 0.07 --flow-epe-weight 1e-1 \
    --log-every 20 --ckpt-every 200 --val-every 200 --val-limit 2 --seed 11 \
    --model channels=32 trunk_groups=2 trunk_blocks=3 encoder_blocks=2 decoder_blocks=2 \
    tokens=64 token_dim=32 global_skip=true
cp "$work/run/weights.safetensors" "$dest/weights_gpu.safetensors"
cp "$work/run/log.jsonl" "$dest/train_log.jsonl"
