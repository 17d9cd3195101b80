// Every host entry point of the kernels, with its arguments, grouped per step and per layout:
//   routing  (routing.cu): the routing pass and count exchange that start a normal dispatch
//   barrier  (barrier.cu): the barrier that starts a normal redispatch or combine
//   normal   (dispatch.cu, combine.cu): the normal layout's operations (rows packed in [C, H])
//   padded   (padded.cu): the padded layout's operations (rows in [E_local, N * M, H])
// A Launch* enqueues its kernels on a stream and returns the first launch error (cudaSuccess
// otherwise): no host synchronisation, no allocation, no per-call host state (CUDA-graph safe).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/buffer_map.h"

namespace jax_ep {

enum class ElemType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Shapes of one call on one rank (docs/contract.md's T, k, E, E_local, C, M, and H as bytes
// per row), checked by the FFI handler against the group's BufferLimits.
struct CallShape {
  int tokens;         // T
  int top_k;          // k
  int num_experts;    // E
  int experts_local;  // E_local
  int64_t row_bytes;  // H * itemsize (a multiple of 16); 0 when no rows move
  int num_sms;        // the call's SM budget (>= 1): the blocks of each multi-block kernel
  int64_t capacity;   // normal layout: C
  int max_tokens;     // padded layout: M, rows per (local expert, source rank)
  int scale_cols;     // padded layout: float32 scales per row (fp8 dispatch); 0 when none move
  bool zero_fill;     // padded layout: zero the rows past each (expert, source) count
  int segments;       // padded layout: sources each rank sends for, T tokens each (1; the
                      // hierarchical backend's host groups: one per host); N = segments * ranks
};

namespace routing {

// The routing pass and count exchange of a normal dispatch: fills the private routing scratch
// of env.rank's buffer and writes group_sizes, num_dropped, num_recv and num_invalid.
cudaError_t LaunchRoutingAndNotify(const CommEnv& env, const CallShape& shape,
                                   const int32_t* topk_idx, int32_t* group_sizes,
                                   int32_t* num_dropped, int32_t* num_recv, int32_t* num_invalid,
                                   cudaStream_t stream);

// Opts the routing kernels into the shared memory any supported E needs, on the current device
// (the same setting whatever the group: idempotent, safe with any number of groups).
cudaError_t PrepareRoutingKernels();

// Dynamic shared memory the routing pass needs per block for E experts.
size_t RoutingSmemBytes(int num_experts);

}  // namespace routing

namespace barrier {

// Starts a call (advances seq) and returns on each rank once all ranks have started it, so
// peers may then write into each other's buffers.
cudaError_t LaunchBarrier(const CommEnv& env, cudaStream_t stream);

}  // namespace barrier

namespace normal {

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
  int32_t* out_row_src;        // [C] or null: rank * T * k + t * k + j of each row (-1 past
                               // num_recv)
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

}  // namespace normal

namespace padded {

// Dispatch-kind call: each routed slot of ids goes to the rank of its expert, at the slot's
// position in its (expert, source) block. ids = topk_idx (dispatch) or a PaddedHandle's
// slot_expert (redispatch along an existing routing: the same positions come out).
// With shape.segments = S > 1 (a host group of the hierarchical backend), every [T, ...] operand
// below is S segments of T tokens, segment g those of source sources[0][g * L + rank] (L ranks in
// the group, N = S * L sources); ids name the group's experts (rank d's local expert l is
// d * E_local + l) and the outputs are the flat layout of the N sources.
struct DispatchArgs {
  CommEnv env;
  CallShape shape;
  const void* x;               // [T, H] or null
  const float* x_scales;       // [T, scale_cols] or null
  const int32_t* ids;          // [T, k]
  const float* slot_values;    // [T, k] or null
  const int32_t* sources;      // [2, N] or null (S = 1: rank s sends for source s): [0][g * L +
                               // r] = the source of segment g of rank r, [1][s] = g * L + r
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
// float32 (times row_scale when given); row_values go back to their slots. Segments and sources
// as for DispatchArgs.
struct CombineArgs {
  CommEnv env;
  CallShape shape;
  ElemType elem;
  const void* rows;            // [E_local, N * M, H] or null
  const float* row_scale;      // [E_local, N * M] or null
  const float* row_values;     // [E_local, N * M] or null
  const int32_t* recv_counts;  // [E_local, N]
  const int32_t* slot_expert;  // [T, k]
  const int32_t* slot_pos;     // [T, k]
  const int32_t* sources;      // [2, N] or null
  void* out;                   // [T, H] or null: rows' type, or float32 when out_f32
  bool out_f32;                // float32 sums of lower-precision rows (no rounding to their type)
  float* slot_values;          // [T, k] or null
};

cudaError_t LaunchDispatch(const DispatchArgs& a, cudaStream_t stream);
cudaError_t LaunchCombine(const CombineArgs& a, cudaStream_t stream);

}  // namespace padded

}  // namespace jax_ep
