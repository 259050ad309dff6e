#!/usr/bin/env bash
# Compile and link the CUDA sources against a CUDA build of torch whose CUDA major matches nvcc's
# (nvcc 13 → torch 2.14.1, cu130), in a separate virtual environment, and check that the CUDA
# kernels registered. No GPU is needed: this catches CUDA build breaks on machines without one.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
  echo "check_cuda_build: no nvcc, skipped"
  exit 0
fi
nvcc_major=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
case "$nvcc_major" in
  13) torch_pin="torch==2.14.1" ;;
  *) echo "check_cuda_build: no torch pin known for CUDA $nvcc_major" >&2; exit 1 ;;
esac
venv=.venv-cuda
[ -x $venv/bin/python ] || python3 -m venv $venv
$venv/bin/python -c "import torch" 2>/dev/null || $venv/bin/pip install --quiet "$torch_pin" numpy setuptools wheel ninja
out=build/cuda-check
rm -rf $out
WILDCAT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  $venv/bin/python setup.py build --build-base $out > $out.log 2>&1 || { tail -40 $out.log; exit 1; }
# run from the built package's folder: the repository root holds the CPU build's in-place module
python=$PWD/$venv/bin/python
cd "$(ls -d $out/lib*)"
$python - <<'PY'
import torch
import wildcat
assert wildcat.cuda_built(), "built without CUDA"
for op in ("rp_nystrom", "compress_kv", "coreset_attention"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"wildcat::{op}", "CUDA"), op
print(f"check_cuda_build: CUDA kernels compiled, linked and registered (torch {torch.__version__})")
PY
