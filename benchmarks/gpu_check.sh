#!/usr/bin/env bash
# The GPU check, from a bundle made by benchmarks/gpu_bundle.sh, on a machine that reaches no package index:
#
#     bash BUNDLE/gpu_check.sh [OUT_DIR]                   # on the GPU machine (python3 there: torch with CUDA)
#     bash benchmarks/gpu_check.sh --bundle BUNDLE [OUT_DIR]
#     bash benchmarks/gpu_check.sh --dry-run --bundle BUNDLE [OUT_DIR]   # rehearsal on a CPU machine (see below)
#
# OUT_DIR (default ./gpu_check_out) receives at most 8 files (the device tool brings back 8): steps.tsv,
# gpu_check.log, environment.json, gpu_tests.xml, bench_ops.json, workloads.json, gpu_check.json, gpu_check.md.
# Steps, each under a hard `timeout`, all within GPU_CHECK_BUDGET seconds (default 480 = 8 min, install included;
# 900 for a dry run):
#   verify          the bundle's files against its SHA256SUMS
#   install         pip install --no-index --no-deps --no-build-isolation of the bundle's wheels into a target dir
#   build           pip install of the source tree (same flags): the extension built by the image's compiler and
#                   pybind11; then the unpacked package sources are removed, so only the installed copy can import
#   imports         every module the check needs imports; versions -> environment.json
#   gpu_tests       pytest -m "gpu and not vllm and not flash" tests/test_gpu_*.py (JUnit XML: a skip fails)
#   gpu_tests_flash / gpu_tests_vllm   only where flash-attn / vllm import; else "not available on this machine"
#   kernel_suite    benchmarks/test_bench_ops.py on CUDA: Triton vs eager vs torch.compile, fraction of copy bandwidth
#   workloads       bench_gpu_workloads.py: 1B Llama reward training vs TRL and the reference's way; 1 x 1024 and
#                   64 x 32 pool scoring vs HF batched
#   report          gpu_check_report.py: gpu_check.json and gpu_check.md
# Exit status 0 only if every step passed and nothing but flash-attn / vLLM was skipped; 2 on bad usage or (not a
# dry run) without a CUDA device.
#
# --dry-run (or GPU_CHECK_DRY_RUN=1): every step but the CUDA ones, on this machine, into a FRESH virtual environment
# that holds only the GPU image's packages (benchmarks/gpu_image_packages.txt, linked from the Python that runs this
# script, CPU torch in place of CUDA's: gpu_bundle.py image-env) and then what the bundle installs. So a wheel missing
# from the bundle, a wrong path or an import that only the project's own venv satisfies fails here, not in a GPU
# window. CUDA steps become: gpu_tests collected (not run), the kernel suite collected, the workloads at tiny size on
# the CPU (TRL included). The bundle's wheels are CPython 3.12's: a rehearsal on another Python installs
# --host-wheels DIR instead (gpu_bundle.sh --host-wheels: the same names and versions built for it; checked equal).
set -u -o pipefail

