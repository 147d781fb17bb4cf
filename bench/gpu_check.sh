#!/usr/bin/env bash
# GPU check, in one call of the device machine: the CUDA-only tests, then the stages named in
# GPU_STAGES (default: the pipeline benchmark, the kernel benchmark and the launch-setting sweep);
# with GPU_TRAIN=SECONDS and photos carried in .gpu_carry/ (see bench/gpu_train.sh), a profiled,
# time-boxed training run after the tests (GPU_PROFILE=0: without the 6-step profile before it;
# GPU_TRAIN_EXTRA: arguments for it, see bench/gpu_train.sh). E.g. GPU_TRAIN=600 GPU_DEADLINE=560
# GPU_STAGES= .
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

# With GPU_TRAIN: the pairs are made on the CPU while the tests hold the GPU; the training then
# has the GPU to itself: a 6-step profile, then stepping until GPU_DEADLINE seconds after the
# script's start less GPU_TRAIN_MARGIN (start-up, the final validation, copies), or for GPU_TRAIN
# seconds, whichever is shorter.
prep_pid=
if [[ -n "${GPU_TRAIN:-}" && -f .gpu_carry/photos/photos.json ]]; then
    bench/gpu_train.sh prepare >"$OUT/prepare.log" 2>&1 &
    prep_pid=$!
fi

stage tests "${GPU_TESTS_LIMIT:-240}" python -m pytest -q -m gpu tests -p no:cacheprovider -o addopts=""

if [[ -n "$prep_pid" ]]; then
    wait "$prep_pid" || failed=1
    tee -a "$LOG" <"$OUT/prepare.log"
    [[ ${GPU_PROFILE:-1} == 1 ]] && stage profile 90 bench/gpu_train.sh profile "$OUT"
    budget=$GPU_TRAIN
    if [[ -n "${GPU_DEADLINE:-}" ]]; then
        left=$((GPU_DEADLINE - SECONDS - ${GPU_TRAIN_MARGIN:-90}))
        ((left < budget)) && budget=$left
    fi
    if ((budget >= 60)); then
        stage train $((budget + ${GPU_TRAIN_MARGIN:-90})) bench/gpu_train.sh run "$budget" "$OUT"
    else
        echo "gpu_check.sh: ${budget}s left for training; skipped" | tee -a "$LOG"
    fi
fi

for name in ${GPU_STAGES-pipeline kernels sweep}; do
    case $name in
    # GPU_PIPELINE_ARGS: e.g. "--variants sddusr --no-baseline --shipped --ensemble 8"; the default
    # also times the shipped weights plain and with 100 steps of self-adaptation (never yet on a GPU)
    pipeline) stage pipeline 180 python bench/bench_pipeline.py --precision fp16 --backend triton --json "$OUT/pipeline.json" --profile "$OUT" ${GPU_PIPELINE_ARGS---shipped --adapt 100} ;;
    kernels) stage kernels 120 python bench/bench_kernels.py --json "$OUT/kernels.json" ;;
    sweep) stage sweep 90 python bench/sweep_configs.py --json "$OUT/sweep.json" ;;
    *) echo "gpu_check.sh: unknown stage $name" | tee -a "$LOG"; failed=1 ;;
    esac
done

{
    echo
    echo "=== stages ==="
    printf '%s\n' "${summary[@]}"
} | tee -a "$LOG"
exit $failed
