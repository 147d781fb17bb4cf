#!/usr/bin/env bash
# GPU check: the CUDA-only tests, the pipeline benchmark, then the kernel benchmark (table last).
# Installs nothing. With OUT set, the benchmark rows go to $OUT/kernels.json.
# Exits non-zero if any test or the benchmark fails.
set -euo pipefail
cd "$(dirname "$0")/.."

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA GPU visible')"
unset TRITON_INTERPRET  # compiled kernels, not the interpreter

python -m pytest -q -m gpu tests

json_args=()
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    json_args=(--json "$OUT/kernels.json")
fi
pipe_args=()
if [[ -n "${OUT:-}" ]]; then
    pipe_args=(--json "$OUT/pipeline.json")
fi
# Pipeline first, kernels last, so the kernel table is the last thing printed.
python bench/bench_pipeline.py --precision fp16 --backend triton ${pipe_args[@]+"${pipe_args[@]}"}
python bench/bench_kernels.py ${json_args[@]+"${json_args[@]}"}
