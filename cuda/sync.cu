// The barrier that starts redispatch and combine: each rank advances its sequence number, tells
// every peer, and waits until every peer has told it the same.
#include "cuda/device_utils.cuh"
#include "cuda/layout_kernels.cuh"

namespace jax_ep {

__global__ void __launch_bounds__(kWarp) BarrierKernel(CommEnv env) {
  __shared__ unsigned long long seq_shared;
  SignalArea* me = Signal(env, env.rank);
  if (threadIdx.x == 0) seq_shared = ++me->seq;
  __syncthreads();
  const unsigned long long seq = seq_shared;
  if (Poisoned(env)) return;
  BlockSignalPeers(env, seq, [&](int d) { return &Signal(env, d)->notify[env.rank]; });
  BlockWaitPeers(env, me->notify, seq, kPhaseBarrier);
}

cudaError_t LaunchBarrier(const CommEnv& env, cudaStream_t stream) {
  BarrierKernel<<<1, kWarp, 0, stream>>>(env);
  return cudaGetLastError();
}

}  // namespace jax_ep
