# Sourced by scripts/setup.sh (the in-place editable build) and scripts/wheel.sh
# (the portable wheel): one list of build settings, so both use the same build
# tree (build/{wheel_tag}) and the wheel only relinks what setup.sh compiled.
# Expects $PY. The C++ tests and the libtorch oracle are configured in the same
# tree as the module; the wheel carries only the package and _core
# (install.components in pyproject.toml).
TORCH_DIR=$("$PY" -c 'import torch, os; print(os.path.join(torch.utils.cmake_prefix_path, "Torch"))')
BUILD_SETTINGS=(
  --config-settings=cmake.define.LOGITPARITY_TESTS=ON
  --config-settings=cmake.define.Torch_DIR="$TORCH_DIR"
  --config-settings=build.verbose=false
)
