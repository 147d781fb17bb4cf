#!/usr/bin/env bash
# Train the default-size SDDuSR on a GPU within a time budget, from photos carried to the machine.
#
# A GPU machine without network access gets the photos with the repository: put the
# photo cache (photos.json, the photos it lists and the packages' copyright files, as
# `python -m sddusr_engine.data fetch` leaves them) in .gpu_carry/photos, ignored by git, and the
# starting point in .gpu_carry/init.safetensors (float32). Usage (from the repo root):
#   bench/gpu_train.sh prepare            make the pairs (CPU only; can run beside GPU work)
#   bench/gpu_train.sh profile OUTDIR     6 steps under torch.profiler -> OUTDIR/train_profile.txt
#   bench/gpu_train.sh run SECONDS OUTDIR train for SECONDS of stepping
#   bench/gpu_train.sh SECONDS OUTDIR     prepare, then run
# GPU_TRAIN_WORK (default /tmp/sddusr_gpu_train) holds the pairs and the run folder.
# `run` writes OUTDIR/weights_gpu.safetensors and OUTDIR/train_log.jsonl. The recipe is version 3's
# second stage (weights/MODEL_CARD.md) with the paper's 128-px crops, batch 8 and `--fast`
# (cuDNN autotuning and TF32: the run does not repeat bit for bit).
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${SDDUSR_PHOTO_CACHE:-$HOME/.cache/sddusr/photos}
work=${GPU_TRAIN_WORK:-/tmp/sddusr_gpu_train}
mkdir -p "$work" "$cache"

prepare() {
    # photos.json names the photos by absolute path under the cache it was made in
    local src_cache t0=$SECONDS
    src_cache=$(python -c "import json; print(json.load(open('.gpu_carry/photos/photos.json'))['cache'])")
    if [[ "$src_cache" != "$cache" ]]; then
        echo "gpu_train.sh: photos.json was made for $src_cache; set SDDUSR_PHOTO_CACHE to that" >&2
        exit 2
    fi
    cp -a .gpu_carry/photos/. "$cache/"
    python -m sddusr_engine.data prepare --cache "$cache" --out "$work/pairs" >"$work/prepare.log"
    echo "gpu_train.sh: pairs made in $((SECONDS - t0)) s"
}

# version 3's second stage: everything but SpyNet and the held offset/mask conv of the alignment
recipe=(
    --device "${GPU_TRAIN_DEVICE:-cuda}" --fast --workers 4
    --batch-size 8 --crop 128 --p-center 0.9 --lr 2e-4 --lr-min 1e-6 --warmup 20
    --mask-weight 1e-2 --match-weight 1e-2 --match-loss-temperature 0.07 --flow-epe-weight 1e-1
    --train-only SISR,upsample,lr_nearby,ref_head,ref_encoder,Ref_align.dcnpack.weight,Ref_align.dcnpack.bias,feature_match,alpha,mask_generator,tdl,AdaFuison,fusion_tail,decoder
    --model channels=32 trunk_groups=2 trunk_blocks=3 encoder_blocks=2 decoder_blocks=2
    tokens=64 token_dim=32 global_skip=true warp_norm=coverage
)
# GPU_TRAIN_EXTRA: more arguments, after the recipe's and the run's (the last wins: --seed too),
# e.g. a CPU smoke test's
# "--device cpu --batch-size 1 --crop 32"
read -r -a extra <<<"${GPU_TRAIN_EXTRA:-}"
recipe+=(${extra[@]+"${extra[@]}"})
# GPU_TRAIN_INIT: the starting weights (default .gpu_carry/init.safetensors); "none" trains from
# scratch. A missing file is an error, not a silent fresh start: a call made without
# `carry: [".gpu_carry"]` once spent its minutes training from random weights.
init_file=${GPU_TRAIN_INIT:-.gpu_carry/init.safetensors}
init=()
need_init() {
    [[ $init_file == none ]] && return
    if [[ ! -f $init_file ]]; then
        echo "gpu_train.sh: no starting weights at $init_file (GPU_TRAIN_INIT=none trains from scratch)" >&2
        exit 2
    fi
    init=(--init "$init_file")
}

case ${1:?usage: gpu_train.sh prepare|profile OUT|run SECONDS OUT|SECONDS OUT} in
prepare)
    prepare
    ;;
profile)
    need_init
    dest=${2:?output folder}
    mkdir -p "$dest"
    python bench/profile_train.py --rows 40 -- --data "$work/pairs" --steps 6 --log-every 1 \
        --seed 11 ${init[@]+"${init[@]}"} "${recipe[@]}" >"$dest/train_profile.txt" 2>&1
    tail -n 60 "$dest/train_profile.txt"
    ;;
run | [0-9]*)
    need_init
    if [[ $1 == run ]]; then
        shift
    else
        prepare
    fi
    budget=${1:?time budget in seconds}
    dest=${2:?output folder}
    mkdir -p "$dest"
    python -m sddusr_engine.train --data "$work/pairs" --out "$work/run" \
        --seed 11 --log-every 50 --ckpt-every 500 --val-every 100000 --val-limit 6 \
        ${init[@]+"${init[@]}"} --time-budget "$budget" --steps 100000 "${recipe[@]}"
    cp "$work/run/weights.safetensors" "$dest/weights_gpu.safetensors"
    cp "$work/run/log.jsonl" "$dest/train_log.jsonl"
    ;;
*)
    echo "gpu_train.sh: unknown command $1" >&2
    exit 2
    ;;
esac
