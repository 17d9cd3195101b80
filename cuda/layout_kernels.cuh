// Host launchers shared by the operation launchers (dispatch.cu, combine.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/comm_layout.h"

namespace jax_ep {

constexpr int kNotifyThreads = 1024;

// The layout pass and count exchange of dispatch (layout.cu): fills the private layout scratch
// of env.rank's buffer and writes group_sizes, num_dropped and num_recv.
cudaError_t LaunchLayoutAndNotify(const CommEnv& env, const int32_t* topk_idx, int tokens,
                                  int top_k, int num_experts, int experts_local,
                                  long long capacity, int32_t* group_sizes, int32_t* num_dropped,
                                  int32_t* num_recv, int32_t* num_invalid,
                                  cudaStream_t stream);

// A barrier with every peer (sync.cu): starts a call (advances seq) and returns on each rank
// once all ranks have started it, so peers may then write into each other's buffers.
cudaError_t LaunchBarrier(const CommEnv& env, cudaStream_t stream);

// Opts the layout kernels into the shared memory any supported E needs, on the current device
// (the same setting whatever the group: idempotent, safe with any number of groups).
cudaError_t PrepareLayoutKernels();

// Dynamic shared memory the layout pass needs per block for E experts.
size_t LayoutSmemBytes(int num_experts);

}  // namespace jax_ep
