#!/usr/bin/env bash
# Runs jax_ep's GPU tests and benchmarks on a machine with an NVIDIA GPU, from the repository
# root. Builds jax_ep with its CUDA kernels (or uses a prebuilt extension already in jax_ep/),
# then runs the stages named by the arguments in order, each under its own time limit, logging
# under $OUT (default /tmp/out; logs end up in $OUT/logs.tgz, result tables in $OUT):
#   bash tests/gpu_session.sh build one_gpu mp bench1 bench8
# bench/RESULTS.md names the stages that produce each of its tables.
# Stages: build (compile; copies the extension to $OUT so a later run can place it in jax_ep/),
# one_gpu (pytest -m gpu, single process), mp / mp_mps (N = 2, 4, 8 processes sharing the GPU,
# time-sliced / under MPS, and the timeout test), bench1 / bench8 (bench/bench_ep.py at world
# size 1 / 8 processes), bench_hier (hierarchical backend, 4 processes as 2 hosts), padded1 /
# padded8 (bench/bench_padded.py: decode sizes, padded and normal layouts), multigpu
# (bench/bench_multigpu.py over every GPU), layer (bench/bench_layer.py: a whole MoE layer
# step), trace / trace8 (kernels and gaps on the GPU timeline, JAX profiler), ncu / ncu_padded
# (per-kernel device time, Nsight Compute), probe (bench/probe/bandwidth_probe.cu: hardware
# ceilings of fan-out / fan-in traffic per SM budget), demo (python -m jax_ep.demo), pytest:EXPR
# (pytest -m gpu -k EXPR), mps_on / mps_off (an MPS daemon for the stages between them), padded
# (the padded layout in one process: the cuda backend's and the hierarchical backend's on its
# cuda intra-host leg), padded_mp (the same with 2, 4, 8 processes sharing the GPU under MPS; the
# hierarchical ones as emulated hosts).
set -uo pipefail
OUT=${OUT:-/tmp/out}
LOGS="$OUT/logs"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee -a "$LOGS/env.txt"

stage() {  # stage NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s"
  grep -E "passed|failed|error|Error|FAILED|ok \(|timed out|^shape|^[a-z_0-9]+ +(dispatch|combine|d\+c)|^ +[0-9]+ +[0-9]+ +(padded|normal)|^(dispatch|combine) " "$LOGS/$name.log" | tail -40
}

