#!/usr/bin/env bash
# On the GPU machine: build the CUDA extension in place, then run the requested stages, logs under
# $OUT (default /tmp/wildcat-gpu). Stages: test, sanitize, bench, profile, demo. Example:
#   OUT=/tmp/out bash scripts/gpu_check.sh test sanitize bench
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/wildcat-gpu}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the in-place build, for scripts run from subfolders
PY=${PYTHON:-python3}
status=0

start=$(date +%s)
if ! $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
$PY -c "import torch, wildcat; print('torch', torch.__version__, 'cuda built', wildcat.cuda_built(), torch.cuda.get_device_name())"

for stage in "$@"; do
  start=$(date +%s)
  case "$stage" in
    test)
      $PY -m pytest -q -p no:logging tests/python > "$OUT/pytest.log" 2>&1 || status=1
      tail -15 "$OUT/pytest.log" ;;
    sanitize)
      for tool in memcheck racecheck initcheck synccheck; do
        timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 $PY tests/sanitize_grid.py \
          > "$OUT/sanitize_$tool.log" 2>&1 || status=1
        echo "$tool: $(tail -2 "$OUT/sanitize_$tool.log" | tr '\n' ' ')"
      done ;;
    bench)
      $PY benchmarks/bench_attention.py ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1 || status=1
      tail -40 "$OUT/bench.log" ;;
    profile)
      $PY benchmarks/profile_kernels.py > "$OUT/profile.log" 2>&1 || status=1
      cat "$OUT/profile.log" ;;
    demo)
      $PY examples/demo.py > "$OUT/demo.log" 2>&1 || status=1
      cat "$OUT/demo.log" ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
  echo "$stage: $(( $(date +%s) - start )) s"
done
exit $status
