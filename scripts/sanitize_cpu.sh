#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer over the C++ CPU code: a CMake build of libwildcat
# and the Catch2 tests with both sanitizers, then the Catch2 tests (ctest, parity included) and
# tests/sanitize_cpu_grid.py (the degenerate-input cases through the ASan build of the ops).
#
#   bash scripts/sanitize_cpu.sh            # build under build/asan, run, logs in build/asan/logs
#   JOBS=1 bash scripts/sanitize_cpu.sh     # parallel compile jobs (default: nproc)
#
# torch's own libraries are not instrumented. ASan's leak checker is off: libtorch keeps
# registries and thread pools alive until exit, which LeakSanitizer reports as leaks that are not
# ours (leaks of our code are covered by tests/python/test_resources.py: memory flat over
# repeated calls). Python loads libasan through LD_PRELOAD because the interpreter is not
# instrumented and ASan's runtime must come first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
build=build/asan
logs=$build/logs
mkdir -p "$logs"
torch_prefix=$($PY -c "import torch; print(torch.utils.cmake_prefix_path)")
# -fno-sanitize=vptr: the vptr check needs the RTTI of every class it meets, and torch's
# inline headers cast between its own classes in ways the check cannot verify from our side.
flags="-fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
cmake -S . -B $build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -DWILDCAT_WITH_CUDA=OFF -DWILDCAT_PYTHON="$(command -v $PY || echo $PY)" \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" > "$logs/configure.log"
cmake --build $build -j "${JOBS:-$(nproc)}" > "$logs/build.log" 2>&1 || { tail -30 "$logs/build.log"; exit 1; }

export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1:detect_odr_violation=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# this checkout's wildcat (its in-place build) writes the parity fixture, not an installed one
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
# The parity fixture is written by Python (uninstrumented, no LD_PRELOAD needed: it does not load
# the ASan library); the Catch2 executable itself is instrumented.
if ctest --test-dir $build --output-on-failure > "$logs/ctest.log" 2>&1; then
  echo "sanitize_cpu: ctest passed ($(grep -E 'tests passed' "$logs/ctest.log"))"
else
  status=1
  echo "sanitize_cpu: ctest FAILED, see $logs/ctest.log"; tail -40 "$logs/ctest.log"
fi
libasan=$(${CXX:-g++} -print-file-name=libasan.so)
libubsan=$(${CXX:-g++} -print-file-name=libubsan.so)
if LD_PRELOAD="$libasan:$libubsan" $PY tests/sanitize_cpu_grid.py "$build/libwildcat.so" > "$logs/grid.log" 2>&1; then
  echo "sanitize_cpu: degenerate grid passed ($(tail -1 "$logs/grid.log"))"
else
  status=1
  echo "sanitize_cpu: degenerate grid FAILED, see $logs/grid.log"; tail -40 "$logs/grid.log"
fi
if grep -E "ERROR: AddressSanitizer|runtime error:" "$logs"/*.log; then status=1; fi
exit $status