for s in "$@"; do
  case $s in
    build)
      if ls jax_ep/_jax_ep*.so >/dev/null 2>&1; then
        echo "== build: using the prebuilt extension $(ls jax_ep/_jax_ep*.so)"
      else
        stage build 300 bash -c 'CUDAARCHS=${CUDAARCHS:-90} JAX_EP_CUDA=ON python3 -m pip wheel \
          --no-build-isolation --no-deps -v -w /tmp/jax_ep_wheel . && python3 -m zipfile -e \
          /tmp/jax_ep_wheel/jax_ep-*.whl /tmp/jax_ep_unzipped && cp /tmp/jax_ep_unzipped/jax_ep/_jax_ep*.so \
          jax_ep/ && cp jax_ep/_jax_ep*.so "$OUT/"'
        grep -E "registers|spill" "$LOGS/build.log" | sort | uniq | head -30 > "$LOGS/ptxas.txt"
      fi ;;
    one_gpu) stage one_gpu ${ONE_GPU_LIMIT:-300} python3 -m pytest -m gpu -v -rA -k "not processes and not never_arrives" tests ;;
    mp|mp_mps)  # N = 2, 4, 8 processes sharing the GPU (time-sliced, or side by side under MPS)
      if [ "$s" = mp_mps ]; then
        export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps/log
        mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY && nvidia-cuda-mps-control -d
      fi
      stage "$s" ${MP_LIMIT:-400} python3 -m pytest -m gpu -v -rA --durations=10 -k "processes or never_arrives" tests
      if [ "$s" = mp_mps ]; then echo quit | nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; fi ;;
    padded) stage padded ${PADDED_LIMIT:-400} python3 -m pytest -m gpu -v -rA --durations=10 \
        -k "padded and not processes and not never_arrives" tests ;;
    padded_mp)  # the padded layout's multi-process tests, side by side under MPS
      export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps/log
      mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY && nvidia-cuda-mps-control -d
      stage padded_mp ${MP_LIMIT:-540} python3 -m pytest -m gpu -v -rA --durations=10 \
        -k "${PADDED_MP_TESTS:-padded and processes}" tests
      echo quit | nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY ;;
    mps_on)  # an MPS daemon for the stages that follow (until mps_off)
      export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps/log
      mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY && nvidia-cuda-mps-control -d ;;
    mps_off) echo quit | nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY ;;
    pytest:*) n_pytest=$(( ${n_pytest:-0} + 1 ))
      stage "pytest$n_pytest" ${PYTEST_LIMIT:-400} python3 -m pytest -m gpu -v -rA --durations=5 \
        -k "${s#pytest:}" tests ;;
    demo) stage demo 200 python3 -m jax_ep.demo --steps ${DEMO_STEPS:-300} --plot "$LOGS/moe_loss_gpu.png" ;;
    probe)  # bench/probe: what fan-out / fan-in traffic can reach on 8, 24, 132 SMs (no JAX)
      stage probe_build 120 nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 \
        bench/probe/bandwidth_probe.cu -o /tmp/bandwidth_probe
      for shape in "4096 7168 8" "8192 4096 2" "128 7168 8"; do
        timeout 60 /tmp/bandwidth_probe $shape ${PROBE_SMS:-8,24,132} ${PROBE_FILTER:-} >>"$LOGS/probe.log" 2>&1
      done
      cat "$LOGS/probe.log" ;;
    bench1) stage bench1 200 python3 bench/bench_ep.py --out "$LOGS" ${BENCH_ARGS:-} ;;
    copy)  # the copy kernel (bench/copy_kernel) alone, SMs x TB/s, then bench1 with x copy(S)
      stage copy_build 120 python3 bench/copy_kernel/build.py --verbose
      stage copy_table 200 python3 bench/bench_copy.py --num-sms ${COPY_SMS:-8,16,24,32,48,132} --out "$LOGS"
      sed -n '/^ *SMs/,$p' "$LOGS/copy_table.log"
      stage bench1_copy ${COPY_LIMIT:-400} python3 bench/bench_ep.py --num-sms 8,16,24,32,132 --tag _copy \
        --out "$LOGS" ${BENCH_ARGS:-}
      grep "copy(S) TB/s" "$LOGS/bench1_copy.log" ;;
    bench8)  # 8 processes sharing the GPU under MPS: the decode shape, then the large shapes at
             # 512 tokens per rank (8 ranks' buffers must fit in one GPU)
      stage bench8_decode 200 python3 bench/run_world.py 8 --mps --num-sms 8 --shapes decode \
        --reps 10 --trials 5 --out "$LOGS" --tag _decode
      stage bench8_large 200 python3 bench/run_world.py 8 --mps --num-sms 8 --shapes \
        deepseek_v3,mixtral --tokens 512 --reps 4 --trials 5 --out "$LOGS" --tag _t512 ;;
    bench_hier)  # 4 processes sharing the GPU as 2 emulated hosts: the hierarchical backend's
                 # two intra-host legs against the flat cuda backend (one host)
      stage bench_hier_decode 200 python3 bench/run_world.py 4 --mps --num-sms 8 --hosts 2 \
        --shapes decode --reps 4 --trials 5 --rounds 20 --out "$LOGS" --tag _hier_decode
      stage bench_hier_mixtral 200 python3 bench/run_world.py 4 --mps --num-sms 8 --hosts 2 \
        --shapes mixtral --tokens 1024 --reps 4 --trials 5 --out "$LOGS" --tag _hier_t1024 ;;
    padded1) stage padded1 240 python3 bench/bench_padded.py --fp8 --normal --num-sms ${LL_SMS:-24} \
        --out "$LOGS" ;;
    padded8) stage padded8 240 python3 bench/bench_padded.py --world 8 --mps --num-sms 8 \
        --rounds 20 --trials 5 --out "$LOGS" ;;
    multigpu)  # several GPUs, one process driving them all, against XLA and peer copy
      stage multigpu 300 python3 bench/bench_multigpu.py --out "$LOGS" ${BENCH_ARGS:-} ;;
    trace)  # device timeline of the timed program (JAX profiler): kernels and the gaps between
      for shape in ${TRACE_SHAPES:-deepseek_v3 mixtral decode}; do for op in ${TRACE_OPS:-dispatch combine}; do
        stage "trace_${shape}_$op${TRACE_TAG:-}" 120 python3 bench/trace_ops.py --shape "$shape" --op "$op" \
          --num-sms ${TRACE_SMS:-132} --runs ${TRACE_RUNS:-1}
        head -4 "$LOGS/trace_${shape}_$op${TRACE_TAG:-}.log"
      done; done ;;
    trace8)  # rank 0's timeline of decode rounds with 8 processes sharing the GPU under MPS
      stage trace8 200 python3 bench/trace_ops.py --shape decode --op round --world 8 --mps \
        --num-sms 8 --runs 2 ;;
    ncu)  # per-kernel device time and DRAM bytes of one dispatch + combine per shape
      for sms in ${NCU_SMS:-24 132}; do for shape in ${NCU_SHAPES:-decode mixtral deepseek_v3}; do
        stage "ncu_${shape}_sms$sms" 150 ncu --clock-control none --profile-from-start off --csv \
          --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
          python3 bench/profile_ops.py --shape "$shape" --calls 1 --num-sms $sms
        python3 bench/ncu_summary.py "$LOGS/ncu_${shape}_sms$sms.log" --json "$LOGS/ncu_${shape}_sms$sms.json"
      done; done ;;
    ncu_padded)  # the padded layout at the decode shape, padding left unwritten
      stage ncu_padded 150 ncu --clock-control none --profile-from-start off --csv \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
        python3 bench/profile_ops.py --shape decode --calls 1 --num-sms ${LL_SMS:-24} --layout padded
      python3 bench/ncu_summary.py "$LOGS/ncu_padded.log" --json "$LOGS/ncu_padded.json" ;;
    layer)  # one MoE layer step, forward + backward, per expert-matmul implementation
      for shape in ${LAYER_SHAPES:-mixtral deepseek_v3}; do
        stage "layer_$shape" ${LAYER_LIMIT:-300} python3 bench/bench_layer.py --shapes "$shape" \
          --budget-s $(( ${LAYER_LIMIT:-300} - 40 )) --out "$LOGS/layer_$shape"
        cp "$LOGS/layer_$shape/results_layer.md" "$LOGS/results_layer_$shape.md" 2>/dev/null
      done ;;
    *) echo "unknown stage $s" ;;
  esac
done
cp "$LOGS"/results*.md "$OUT"/ 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
