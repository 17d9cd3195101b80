// The barrier that starts a normal redispatch or combine: each rank advances its sequence number,
// tells every peer, and waits until every peer has told it the same.
#include "cuda/api.h"
#include "cuda/device_utils.cuh"

namespace jax_ep {
namespace barrier {
namespace {

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

}  // namespace

cudaError_t LaunchBarrier(const CommEnv& env, cudaStream_t stream) {
  BarrierKernel<<<1, kWarp, 0, stream>>>(env);
  return cudaGetLastError();
}

}  // namespace barrier
}  // namespace jax_ep
