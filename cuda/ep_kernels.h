// Host entry points of the kernels: each enqueues one operation on a stream and returns the
// first launch error (cudaSuccess otherwise). No host synchronisation, no allocation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/comm_layout.h"

namespace jax_ep {

enum class ElemType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Shapes of one call on one rank (DESIGN's T, k, E, E_local, C, and H as bytes per row).
struct CallShape {
  int tokens;         // T
  int top_k;          // k
  int num_experts;    // E
  int experts_local;  // E_local
  int64_t capacity;   // C
  int64_t row_bytes;  // H * itemsize (a multiple of 16); 0 when no rows move
  int num_blocks;     // SM budget for the multi-block kernels
};

struct DispatchArgs {
  CommEnv env;
  CallShape shape;
  const void* x;             // [T, H]
  const int32_t* topk_idx;   // [T, k]
  const float* topk_weights; // [T, k]
  void* out_x;               // [C, H]
  float* out_weights;        // [C]
  int32_t* group_sizes;      // [E_local]
  int32_t* num_dropped;      // []
  int32_t* dest_rank;        // [T, k]
  int32_t* dest_row;         // [T, k]
  int32_t* row_src;          // [C]
  int32_t* num_recv;         // []
  int32_t* num_invalid;      // []: ids of topk_idx outside [-1, E)
};

// Moves x [T, H] (optional) and slot_values [T, k] (optional) along an existing routing, and
// optionally reports each row's source slot (the hierarchical backend's intra-host leg, whose
// routing comes from elsewhere and which needs row_src; dispatch's own handle has it).
struct RedispatchArgs {
  CommEnv env;
  CallShape shape;
  const void* x;               // [T, H] or null
  const float* slot_values;    // [T, k] or null
  const int32_t* dest_rank;    // [T, k]
  const int32_t* dest_row;     // [T, k]
  const int32_t* num_recv;     // []
  void* out_x;                 // [C, H] or null
  float* out_values;           // [C] or null
  int32_t* out_row_src;        // [C] or null: rank * T * k + t * k + j of each row, -1 past num_recv
};

struct CombineArgs {
  CommEnv env;
  CallShape shape;
  ElemType elem;
  const void* rows;            // [C, H] or null
  const float* row_scale;      // [C] or null
  const float* row_values;     // [C] or null
  const int32_t* dest_rank;    // [T, k]
  const int32_t* dest_row;     // [T, k]
  const int32_t* row_src;      // [C]
  const int32_t* num_recv;     // []
  void* out;                   // [T, H] or null: rows' type, or float32 when out_f32
  bool out_f32;                // float32 sums of lower-precision rows (no rounding to their type)
  float* slot_values;          // [T, k] or null
};

cudaError_t LaunchDispatch(const DispatchArgs& a, cudaStream_t stream);
cudaError_t LaunchRedispatch(const RedispatchArgs& a, cudaStream_t stream);
cudaError_t LaunchCombine(const CombineArgs& a, cudaStream_t stream);

}  // namespace jax_ep
