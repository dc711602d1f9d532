#!/usr/bin/env bash
# Old against new CUDA row kernel on one GPU machine, in one call (the
# before/after tables of docs/gpu.md): builds this tree with its tests
# (benchmarks/device_run.sh: ctest and $PYTESTS), builds the module of
# OLD_TAR (another commit's tree: `git archive COMMIT | gzip > old.tar.gz`)
# and of each of $VARIANTS, then runs ncu on benchmarks/prof_gpu.py for each
# kind in $KINDS, $REPS times, alternating the builds, and prints one line
# per run: kind, build, kernel duration, issued instructions, and the call's
# field means to 12 digits (equal means: the same fields). Kernels of one
# machine and minutes compare to about 1%; calls and kernels of different
# machines do not (docs/gpu.md).
# A variant rebuilds only the row kernel's object in a copy of this tree's
# build (about 15 s each, in parallel with the tests), either with extra
# CUDA flags, `name:FLAGS` (several flags joined by commas, e.g.
# exp4:-DLOGITPARITY_CUDA_EXP4=1 or li:-lineinfo), or from another
# row_metrics_cuda.cu, `name=FILE` (e.g. `git show COMMIT:cpp/src/cuda/row_metrics_cuda.cu
# > prev.cu` for a commit that changed only that file).
# Run from the repository root:
#   DEBS=path/to/debs [OLD_TAR=old.tar.gz] [KINDS="near far bf16"] [REPS=1] \
#     [VARIANTS="name:FLAGS name=FILE ..."] [JS=1] bash benchmarks/device_ab.sh
set -uo pipefail
ROOT=$(pwd)
OUT=${OUT:-$ROOT/out/device}
mkdir -p "$OUT"
: "${DEBS:?DEBS: folder of libhwy-dev, libhwy1, libgtest-dev .debs}"
mkdir -p /opt/deps-ab
for f in "$DEBS"/*.deb; do dpkg -x "$f" /opt/deps-ab; done
PB=$(python3 -m pybind11 --cmakedir)
build_module() {  # name, source dir, extra CUDA flags
  local b=/tmp/ab-build-$1 extra=()
  [ -n "$3" ] && extra=("-DCMAKE_CUDA_FLAGS=$3")
  CMAKE_PREFIX_PATH=/opt/deps-ab/usr cmake -S "$2" -B "$b" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLOGITPARITY_PYTHON=ON -DCMAKE_CUDA_ARCHITECTURES=${ARCH:-90} -Dpybind11_DIR="$PB" \
    "${extra[@]}" >"$OUT/build_$1.log" 2>&1 &&
    cmake --build "$b" --target _core -j4 >>"$OUT/build_$1.log" 2>&1 || { echo "build $1 failed"; tail -20 "$OUT/build_$1.log"; return 1; }
  mkdir -p /tmp/ab-py-$1 && cp -r "$2/python/logitparity" /tmp/ab-py-$1/ &&
    rm -f /tmp/ab-py-$1/logitparity/_core*.so && cp "$b"/_core*.so /tmp/ab-py-$1/logitparity/
}
BUILDS="new"
PIDS=""
if [ -n "${OLD_TAR:-}" ]; then
  mkdir -p /tmp/ab-src-old && tar -xzf "$OLD_TAR" -C /tmp/ab-src-old
  build_module old /tmp/ab-src-old "" & PIDS="$PIDS $!"
  BUILDS="old $BUILDS"
fi
# A copy of this tree's build with the row kernel's object rebuilt: with
# extra flags appended to its compile line, or from another source file.
build_variant() {  # name, flags (comma-separated) or "", source file or ""
  local d=/tmp/ab-build-$1 built=${BUILD:-build-device}
  rm -rf "$d" && cp -a "$ROOT/$built" "$d" || return 1
  [ -n "$2" ] && sed -i "/row_metrics_cuda.cu.o: /,/FLAGS/ s|^  FLAGS = \(.*\)|  FLAGS = \1 ${2//,/ }|" "$d/build.ninja"
  [ -n "$3" ] && sed -i "s|$ROOT/cpp/src/cuda/row_metrics_cuda.cu |$(realpath "$3") |" "$d/build.ninja"
  ninja -C "$d" _core >"$OUT/build_$1.log" 2>&1 || { echo "variant $1 failed"; tail -20 "$OUT/build_$1.log"; return 1; }
  mkdir -p /tmp/ab-py-$1 && cp -r "$ROOT/python/logitparity" /tmp/ab-py-$1/ &&
    rm -f /tmp/ab-py-$1/logitparity/_core*.so && cp "$d"/_core*.so /tmp/ab-py-$1/logitparity/
}
CTEST=0 PYTESTS= BENCH= bash benchmarks/device_run.sh || exit 1  # build this tree
for v in ${VARIANTS:-}; do
  # name:FLAGS when the name holds no '=' (flags may: -DX=1), else name=FILE
  if [[ $v == *:* && ${v%%:*} != *=* ]]; then
    name=${v%%:*}; build_variant "$name" "${v#*:}" "" &
  else
    name=${v%%=*}; build_variant "$name" "" "${v#*=}" &
  fi
  PIDS="$PIDS $!"
  BUILDS="$BUILDS $name"
done
bash benchmarks/device_run.sh || exit 1  # this tree again (built): ctest, $PYTESTS
mkdir -p /tmp/ab-py-new && cp -r python/logitparity /tmp/ab-py-new/
[ -n "$PIDS" ] && wait $PIDS
export LD_LIBRARY_PATH=/opt/deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
for kind in ${KINDS:-near far bf16}; do
  for rep in $(seq "${REPS:-1}"); do
    for build in $BUILDS; do
      [ -f /tmp/ab-py-$build/logitparity/__init__.py ] || continue
      PYTHONPATH=/tmp/ab-py-$build timeout 90 ncu --section SpeedOfLight --section InstructionStats \
        --clock-control none -k regex:CompareRows --launch-skip 1 --launch-count 1 \
        python3 benchmarks/prof_gpu.py --kind "$kind" ${JS:+--js} >/tmp/ab-ncu.txt 2>&1
      echo "$kind $build $(grep -E '^\s+(Duration|Issued Instructions )' /tmp/ab-ncu.txt | awk '{print $(NF-1), $NF}' | tr '\n' ' ')| $(grep -E "^$kind: " /tmp/ab-ncu.txt)"
      grep -qE '^\s+Duration' /tmp/ab-ncu.txt || { echo "  no kernel profiled; the run's last lines:"; tail -n 8 /tmp/ab-ncu.txt | sed 's/^/  /'; }
    done
  done
done 2>&1 | tee "$OUT/ab.txt"
