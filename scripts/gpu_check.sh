#!/usr/bin/env bash
# GPU validation kit, for a CUDA machine with nothing but this repository:
#   bash scripts/gpu_check.sh OUTDIR [--dry-run]
# 1. picks the Python: LIPKERN_GPU_PYTHON if set; else python3 where it already has triton,
#    pytest-xdist and a torch that sees a CUDA GPU (a GPU image, offline too: nothing is
#    installed and the C++ extension is not built, since the Triton path does not need it);
#    else sets up .venv as scripts/run.sh does (pinned requirements and the extension: a
#    first set-up downloads several GB, outside the time below). It prints the versions in
#    use and stops (exit 4) unless torch sees a CUDA GPU;
# 2. runs the GPU tests (tests/test_triton_gpu.py), JUnit XML and log in OUTDIR; the log names
#    each test as it finishes, so one cut off by the time limit still says how far it got, and
#    a run in which no test passed (all skipped, say) fails (exit 5);
# 3. benchmarks the Triton kernels against inductor and eager at 16 Mi elements in bf16, fp16
#    and fp32, and tries other tile sizes and warp counts (lipkern/tools/gpu_check.py),
#    writing OUTDIR/gpu_bench.json.
# Steps 2 and 3 have time limits (4 + 3.5 minutes, within 8 with the Python already set up). A
# benchmark cut short still leaves the JSON of what it finished.
# --dry-run checks the kit without a GPU (or beside one): the tests are only collected and the
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

if [ -n "$dry_run" ]; then
  # Chosen when triton is imported, so before Python starts: importing lipkern on a GPU host
  # would otherwise load the compiled kernels, which cannot take the dry run's CPU tensors.
  export TRITON_INTERPRET=1
fi

# What the kit runs: torch seeing a GPU, triton, and pytest with xdist for the tests.
ready='import torch, triton, pytest, xdist; raise SystemExit(0 if torch.cuda.is_available() else 1)'
if [ -n "${LIPKERN_GPU_PYTHON:-}" ]; then
  python=$LIPKERN_GPU_PYTHON
elif [ -z "$dry_run" ] && python3 -c "$ready" 2>/dev/null; then
  python=python3
else
  MAX_JOBS=${MAX_JOBS:-$(nproc)} bash scripts/run.sh setup
  python=${LIPKERN_VENV:-.venv}/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$python" - "$dry_run" <<'EOF' | tee "$out/environment.txt"
import sys

import torch
import triton

from lipkern import _ext

print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__} "
      f"(CUDA build {torch.version.cuda}), triton {triton.__version__}")
print("lipkern's C++ extension (the CPU kernels): "
      + ("loaded" if _ext.missing_reason() is None else "not built (the Triton path does not need it)"))
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
              f"{p.multi_processor_count} SMs")
elif sys.argv[1] != "--dry-run":
    print("gpu_check.sh: this torch sees no CUDA GPU (no GPU, a driver older than its CUDA "
          "build needs, or CUDA_VISIBLE_DEVICES); run with --dry-run to check the kit on CPU",
          file=sys.stderr)
    raise SystemExit(4)
EOF

tests=0
if [ -n "$dry_run" ]; then
  "$python" -m pytest -q -p no:cacheprovider --collect-only tests/test_triton_gpu.py \
    > "$out/gpu_tests.log" 2>&1 || tests=$?
else
  # Workers compile the many kernel specialisations of the tests in parallel; each holds a
  # CUDA context, so not one per core of a large node.
  workers=$(( $(nproc) < 16 ? $(nproc) : 16 ))
  timeout 240 "$python" -m pytest -v -p no:cacheprovider -n "$workers" tests/test_triton_gpu.py \
    --junitxml="$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log" || tests=$?
  if [ "$tests" -eq 0 ] && ! grep -q " PASSED " "$out/gpu_tests.log"; then
    echo "gpu_check.sh: no GPU test passed (all skipped?): see $out/gpu_tests.log" >&2
    tests=5
  fi
fi
echo "gpu_check.sh: GPU tests exit status $tests (log: $out/gpu_tests.log)"

timeout 210 "$python" -m lipkern.tools.gpu_check "$out" --budget 170 $dry_run
exit "$tests"