usage() { echo "usage: gpu_check.sh [--dry-run [--host-wheels DIR]] [--bundle DIR] [OUT_DIR]" >&2; exit 2; }
DRY="${GPU_CHECK_DRY_RUN:-0}"
HOST_WHEELS="${GPU_CHECK_HOST_WHEELS:-}"
BUNDLE="${GPU_BUNDLE:-}"
OUT=""
while (( $# )); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --bundle) [[ $# -ge 2 ]] || usage; BUNDLE=$2; shift ;;
        --host-wheels) [[ $# -ge 2 ]] || usage; HOST_WHEELS=$2; shift ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
        -*) usage ;;
        *) [[ -z "$OUT" ]] || usage; OUT=$1 ;;
    esac
    shift
done
HERE=$(cd "$(dirname "$0")" && pwd)
# the GPU image's python3; a dry run's host Python is the project's environment (an activated venv's python), whose
# image packages (CPU torch, transformers, pytest, ...) the fresh venv links
PY="${PYTHON:-$( ((DRY)) && echo python || echo python3)}"
if (( ! DRY )) && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: FAILED: no CUDA device is visible to PyTorch ($PY: torch.cuda.is_available() is False)." >&2
    echo "gpu_check: this check needs one NVIDIA GPU, its driver and a CUDA build of torch; nothing was run" \
         "(--dry-run rehearses it on a CPU)." >&2
    exit 2
fi
if [[ -z "$BUNDLE" ]]; then
    # a copy inside a bundle finds its own folder; the repository's copy needs --bundle
    [[ -f "$HERE/optimas-fast-src.tar.gz" ]] && BUNDLE=$HERE || { echo "gpu_check: no bundle: pass --bundle DIR (made by benchmarks/gpu_bundle.sh)" >&2; exit 2; }
fi
[[ -f "$BUNDLE/optimas-fast-src.tar.gz" && -d "$BUNDLE/wheels" ]] || { echo "gpu_check: $BUNDLE is not a bundle (no optimas-fast-src.tar.gz or wheels/)" >&2; exit 2; }
BUNDLE=$(cd "$BUNDLE" && pwd)
OUT="${OUT:-${GPU_CHECK_OUT:-gpu_check_out}}"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
# a dry run shares a CI machine's 2 cores: the same steps, more time (a C++ build there took 25 s idle, 150 s at load 10)
BUDGET="${GPU_CHECK_BUDGET:-$( ((DRY)) && echo 900 || echo 480)}"
BUILD_LIMIT=$( ((DRY)) && echo 400 || echo 150)
START=$(date +%s)
WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/optimas_gpu_check.XXXXXX)}"
rm -rf "$WORK" && mkdir -p "$WORK"
# "site-packages" in both paths on purpose: dill (datasets' fingerprints, under TRL) pickles classes of modules
# outside a path with that name by value, which fails for pyarrow's types (seen in this script's dry run)
SITE="$WORK/site-packages"
IMAGE_SITE="$WORK/image/site-packages"
SRC="$WORK/src/optimas-fast"

rm -f "$OUT"/{steps.tsv,gpu_check.log,environment.json,gpu_tests.xml,gpu_tests_vllm.xml,gpu_tests_flash.xml,bench_ops.json,workloads.json,gpu_check.json,gpu_check.md}
: > "$OUT/steps.tsv"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_NO_INDEX=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_INDEX_URL PIP_CONSTRAINT

