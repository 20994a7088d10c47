#!/usr/bin/env bash
# Fills one folder with everything benchmarks/gpu_check.sh needs on a GPU machine that reaches no package index and
# lacks what its image lacks (benchmarks/gpu_image_packages.txt lists what it has):
#
#     bash benchmarks/gpu_bundle.sh OUT_DIR            # here, with PyPI; then carry OUT_DIR to the GPU machine
#     bash benchmarks/gpu_bundle.sh --check OUT_DIR    # only the offline resolution and the size check, no download
#     bash benchmarks/gpu_bundle.sh --host-wheels DIR OUT_DIR   # also DIR: the same set built for this Python, for
#                                                      # gpu_check.sh --dry-run (not carried: the GPU needs 3.12's)
#
# OUT_DIR afterwards (replaced if it exists):
#   wheels/               CPython 3.12 manylinux x86_64 wheels: trl and everything the project and trl need that the
#                         image lacks (resolved by pip from PyPI against stand-ins of the image's packages)
#   optimas-fast-src.tar.gz  the source tree (tracked and untracked-but-not-ignored files); gpu_check.sh builds its
#                         extension there with the image's compiler and pybind11 (it links no torch)
#   gpu_check.sh          a copy of benchmarks/gpu_check.sh: `bash OUT_DIR/gpu_check.sh` runs from the folder alone
#   requirements.txt      what the wheels must satisfy (gpu_bundle.py requirements)
#   image-packages.txt    the image list the bundle was resolved against
#   resolution.json       pip's report of the offline resolution (the proof that the set is complete)
#   SHA256SUMS            checked by gpu_check.sh before it installs anything
# Checks: the folder is under 48 MiB (the device tool carries 64 MiB with the working tree), and an offline
# `pip install --dry-run --no-index` for CPython 3.12 resolves every requirement from the bundle and the image's
# stand-ins alone, with no wheel left unused. Exit status 1 if either fails, 2 on bad usage.
set -euo pipefail

LIMIT_MIB=48
CHECK_ONLY=0
HOST=""
usage() { echo "usage: gpu_bundle.sh [--check] [--host-wheels DIR] OUT_DIR" >&2; exit 2; }
while [[ "${1:-}" == -* ]]; do
    case "$1" in
        --check) CHECK_ONLY=1 ;;
        --host-wheels) [[ $# -ge 2 ]] || usage; HOST=$2; shift ;;
        *) usage ;;
    esac
    shift
done
[[ $# -eq 1 ]] || usage
abs() { mkdir -p "$1" && (cd "$1" && pwd); }  # folders given relative to the caller's directory, made absolute
OUT=$(abs "$1")
[[ -z "$HOST" ]] || HOST=$(abs "$HOST")
# the project's environment (an activated venv's python): its pip (26.3 here) resolves for another Python; 23.2 cannot
PY="${PYTHON:-python}"
PY=$(command -v "$PY") && [[ "$PY" == /* ]] || PY="$PWD/$PY"
# -P: the physical repository (a docs runner may call this through a folder of symbolic links to the checkout)
cd -P "$(dirname "$0")/.."
HELPER=benchmarks/gpu_bundle.py

if (( ! CHECK_ONLY )); then
    rm -rf "$OUT"
    mkdir -p "$OUT/wheels"
    TMP=$(mktemp -d)
    trap 'rm -rf "$TMP"' EXIT
    "$PY" "$HELPER" standins "$TMP/standins" > "$TMP/image-constraints.txt"
    "$PY" "$HELPER" requirements > "$OUT/requirements.txt"
    cp benchmarks/gpu_image_packages.txt "$OUT/image-packages.txt"
    # pip resolves for the GPU machine's interpreter; the image's packages can only be their stand-ins (their
    # "+image" pins exist nowhere else), so exactly what the image lacks is downloaded
    mapfile -t TARGET < <("$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_bundle; print('\n'.join(gpu_bundle.pip_target_args()))")
    echo "gpu_bundle: downloading for CPython 3.12 manylinux x86_64: $(tr '\n' ' ' < "$OUT/requirements.txt")" >&2
    "$PY" -m pip download --quiet --dest "$TMP/dl" --find-links "$TMP/standins" -c "$TMP/image-constraints.txt" \
        "${TARGET[@]}" -r "$OUT/requirements.txt" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    # the stand-ins come back with the download (pip copies find-links files it used): they stay behind
    for w in "$TMP"/dl/*.whl; do
        [[ -e "$TMP/standins/$(basename "$w")" ]] || mv "$w" "$OUT/wheels/"
    done
    # the source tree as git sees it now, committed or not (deleted files left out)
    git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -I{} sh -c 'test -f "{}" && printf "%s\0" "{}"' \
        | tar --null -T - --transform 's,^,optimas-fast/,' -czf "$OUT/optimas-fast-src.tar.gz"
    cp benchmarks/gpu_check.sh "$OUT/gpu_check.sh"
    (cd "$OUT" && find . -type f ! -name SHA256SUMS ! -name resolution.json | sort | xargs sha256sum > SHA256SUMS)
fi

[[ -d "$OUT/wheels" && -f "$OUT/requirements.txt" ]] || { echo "gpu_bundle: $OUT is not a bundle (no wheels/ or requirements.txt)" >&2; exit 1; }
"$PY" "$HELPER" resolve "$OUT" || { echo "gpu_bundle: FAILED: the bundle in $OUT is not complete" >&2; exit 1; }
size=$(du -sb "$OUT" | cut -f1)
mib=$(( (size + 1048575) / 1048576 ))
if (( size > LIMIT_MIB * 1048576 )); then
    echo "gpu_bundle: FAILED: $OUT holds $mib MiB, over the $LIMIT_MIB MiB limit" >&2
    du -sb "$OUT"/wheels/* "$OUT"/*.tar.gz | sort -rn | head -8 >&2
    exit 1
fi
echo "gpu_bundle: $OUT: $(ls "$OUT/wheels" | wc -l) wheels, $mib MiB (limit $LIMIT_MIB MiB)" >&2
if [[ -n "$HOST" ]]; then
    rm -rf "$HOST"
    "$PY" "$HELPER" host-wheels "$OUT" "$HOST" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    "$PY" "$HELPER" same-set "$OUT/wheels" "$HOST"
fi
