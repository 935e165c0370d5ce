#!/usr/bin/env bash
# Set up (or reuse) .venv, install the pinned dependencies, build the C++ extension, then run:
#   bash scripts/run.sh demo   lipkern verify + a quick benchmark + the embedded evaluation
#   bash scripts/run.sh test   the whole test suite
# Extra arguments after the mode go to the command it runs (pytest or lipkern eval).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-demo}
[ $# -gt 0 ] && shift

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
venv_python=.venv/bin/python

# Reinstall only when the pinned requirements change: the torch wheels alone take minutes.
requirements_stamp=.venv/.lipkern-requirements.sha256
requirements_hash=$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$requirements_stamp" 2>/dev/null)" != "$requirements_hash" ]; then
  "$venv_python" -m pip install --quiet --upgrade pip setuptools wheel
  "$venv_python" -m pip install --quiet -r requirements.txt
  # These two pin old torch/timm in their metadata; their real needs are in requirements.txt.
  "$venv_python" -m pip install --quiet --no-deps -r requirements-nodeps.txt
  echo "$requirements_hash" > "$requirements_stamp"
fi

# Rebuild the extension only when its sources change (three CPU-capability variants compile).
build_stamp=.venv/.lipkern-build.sha256
build_hash=$(find setup.py csrc -type f | sort | xargs cat | sha256sum | cut -d' ' -f1)
if [ "$(cat "$build_stamp" 2>/dev/null)" != "$build_hash" ] || ! "$venv_python" -c "import lipkern._C" 2>/dev/null; then
  MAX_JOBS=${MAX_JOBS:-2} "$venv_python" -m pip install --quiet --no-build-isolation --no-deps -e .
  echo "$build_hash" > "$build_stamp"
fi

case "$mode" in
  demo)
    .venv/bin/lipkern verify
    .venv/bin/lipkern bench --quick
    .venv/bin/lipkern eval "$@"
    ;;
  test)
    "$venv_python" -m pytest tests "$@"
    ;;
  *)
    echo "usage: bash scripts/run.sh [demo|test] [args...]" >&2
    exit 2
    ;;
esac
