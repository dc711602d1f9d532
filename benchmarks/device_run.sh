#!/usr/bin/env bash
# One call on a GPU machine (no network): unpack Highway and GoogleTest from
# Debian .debs, build the core with its CUDA kernels (plain CMake), run ctest
# and the pytest files named in $PYTESTS, then the commands in $BENCH. Logs go
# to $OUT ($CMAKE_EXTRA: more CMake options, e.g. -DCMAKE_CUDA_FLAGS=-lineinfo
# for ncu's source view). Used for the figures in docs/gpu.md; run from the
# repository root:
#   DEBS=path/to/debs OUT=out bash benchmarks/device_run.sh
set -uo pipefail
ROOT=$(pwd)
OUT=${OUT:-$ROOT/out/device}
mkdir -p "$OUT" /opt/deps
for f in "${DEBS:?DEBS: folder of libhwy-dev, libhwy1, libgtest-dev .debs}"/*.deb; do dpkg -x "$f" /opt/deps; done
export CMAKE_PREFIX_PATH=/opt/deps/usr
export LD_LIBRARY_PATH=/opt/deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; nproc; lscpu | grep "Model name"; } 2>&1 | tee "$OUT/machine.txt"
BUILD=${BUILD:-build-device}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOGITPARITY_PYTHON=ON -DLOGITPARITY_TESTS=ON \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DCMAKE_CUDA_ARCHITECTURES=${ARCH:-90} ${CMAKE_EXTRA:-} >"$OUT/build.log" 2>&1 \
  && cmake --build "$BUILD" -j"$(nproc)" >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
grep -E "CUDA kernels|libtorch" "$OUT/build.log"
cp "$BUILD"/_core*.so python/logitparity/
export PYTHONPATH=$ROOT/python
if [ "${CTEST:-1}" = 1 ]; then
  ctest --test-dir "$BUILD" -j8 --output-on-failure >"$OUT/ctest.log" 2>&1
  tail -25 "$OUT/ctest.log"
fi
if [ -n "${PYTESTS:-}" ]; then
  python3 -m pytest -q -p no:cacheprovider $PYTESTS >"$OUT/pytest.log" 2>&1
  tail -15 "$OUT/pytest.log"
fi
if [ -n "${BENCH:-}" ]; then
  PYTHONUNBUFFERED=1 bash -c "$BENCH" 2>&1 | tee "$OUT/bench.log"
fi
