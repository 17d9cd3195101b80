// Host entry points of the padded (low-latency) layout's kernels (lowlat.cu). Each enqueues one
// call on a stream and returns the first launch error; no host synchronisation, no allocation,
// no per-call host state (CUDA-graph safe).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/comm_layout.h"
#include "cuda/ep_kernels.h"

namespace jax_ep {

// Shapes of one padded-layout call on one rank.
struct PaddedShape {
  int tokens;         // T
  int top_k;          // k
  int num_experts;    // E
  int experts_local;  // E_local
  int max_tokens;     // M: rows per (local expert, source rank)
  int64_t row_bytes;  // H * itemsize (a multiple of 16); 0 when no rows move
  int scale_cols;     // float32 scales per row (fp8 dispatch); 0 when none move
  int num_blocks;     // SM budget
  bool zero_fill;     // zero the rows past each (expert, source) count (EPConfig.padded_zero_fill)
};

// Dispatch-kind call: each routed slot of ids goes to the rank of its expert, at the slot's
// position in its (expert, source) block. ids = topk_idx (dispatch) or a PaddedHandle's
// slot_expert (redispatch along an existing routing: the same positions come out).
struct PaddedDispatchArgs {
  CommEnv env;
  PaddedShape shape;
  const void* x;               // [T, H] or null
  const float* x_scales;       // [T, scale_cols] or null
  const int32_t* ids;          // [T, k]
  const float* slot_values;    // [T, k] or null
  void* out_x;                 // [E_local, N * M, H] or null
  float* out_values;           // [E_local, N * M] or null
  float* out_scales;           // [E_local, N * M, scale_cols] or null
  int32_t* recv_counts;        // [E_local, N]
  int32_t* group_sizes;        // [E_local]
  int32_t* num_dropped;        // []
  int32_t* slot_expert;        // [T, k]
  int32_t* slot_pos;           // [T, k]
};

// Combine-kind call: rows go back to the slots they came from, summed per token in slot order in
// float32 (times row_scale when given); row_values go back to their slots.
struct PaddedCombineArgs {
  CommEnv env;
  PaddedShape shape;
  ElemType elem;
  const void* rows;            // [E_local, N * M, H] or null
  const float* row_scale;      // [E_local, N * M] or null
  const float* row_values;     // [E_local, N * M] or null
  const int32_t* recv_counts;  // [E_local, N]
  const int32_t* slot_expert;  // [T, k]
  const int32_t* slot_pos;     // [T, k]
  void* out;                   // [T, H] or null
  float* slot_values;          // [T, k] or null
};

cudaError_t LaunchPaddedDispatch(const PaddedDispatchArgs& a, cudaStream_t stream);
cudaError_t LaunchPaddedCombine(const PaddedCombineArgs& a, cudaStream_t stream);

}  // namespace jax_ep
