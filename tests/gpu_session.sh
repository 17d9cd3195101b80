#!/usr/bin/env bash
# Runs on the lent GPU machine (device tool): build jax_ep with its CUDA kernels, then the GPU
# tests selected by the arguments (passed to pytest), logging under $OUT.
#   bash tests/gpu_session.sh -k "one_gpu or timeout"
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"
t0=$(date +%s)
JAX_EP_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
export PYTHONUNBUFFERED=1
python3 -m pytest -m gpu -v -rA --durations=15 "$@" 2>&1 | tee "$OUT/pytest_gpu.log" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed|Error|error" | tail -60
