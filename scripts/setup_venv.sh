#!/usr/bin/env bash
# Create .venv if missing and install reled-hpc into it. Idempotent: a second run with unchanged
# set-up files returns at once. Used by `make demo`, `make test` and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp="$VENV/.reled-installed"
key=$(cat setup.cfg pyproject.toml scripts/setup_venv.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && [ -x "$VENV/bin/reled-hpc" ]; then
  exit 0
fi

pip_q() {  # quiet pip; on failure show its output (minus this machine's find-links chatter)
  local out
  if ! out=$("$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1); then
    printf '%s\n' "$out" | grep -v "is ignored: it is neither a file nor a directory" >&2
    echo "setup: pip $* failed" >&2
    return 1
  fi
}
fastdtw_ok() { "$VENV/bin/python" -c "import fastdtw._fastdtw" 2>/dev/null; }

echo "setup: preparing $VENV (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_q install -q --upgrade pip "setuptools>=68" wheel
# torch pinned first: 2.13.0 is the CPU build this machine carries; an open range would pull a
# multi-GB CUDA build. On a cluster, install your CUDA build of torch before this script.
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip_q install -q "torch==2.13.0"
# fastdtw builds its C extension only when Cython and numpy are importable at build time (no build
# isolation); otherwise it silently installs pure Python, 50x slower.
pip_q install -q numpy Cython
if ! fastdtw_ok; then
  pip_q install -q --no-cache-dir --no-build-isolation --force-reinstall --no-deps "fastdtw>=0.3.4"
fi
pip_q install -q -e ".[dev]"
if ! fastdtw_ok; then
  echo "setup: ERROR: fastdtw was installed without its C extension (fastdtw._fastdtw missing)." >&2
  echo "       Install Cython and numpy, then: pip install --no-build-isolation --no-cache-dir fastdtw" >&2
  exit 1
fi
"$VENV/bin/python" -c "import libsumo, sumo, mpi4py, h5py, osmnx, submitit, torch" \
  || { echo "setup: ERROR: a dependency does not import" >&2; exit 1; }
echo "$key" > "$stamp"
echo "setup: $VENV ready"
