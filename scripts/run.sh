#!/usr/bin/env bash
# Set up (or reuse) .venv, install the pinned dependencies, build the C++ extension, then run:
#   bash scripts/run.sh demo    lipkern verify + a quick benchmark + the embedded evaluation
#   bash scripts/run.sh test    the whole test suite
#   bash scripts/run.sh setup   the set-up alone (scripts/gpu_check.sh starts with it)
# Extra arguments after the mode go to the command it runs (pytest or lipkern eval).
# LIPKERN_VENV names another environment directory; LIPKERN_NO_INSTALL=1 makes any install or
# build that the environment would need an error instead (to check a set-up without changing it).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-demo}
[ $# -gt 0 ] && shift

python=${PYTHON:-python3}
venv=${LIPKERN_VENV:-.venv}
venv_python=$venv/bin/python

refuse_install() {
  if [ -n "${LIPKERN_NO_INSTALL:-}" ]; then
    echo "run.sh: $venv would need $1 (LIPKERN_NO_INSTALL is set)" >&2
    exit 3
  fi
}

if [ ! -x "$venv_python" ]; then
  refuse_install "creating"
  "$python" -m venv "$venv"
fi

# Reinstall only when the pinned requirements change: the torch wheels alone take minutes.
requirements_stamp=$venv/.lipkern-requirements.sha256
requirements_hash=$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$requirements_stamp" 2>/dev/null)" != "$requirements_hash" ]; then
  refuse_install "the pinned requirements installed"
  "$venv_python" -m pip install --quiet --upgrade pip setuptools wheel
  "$venv_python" -m pip install --quiet -r requirements.txt
  # These two pin old torch/timm in their metadata; their real needs are in requirements.txt.
  "$venv_python" -m pip install --quiet --no-deps -r requirements-nodeps.txt
  echo "$requirements_hash" > "$requirements_stamp"
fi

# Rebuild the extension only when its sources change (four CPU-capability variants compile).
build_stamp=$venv/.lipkern-build.sha256
build_hash=$(find setup.py csrc -type f | sort | xargs cat | sha256sum | cut -d' ' -f1)
if [ "$(cat "$build_stamp" 2>/dev/null)" != "$build_hash" ] || ! "$venv_python" -c "import lipkern._C" 2>/dev/null; then
  refuse_install "the C++ extension built"
  MAX_JOBS=${MAX_JOBS:-2} "$venv_python" -m pip install --quiet --no-build-isolation --no-deps -e .
  echo "$build_hash" > "$build_stamp"
fi

case "$mode" in
  setup)
    ;;
  demo)
    "$venv/bin/lipkern" verify
    "$venv/bin/lipkern" bench --quick
    "$venv/bin/lipkern" eval "$@"
    ;;
  test)
    "$venv_python" -m pytest tests "$@"
    ;;
  *)
    echo "usage: bash scripts/run.sh [demo|test|setup] [args...]" >&2
    exit 2
    ;;
esac
