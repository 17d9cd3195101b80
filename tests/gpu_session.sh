#!/usr/bin/env bash
# Runs on the lent GPU machine (device tool). Builds jax_ep with its CUDA kernels (or uses a
# prebuilt extension carried in jax_ep/), then runs the stages named by the arguments, each under
# its own time limit, logging under $OUT:
#   bash tests/gpu_session.sh build one_gpu mp bench1 bench8
# Stages: build (compile; copies the extension to $OUT for later calls to carry), one_gpu (pytest
# -m gpu, single process), mp (N = 2, 4, 8 processes sharing the GPU, and the timeout test),
# bench1 / bench8 (bench/bench_ep.py at world size 1 / 8 processes), pytest:EXPR (pytest -m gpu -k EXPR).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee -a "$OUT/env.txt"

stage() {  # stage NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s"
  grep -E "passed|failed|error|Error|FAILED|ok \(|timed out|^shape|^[a-z_0-9]+ +(dispatch|combine|d\+c)" "$OUT/$name.log" | tail -40
}

for s in "$@"; do
  case $s in
    build)
      if ls jax_ep/_jax_ep*.so >/dev/null 2>&1; then
        echo "== build: using the carried extension $(ls jax_ep/_jax_ep*.so)"
      else
        stage build 300 bash -c 'CUDAARCHS=${CUDAARCHS:-90} JAX_EP_CUDA=ON python3 -m pip install \
          --no-build-isolation --no-deps -v . && cp "$(python3 -c "import jax_ep._jax_ep as m; \
          print(m.__file__)")" jax_ep/ && cp jax_ep/_jax_ep*.so "$OUT/"'
        grep -E "registers|spill" "$OUT/build.log" | sort | uniq | head -30 > "$OUT/ptxas.txt"
      fi ;;
    one_gpu) stage one_gpu 180 python3 -m pytest -m gpu -v -rA -k "not processes and not never_arrives" tests ;;
    mp) stage mp 420 python3 -m pytest -m gpu -v -rA -k "processes or never_arrives" tests ;;
    pytest:*) stage pytest 400 python3 -m pytest -m gpu -v -rA -k "${s#pytest:}" tests ;;
    bench1) stage bench1 200 python3 bench/bench_ep.py --out "$OUT" ${BENCH_ARGS:-} ;;
    bench8) stage bench8 300 python3 bench/run_world.py 8 --mps --num-sms 8 --out "$OUT" ${BENCH_ARGS:-} ;;
    *) echo "unknown stage $s" ;;
  esac
done