# step NAME LIMIT_S NOTE CMD...: runs CMD under `timeout`, capped by what is left of the budget (40 s kept: 10 for
# timeout's kill grace, 30 for the report), appends its output to the log and one line (name, exit, seconds,
# limit, note) to steps.tsv.
step() {
    local name=$1 limit=$2 note=$3
    shift 3
    local left=$(( BUDGET - ($(date +%s) - START) - 40 ))
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
# a step that did not apply here: recorded as passed, with the reason (the report lists it)
not_here() { printf '%s\t0\t0\t0\t%s\n' "$1" "$2" >> "$OUT/steps.tsv"; }
finish() {
    local extra=()
    (( DRY )) && extra=(--dry-run)
    if [[ -f "$SRC/benchmarks/gpu_check_report.py" ]]; then
        PYTHONPATH="$SITE" timeout 30 "$PY" "$SRC/benchmarks/gpu_check_report.py" "${extra[@]}" "$OUT"
    else
        echo "gpu_check: FAILED before the sources were unpacked (see $LOG)" >&2
        false
    fi
    local rc=$?
    echo "gpu_check: $( ((rc == 0)) && echo PASSED || echo FAILED )$( ((DRY)) && echo ' (dry run)') in $(( $(date +%s) - START )) s; see $OUT/gpu_check.md" >&2
    [[ -n "${GPU_CHECK_KEEP_WORK:-}" ]] || rm -rf "$WORK"
    exit $rc
}

PY=$(command -v "$PY") && PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute: the steps run elsewhere
# every step runs in the work folder: a Python started in the repository (the device tool's working directory)
# would import its optimas_fast/ source tree instead of the installed copy
cd "$WORK"
echo "gpu_check: bundle $BUNDLE, out $OUT, work $WORK$( ((DRY)) && echo ', DRY RUN (no CUDA steps)')" | tee -a "$LOG"
step verify 20 "sha256sum -c SHA256SUMS" bash -c "cd '$BUNDLE' && sha256sum --quiet -c SHA256SUMS" || finish
step unpack 20 "the source tree" bash -c "mkdir -p '$WORK/src' && tar -xzf '$BUNDLE/optimas-fast-src.tar.gz' -C '$WORK/src'" || finish

if (( DRY )); then
    # the image's stand-in: a fresh venv that sees only the image's packages (linked from this Python's)
    HOST_PY=$PY
    step image_env 60 "dry run: fresh venv with the image's packages only (gpu_bundle.py image-env)" bash -c "
        '$HOST_PY' -m venv --without-pip '$WORK/venv' &&
        '$HOST_PY' '$SRC/benchmarks/gpu_bundle.py' image-env '$IMAGE_SITE' &&
        purelib=\$('$WORK/venv/bin/python' -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])') &&
        echo '$IMAGE_SITE' > \"\$purelib/_gpu_image.pth\"" || finish
    PY="$WORK/venv/bin/python"
    # CPython 3.12, the GPU image's, where this machine has one (GPU_CHECK_PY312 or python3.12 on the PATH): the
    # sources compile with it and the extension builds and imports against its headers (pybind11 and setuptools
    # borrowed from the host); without one, 3.12 is covered by gpu_bundle.sh's resolution alone. It runs in the
    # background, beside the install and build (each C++ build keeps one core busy), and is waited for after them
    PY312="${GPU_CHECK_PY312:-python3.12}"
    if "$PY312" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))" >/dev/null 2>&1; then
        step py312 "$BUILD_LIMIT" "dry run: the sources compile and the extension builds and imports under CPython 3.12" bash -c "
            set -e
            mkdir -p '$WORK/py312/lib' '$WORK/py312/src'
            for m in pybind11 setuptools _distutils_hack; do
                d=\$('$HOST_PY' -c \"import importlib.util as u, os; s = u.find_spec('\$m'); print(os.path.dirname(s.origin))\")
                ln -s \"\$d\" '$WORK/py312/lib/'\$m
            done
            '$PY312' -m compileall -q '$SRC/optimas_fast' '$SRC/kernels' '$SRC/tests' '$SRC/benchmarks'
            cp -r '$SRC/.' '$WORK/py312/src/'
            cd '$WORK/py312/src'
            SETUPTOOLS_USE_DISTUTILS=local PYTHONPATH='$WORK/py312/lib' '$PY312' setup.py -q build_ext --inplace
            '$PY312' -c \"import glob, importlib.util as u; p = glob.glob('optimas_fast/_C.cpython-312-*.so')[0]; s = u.spec_from_file_location('optimas_fast._C', p); m = u.module_from_spec(s); s.loader.exec_module(m); n = [k for k in dir(m) if not k.startswith('_')]; assert n, 'the extension exports nothing'; print('CPython 3.12 loads', p, 'exporting', len(n), 'names')\"
        " &
        PY312_PID=$!
    else
        not_here py312 "not run: no CPython 3.12 here ($PY312); 3.12 is covered by gpu_bundle.sh's offline resolution"
    fi
else
    "$PY" -c "import torch; print('gpu_check on', torch.cuda.get_device_name(0), '| torch', torch.__version__)" | tee -a "$LOG"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv >> "$LOG" 2>&1 || true
fi

WHEELS="$BUNDLE/wheels"
if (( DRY )) && [[ -n "$HOST_WHEELS" ]]; then
    step same_set 20 "dry run: --host-wheels holds the bundle's names and versions" \
        "$PY" "$SRC/benchmarks/gpu_bundle.py" same-set "$BUNDLE/wheels" "$HOST_WHEELS" || finish
    WHEELS=$(cd "$HOST_WHEELS" && pwd)
fi
step install 90 "pip install --no-index --no-deps the bundle's wheels into $SITE" \
    "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --target "$SITE" "$WHEELS"/*.whl || finish
# the extension links no torch: the image's compiler and pybind11 build it (pyproject's build requirements are the
# image's setuptools / wheel / pybind11, hence --no-build-isolation)
step build "$BUILD_LIMIT" "pip install the source tree (builds optimas_fast._C)" \
    env PYTHONPATH="$SITE" "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation --no-cache-dir \
    --target "$SITE" "$SRC" || finish
if [[ -n "${PY312_PID:-}" ]]; then
    wait "$PY312_PID" || finish  # it copied the sources it builds before they go
fi
rm -rf "$SRC/optimas_fast" "$SRC/kernels" "$SRC/csrc" "$SRC/build"  # tests import the installed copy only
export PYTHONPATH="$SITE"
step imports 60 "every module the check needs imports; versions (and the image's, vs assumed) -> environment.json" \
    "$PY" "$SRC/benchmarks/gpu_bundle.py" environment "$SITE" "$OUT/environment.json" || finish

cd "$SRC"
GPU_FILES=(tests/test_gpu_*.py)
if (( DRY )); then
    step gpu_tests 60 "dry run: pytest --collect-only -m 'gpu and not vllm and not flash' (every GPU test file imports)" \
        "$PY" -m pytest --collect-only -q -m "gpu and not vllm and not flash" "${GPU_FILES[@]}" -p no:cacheprovider
    not_here gpu_tests_flash "dry run: no CUDA"
    not_here gpu_tests_vllm "dry run: no CUDA"
    step kernel_suite 60 "dry run: the kernel suite collected (its CUDA cases exist only with a GPU)" \
        "$PY" -m pytest --collect-only -q benchmarks/test_bench_ops.py -p no:cacheprovider
    step workloads 120 "dry run: bench_gpu_workloads.py --size tiny --device cpu (TRL included)" \
        "$PY" benchmarks/bench_gpu_workloads.py --size tiny --device cpu --pools 1x16,4x4 --train-inputs 1 \
        --baseline-pairs 4 --prefix-words 20 --skip-vllm --out "$OUT/workloads.json"
    finish
fi

step gpu_tests 170 "pytest -m 'gpu and not vllm and not flash' tests/test_gpu_*.py" \
    "$PY" -m pytest -m "gpu and not vllm and not flash" "${GPU_FILES[@]}" -q -rfEs -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml"
if "$PY" -c "import flash_attn" >/dev/null 2>&1; then
    step gpu_tests_flash 40 "pytest -m 'gpu and flash'" \
        "$PY" -m pytest -m "gpu and flash" "${GPU_FILES[@]}" -q -rfEs -p no:cacheprovider --junitxml="$OUT/gpu_tests_flash.xml"
else
    not_here gpu_tests_flash "not available on this machine: flash-attn is not installed (too large to carry)"
fi
VLLM_ARGS=(--skip-vllm)
if "$PY" -c "import vllm" >/dev/null 2>&1; then
    step gpu_tests_vllm 60 "pytest -m 'gpu and vllm'" \
        "$PY" -m pytest -m "gpu and vllm" "${GPU_FILES[@]}" -q -rfEs -p no:cacheprovider --junitxml="$OUT/gpu_tests_vllm.xml"
    VLLM_ARGS=(--vllm-timeout 75)
else
    not_here gpu_tests_vllm "not available on this machine: vllm is not installed (too large to carry)"
fi
# torch.compile baselines in bf16 only: each compile costs seconds of CPU time, and 16 of them would not fit
step kernel_suite 120 "pytest benchmarks/test_bench_ops.py --benchmark-only -k 'cuda and not (float32 and compile)'" \
    "$PY" -m pytest benchmarks/test_bench_ops.py --benchmark-only -k "cuda and not (float32 and compile)" -q \
    -p no:cacheprovider --benchmark-json="$OUT/bench_ops.json" --benchmark-columns=median,rounds --benchmark-sort=name
step workloads 150 "bench_gpu_workloads.py (1B Llama, bf16; pools 1x1024, 64x32)" \
    "$PY" benchmarks/bench_gpu_workloads.py --out "$OUT/workloads.json" "${VLLM_ARGS[@]}"
finish
