#!/usr/bin/env bash
# GPU check: the CUDA-only tests, then the kernel benchmark (table printed last).
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
python bench/bench_kernels.py ${json_args[@]+"${json_args[@]}"}
