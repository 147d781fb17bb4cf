#!/usr/bin/env bash
# The GPU check: the CUDA-only tests, then the benchmarks named in GPU_STAGES (default: the
# pipeline, the 12 MP pair, the batch of 12 MP pairs, the kernels and the launch-setting sweep,
# in that order of importance), then one table of what ran and what it measured. Installs no
# dependency: run it where torch, triton and the test extras are; the project itself is
# installed editable (--no-deps) when its command module cannot be imported.
#
#   bash bench/gpu_check.sh                      everything, output under $OUT (default /tmp/sddusr_gpu_check)
#   GPU_STAGES="kernels" bash bench/gpu_check.sh the tests and the kernel benchmark only
#   GPU_STAGES= bash bench/gpu_check.sh          the tests only
#
# Stages: pipeline, pair12 (a 12 MP raw pair end to end, SDDUSR_PAIR="WIDE TELE" or a synthetic
# one made under /tmp), batch (four copies of that pair through the batch pipeline: pairs/s, the
# compute loop's idle share, the GPU's busy share), kernels, sweep. GPU_CHECK_BUDGET (s, default 540) bounds the whole check so
# that it fits one 10-minute call: each stage gets at most what is left of it, and a stage that
# would get under 30 s is skipped (reported as exit 124). GPU_TESTS_LIMIT (s, default 200) bounds the tests; GPU_PIPELINE_ARGS replaces the pipeline
# benchmark's extra arguments (default "--shipped --adapt 100": the shipped weights plain and with
# 100 steps of self-adaptation; every network also runs in the bounded-memory mode, tile 256). The
# pipeline's rows are also copied to bench/results/pipeline.json. Each stage is time-boxed and a failing stage does not stop the
# next; the log is $OUT/gpu_check.log, the benchmark rows $OUT/*.json. Exits non-zero if a stage
# failed. SDDUSR_COMMIT names the commit where the tree has no .git; SDDUSR_GOLDEN_DIR (or
# .gpu_carry/golden) points the tests at the published code's golden vectors.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sddusr_gpu_check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET # compiled kernels, not the interpreter
[[ -d ../shared/golden || -z "$(ls .gpu_carry/golden 2>/dev/null)" ]] || export SDDUSR_GOLDEN_DIR=$PWD/.gpu_carry/golden
export SDDUSR_COMMIT=${SDDUSR_COMMIT:-$(cat .gpu_carry/commit 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)}

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA GPU visible')" || exit 2
# the project itself, editable and without dependencies (the tests import its command module)
python -c "import sddusr_engine.cli" 2>/dev/null || python -m pip install -q --no-deps --no-build-isolation -e . || exit 2
summary=()
failed=0
BUDGET=${GPU_CHECK_BUDGET:-540}
stage() { # stage NAME LIMIT_S CMD...: run, log, time-box (within what is left of BUDGET), record
    local name=$1 limit=$2 t=$SECONDS rc left=$((BUDGET - SECONDS))
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < 30)); then
        echo "=== $name skipped: ${left}s of the ${BUDGET}s budget left ===" | tee -a "$LOG"
        failed=1
        summary+=("$name 124 0")
        return
    fi
    echo "=== $name (limit ${limit}s) ===" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [[ $rc -ne 0 ]] && failed=1
    summary+=("$name $rc $((SECONDS - t))")
}

{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
    echo "commit $SDDUSR_COMMIT"
} 2>&1 | tee -a "$LOG"

stage tests "${GPU_TESTS_LIMIT:-200}" python -m pytest -q -m gpu tests -p no:cacheprovider -o addopts=""

pair12_files() { # the 12 MP pair: SDDUSR_PAIR="WIDE TELE" for a phone's, else the synthetic
    # 4032x3024 pair of bench_registration.py, under /tmp (too big to come back with the results)
    if [[ -n ${SDDUSR_PAIR:-} ]]; then
        echo "$SDDUSR_PAIR"
    else
        [[ -f /tmp/sddusr_pair12/tele.png ]] || python bench/bench_registration.py --make-pair /tmp/sddusr_pair12 >/dev/null
        echo "/tmp/sddusr_pair12/wide.png /tmp/sddusr_pair12/tele.png"
    fi
}

