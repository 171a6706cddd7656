#!/usr/bin/env bash
# compute-sanitizer over one small call of every fastmask CUDA kernel (scripts/cuda_smoke.py).
#
#   scripts/compute_sanitizer.sh                 # memcheck, racecheck, synccheck, initcheck
#   TOOLS="memcheck" scripts/compute_sanitizer.sh
#
# Needs a GPU, compute-sanitizer (CUDA toolkit) and the extension (built here first, outside
# the sanitizer, with build_jit() when fastmask._C is not installed). Exits non-zero when
# any tool reports an error. PyTorch's caching allocator is switched off so that every
# tensor is its own allocation and memcheck sees accesses past the end of a buffer;
# initcheck then also catches a kernel reading a partial-sum buffer it never wrote.
set -uo pipefail
cd "$(dirname "$0")/.."

SAN="${COMPUTE_SANITIZER:-}"
if [ -z "$SAN" ]; then
  for cand in "$(command -v compute-sanitizer || true)" "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
              /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
              /opt/nvidia/compute-sanitizer/compute-sanitizer; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then SAN="$cand"; break; fi
  done
fi
if [ -z "$SAN" ]; then
  echo "compute_sanitizer.sh: compute-sanitizer not found (set COMPUTE_SANITIZER=/path/to/compute-sanitizer)" >&2
  exit 2
fi
PY="${PYTHON:-python}"

"$PY" scripts/cuda_smoke.py --build-only || exit $?

export PYTORCH_NO_CUDA_MEMORY_CACHING=1
status=0
for tool in ${TOOLS:-memcheck racecheck synccheck initcheck}; do
  echo "=== compute-sanitizer --tool $tool"
  extra=()
  case "$tool" in
    memcheck) extra=(--leak-check no) ;;
    racecheck) extra=(--racecheck-report hazard) ;;
  esac
  if "$SAN" --tool "$tool" "${extra[@]}" --error-exitcode 86 --print-limit 20 "$PY" scripts/cuda_smoke.py; then
    echo "=== $tool: clean"
  else
    rc=$?
    echo "=== $tool: FAILED (exit $rc)"
    status=1
  fi
done
exit $status
