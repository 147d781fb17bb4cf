#!/usr/bin/env bash
# GPU check, in one call of the device machine: the CUDA-only tests, the pipeline benchmark, the
# kernel benchmark and the launch-setting sweep; with GPU_TRAIN=SECONDS and photos carried in
# .gpu_carry/ (see bench/gpu_train.sh), a time-boxed training run beside the tests.
# Installs nothing. Each stage is time-boxed and a failing stage does not stop the next; all output
# goes to $OUT/gpu_check.log, the benchmark rows to $OUT/*.json; a stage summary is printed last.
# Exits non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sddusr_gpu_check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET # compiled kernels, not the interpreter
# golden vectors: ../shared/golden does not travel to the device machine; .gpu_carry/golden may
[[ -d ../shared/golden || -z "$(ls .gpu_carry/golden 2>/dev/null)" ]] || export SDDUSR_GOLDEN_DIR=$PWD/.gpu_carry/golden
export SDDUSR_COMMIT=${SDDUSR_COMMIT:-$(cat .gpu_carry/commit 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)}

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA GPU visible')" || exit 2
summary=()
failed=0
stage() { # stage NAME LIMIT_S CMD...: run, log, time-box, record
    local name=$1 limit=$2 t=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s) ===" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [[ $rc -ne 0 ]] && failed=1
    summary+=("$(printf '%-10s rc=%-4s %4d s' "$name" "$rc" $((SECONDS - t)))")
}

{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
    echo "commit $SDDUSR_COMMIT"
} 2>&1 | tee -a "$LOG"

train_pid=
if [[ -n "${GPU_TRAIN:-}" && -f .gpu_carry/photos/photos.json ]]; then
    echo "=== train (background, ${GPU_TRAIN}s of steps) ===" | tee -a "$LOG"
    t_train=$SECONDS
    timeout --kill-after=10 $((GPU_TRAIN + 150)) bench/gpu_train.sh "$GPU_TRAIN" "$OUT" \
        >"$OUT/train.log" 2>&1 &
    train_pid=$!
fi

stage tests 240 python -m pytest -q -m gpu tests -p no:cacheprovider -o addopts=""

if [[ -n "$train_pid" ]]; then
    wait "$train_pid"
    rc=$?
    [[ $rc -ne 0 ]] && failed=1
    tail -n 25 "$OUT/train.log" | tee -a "$LOG"
    summary+=("$(printf '%-10s rc=%-4s %4d s' train "$rc" $((SECONDS - t_train)))")
fi

stage pipeline 150 python bench/bench_pipeline.py --precision fp16 --backend triton --json "$OUT/pipeline.json" --profile "$OUT"
stage kernels 120 python bench/bench_kernels.py --json "$OUT/kernels.json"
stage sweep 90 python bench/sweep_configs.py --json "$OUT/sweep.json"

{
    echo
    echo "=== stages ==="
    printf '%s\n' "${summary[@]}"
} | tee -a "$LOG"
exit $failed