for name in ${GPU_STAGES-pipeline pair12 batch kernels sweep}; do
    case $name in
    pipeline)
        stage pipeline 240 python bench/bench_pipeline.py --precision fp16 --backend triton --json "$OUT/pipeline.json" --profile "$OUT" ${GPU_PIPELINE_ARGS---shipped --adapt 100}
        # the latest GPU run's rows, where the repository keeps them
        [[ -f $OUT/pipeline.json ]] && mkdir -p bench/results && cp "$OUT/pipeline.json" bench/results/pipeline.json ;;
    kernels) stage kernels 120 python bench/bench_kernels.py --json "$OUT/kernels.json" ;;
    pair12) # a 12 MP pair end to end (registration included), bounded mode then fast
        stage pair12 180 python bench/bench_pipeline.py --precision fp16 --backend triton --pair $(pair12_files) --json "$OUT/pair12.json" ;;
    batch) # a folder of 12 MP pairs (copies, each registered and computed as its own pair)
        rm -rf /tmp/sddusr_batch12
        stage batch 120 python bench/bench_batch.py /tmp/sddusr_batch12 --make $(pair12_files) --copies 4 --json "$OUT/batch.json" ;;
    sweep) stage sweep 90 python bench/sweep_configs.py --json "$OUT/sweep.json" ;;
    *) echo "gpu_check.sh: unknown stage $name" | tee -a "$LOG"; failed=1 ;;
    esac
done

# The table, last: each stage's exit status and time, then the headline rows of each benchmark.
python - "$OUT" "${summary[@]}" <<'EOF' 2>&1 | tee -a "$LOG"
import json, re, sys
from pathlib import Path

out, stages = Path(sys.argv[1]), [s.split() for s in sys.argv[2:]]
print("\n| stage | exit | s | result |\n|---|---:|---:|---|")
def rows(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text())["rows"] if p.is_file() else []
def cut_short(name):  # a benchmark stopped by its time limit leaves its rows so far
    p = out / f"{name}.json"
    return p.is_file() and json.loads(p.read_text()).get("complete") is False
for name, rc, secs in stages:
    if name == "pipeline":
        res = "; ".join([f"{r['variant']} {r.get('mode', '')} {r['what'].split('tile ')[-1]}: "
                         f"{r['ms']:.0f} ms, {r['peak_gib']:.2f} GiB, {r.get('tflops', 0):.0f} TFLOP/s"
                         for r in rows(name) if "engine" in r["what"]]
                        + [f"{r['variant']} {r.get('mode', '')} FAILED: {r['error']}"
                           for r in rows(name) if r.get("error")]
                        + (["cut short: the rows above are all it measured"] if cut_short(name) else []))
    elif name == "pair12":
        res = "; ".join(f"{r['mode']}: {r['ms']:.0f} ms, {r['peak_gib']:.2f} GiB" for r in rows(name))
    elif name == "batch" and (out / "batch.json").is_file():
        b = json.loads((out / "batch.json").read_text())
        busy = b.get("gpu_busy_share")
        idle = b.get("compute_idle_share")
        res = (f"{b['written']}/{b['pairs']} pairs, {b['pairs_per_s']:.3f} pairs/s, compute loop idle "
               + ("-" if idle is None else f"{idle:.1%}")
               + ", GPU busy " + ("-" if busy is None else f"{busy:.1%}"))
    elif name == "kernels":
        res = "; ".join(f"{r['op']} {r['dtype']}: {r['ms']:.2f} ms" for r in rows(name)
                        if r["impl"] == "triton")
    elif name == "sweep":
        bad = [r for r in rows(name) if r["verdict"] not in ("ok", "default")]
        res = f"{len(rows(name))} settings, {len(bad)} mismatched or refused"
    elif name == "tests":  # pytest's closing line, e.g. "30 passed, 2 deselected in 123.4s"
        log = (out / "gpu_check.log").read_text(errors="replace").splitlines()
        res = next((ln.strip("= ") for ln in log if re.search(r"\d+ (passed|failed|error)", ln)), "")
    else:
        res = "see the log"
    print(f"| {name} | {rc} | {secs} | {res or '-'} |")
EOF
exit $failed
