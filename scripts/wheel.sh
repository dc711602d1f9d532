#!/usr/bin/env bash
# Builds a wheel that installs on a machine without libhwy-dev: pip builds it
# from the same build tree as scripts/setup.sh (so it only relinks), then
# auditwheel grafts libhwy.so.1 into logitparity.libs/ and points _core's RPATH
# there. The platform tag (manylinux_2_35 on Debian 12) is the oldest glibc this
# machine's build allows. Usage: bash scripts/wheel.sh [OUT_DIR]   (default dist/)
# Run scripts/setup.sh first (scripts/test.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
OUT=${1:-dist}
source scripts/_build_settings.sh
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$raw" . "${BUILD_SETTINGS[@]}" 2>&1 | { grep -v "^WARNING" || true; }
mkdir -p "$OUT"
rm -f "$OUT"/logitparity-*.whl
"$PY" -m auditwheel repair -w "$OUT" "$raw"/logitparity-*.whl 2>&1 | { grep -v "^INFO" || true; }
ls "$OUT"/logitparity-*.whl
