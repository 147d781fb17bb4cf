#!/usr/bin/env bash
# Two training recipes at once on one GPU, from the same pairs and the same starting weights, in
# one call of the device machine (a session gets few, and each start costs minutes). Measured on
# an H100 (2026-11-26): each run steps at half the speed of a lone run (0.28 s against 0.14 s per
# step for the default-size network, batch 8 of 128-px crops), so the GPU is shared, not doubled;
# what it saves is a second machine start and a second pairs build, and the two runs see the
# same crops in the same order (the same seed), so they differ only in their recipes.
#
# Usage (from the repo root, with .gpu_carry/ as bench/gpu_train.sh describes):
#   GPU_TRAIN_EXTRA_A="..." GPU_TRAIN_EXTRA_B="..." bench/gpu_train_ab.sh SECONDS OUTDIR
# makes the pairs once, then runs `bench/gpu_train.sh run SECONDS` for A and for B in parallel,
# each with its own GPU_TRAIN_EXTRA and run folder; writes OUTDIR/A and OUTDIR/B (weights and
# log, as gpu_train.sh does) and OUTDIR/A.log, OUTDIR/B.log, and prints each run's last log lines.
# Exits non-zero if either run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:?usage: gpu_train_ab.sh SECONDS OUTDIR}
dest=${2:?usage: gpu_train_ab.sh SECONDS OUTDIR}
base=${GPU_TRAIN_WORK:-/tmp/sddusr_gpu_train}
mkdir -p "$dest" "$base/A" "$base/B"

GPU_TRAIN_WORK=$base/A bench/gpu_train.sh prepare || exit 2
ln -sfn "$base/A/pairs" "$base/B/pairs"

pids=()
for run in A B; do
    var=GPU_TRAIN_EXTRA_$run
    GPU_TRAIN_WORK=$base/$run GPU_TRAIN_EXTRA=${!var:-} \
        bench/gpu_train.sh run "$budget" "$dest/$run" >"$dest/$run.log" 2>&1 &
    pids+=($!)
done
failed=0
for i in 0 1; do
    wait "${pids[$i]}" || failed=1
done
for run in A B; do
    var=GPU_TRAIN_EXTRA_$run
    echo "=== $run: ${!var:-} ==="
    tail -n 6 "$dest/$run.log"
done
exit $failed
