#!/usr/bin/env bash
# GPU validation kit, for a CUDA machine with nothing but this repository:
#   bash scripts/gpu_check.sh OUTDIR [--dry-run]
# 1. sets up .venv as scripts/run.sh does (pinned requirements, C++ extension);
# 2. runs the GPU tests (tests/test_triton_gpu.py), JUnit XML and log in OUTDIR;
# 3. benchmarks the Triton kernels against inductor and eager at 16 Mi elements in bf16, fp16
#    and fp32, and tries other tile sizes and warp counts (lipkern/tools/gpu_check.py),
#    writing OUTDIR/gpu_bench.json.
# Steps 2 and 3 have time limits (2.5 + 3.5 minutes), leaving 2 of the 8 minutes to the set-up
# (the torch wheels and the extension; nothing when .venv is current). A benchmark cut short
# still leaves the JSON of what it finished.
# --dry-run checks the kit on a machine without a GPU: the tests are only collected and the
# benchmark runs tiny, on the CPU, through the Triton interpreter.
set -euo pipefail
usage="usage: bash scripts/gpu_check.sh OUTDIR [--dry-run]"
if [ $# -lt 1 ] || [ -z "$1" ] || [[ "$1" == -* ]]; then
  echo "$usage" >&2
  exit 2
fi
out=$(realpath -m -- "$1")
shift
dry_run=
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=--dry-run ;;
    *) echo "gpu_check.sh: unknown argument '$arg'; $usage" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
mkdir -p "$out"

MAX_JOBS=${MAX_JOBS:-$(nproc)} bash scripts/run.sh setup
python=${LIPKERN_VENV:-.venv}/bin/python

tests=0
if [ -n "$dry_run" ]; then
  "$python" -m pytest -q -p no:cacheprovider --collect-only tests/test_triton_gpu.py \
    > "$out/gpu_tests.log" 2>&1 || tests=$?
else
  # Workers compile the many kernel specialisations of the tests in parallel.
  timeout 150 "$python" -m pytest -q -p no:cacheprovider -n 8 tests/test_triton_gpu.py \
    --junitxml="$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log" || tests=$?
fi
echo "gpu_check.sh: GPU tests exit status $tests (log: $out/gpu_tests.log)"

timeout 210 "$python" -m lipkern.tools.gpu_check "$out" --budget 170 $dry_run
exit "$tests"
