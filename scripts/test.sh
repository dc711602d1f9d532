#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs every test: the GoogleTest
# suite (every compiled Highway target against the float64 references) and
# pytest (Python API, capture, compare, perplexity, plugin, notebooks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
BUILD_DIR=$(ls -d build/*/ | head -n 1)
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)"
python3 -m pytest -q -p no:cacheprovider "$@"
