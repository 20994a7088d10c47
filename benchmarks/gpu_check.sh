#!/usr/bin/env bash
# One prepared GPU check, for a machine with one NVIDIA GPU after the README's install (with the test extra):
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: benchmarks/_out/gpu_check
#
# Steps, each under a hard `timeout`, all of them within GPU_CHECK_BUDGET seconds (default 480 = 8 min):
#   flash_attn      pip install flash-attn if it is not importable (short timeout; the check goes on without it)
#   gpu_tests       pytest -m "gpu and not vllm and not flash" tests/  (JUnit XML: any skip or failure fails the check)
#   gpu_tests_flash pytest -m "gpu and flash" tests/     (only where flash-attn imports; then its skips fail too)
#   gpu_tests_vllm  pytest -m "gpu and vllm" tests/      (only where vllm imports; then its skips fail too)
#   kernel_suite    the pytest-benchmark kernel suite on CUDA (-k cuda): Triton vs eager vs torch.compile (bf16),
#                   fraction of measured device copy bandwidth (target >= 70% at B=16384, H=4096, C=32)
#   workloads       bench_gpu_workloads.py: 1B Llama reward training (bf16, prefix sharing) vs the reference's
#                   way and TRL; 1 x 1024 pool scoring vs HF batched and vLLM's pooling runner
#   report          gpu_check_report.py: OUT_DIR/gpu_check.json and gpu_check.md
# Exit status: 0 only if every step succeeded and the GPU tests ran with nothing skipped or failed.
# Without CUDA it stops at once with a message and exit status 2. Sized (expected ~4-5 min on an H200) so that
# two runs fit in 15 minutes of GPU time; the budget is a hard ceiling, not the expected time.
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${1:-${GPU_CHECK_OUT:-benchmarks/_out/gpu_check}}"
PY="${PYTHON:-python}"
BUDGET="${GPU_CHECK_BUDGET:-480}"
START=$(date +%s)

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: FAILED: no CUDA device is visible to PyTorch ($PY: torch.cuda.is_available() is False)." >&2
    echo "gpu_check: this check needs one NVIDIA GPU, its driver and a CUDA build of torch; nothing was run." >&2
    exit 2
fi

mkdir -p "$OUT"
rm -f "$OUT"/{steps.tsv,gpu_check.log,gpu_tests.xml,gpu_tests_vllm.xml,gpu_tests_flash.xml,bench_ops.json,workloads.json,gpu_check.json,gpu_check.md}
: > "$OUT/steps.tsv"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# step NAME LIMIT_S NOTE CMD...: runs CMD under `timeout`, capped by what is left of the budget (25 s kept: 10 for
# timeout's kill grace, 15 for the report), appends its output to the log and one line (name, exit, seconds,
# limit, note) to steps.tsv.
step() {
    local name=$1 limit=$2 note=$3
    shift 3
    local left=$(( BUDGET - ($(date +%s) - START) - 25 ))
    (( limit > left )) && limit=$left
    if (( limit < 5 )); then
        printf '%s\t124\t0\t%s\t%s\n' "$name" "$limit" "not started: the ${BUDGET} s budget is spent" >> "$OUT/steps.tsv"
        return 124
    fi
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" "$note" >> "$OUT/steps.tsv"
    echo "=== $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
    return $rc
}

"$PY" -c "import torch; print('gpu_check on', torch.cuda.get_device_name(0), '| torch', torch.__version__)" | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv >> "$LOG" 2>&1 || true

if "$PY" -c "import flash_attn" >/dev/null 2>&1; then
    printf 'flash_attn\t0\t0\t0\talready installed\n' >> "$OUT/steps.tsv"
else
    step flash_attn 25 "optional: pip install flash-attn (the check goes on without it)" \
        "$PY" -m pip install -q --no-build-isolation flash-attn \
        || echo "gpu_check: flash-attn did not install within its limit; going on without it" | tee -a "$LOG"
fi

step gpu_tests 160 "pytest -m 'gpu and not vllm and not flash' tests/" \
    "$PY" -m pytest -m "gpu and not vllm and not flash" tests/ -q -rfEs -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"

if "$PY" -c "import flash_attn" >/dev/null 2>&1; then
    step gpu_tests_flash 40 "pytest -m 'gpu and flash' tests/" \
        "$PY" -m pytest -m "gpu and flash" tests/ -q -rfEs -p no:cacheprovider --junitxml="$OUT/gpu_tests_flash.xml"
else
    printf 'gpu_tests_flash\t0\t0\t0\tnot run: flash-attn is not installed\n' >> "$OUT/steps.tsv"
fi

if "$PY" -c "import vllm" >/dev/null 2>&1; then
    step gpu_tests_vllm 60 "pytest -m 'gpu and vllm' tests/" \
        "$PY" -m pytest -m "gpu and vllm" tests/ -q -rfEs -p no:cacheprovider --junitxml="$OUT/gpu_tests_vllm.xml"
    VLLM_ARGS=(--vllm-timeout 75)
else
    printf 'gpu_tests_vllm\t0\t0\t0\tnot run: vllm is not installed\n' >> "$OUT/steps.tsv"
    VLLM_ARGS=(--skip-vllm)
fi

# torch.compile baselines in bf16 only: each compile costs seconds of CPU time, and 16 of them would not fit
step kernel_suite 150 "pytest benchmarks/ --benchmark-only -k 'cuda and not (float32 and compile)'" \
    "$PY" -m pytest benchmarks/test_bench_ops.py --benchmark-only -k "cuda and not (float32 and compile)" -q \
    -p no:cacheprovider \
    --benchmark-json="$OUT/bench_ops.json" --benchmark-columns=median,rounds --benchmark-sort=name

step workloads 130 "bench_gpu_workloads.py (1B Llama, bf16)" \
    "$PY" benchmarks/bench_gpu_workloads.py --out "$OUT/workloads.json" "${VLLM_ARGS[@]}"

timeout 15 "$PY" benchmarks/gpu_check_report.py "$OUT"
rc=$?
echo "gpu_check: $( ((rc == 0)) && echo PASSED || echo FAILED ) in $(( $(date +%s) - START )) s; see $OUT/gpu_check.md" >&2
exit $rc
