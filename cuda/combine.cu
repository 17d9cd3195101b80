// Combine: rows go back to the slots they came from and are summed per token.
//
// After a barrier (every peer's staging is free), the push phase ((row, piece) items) writes each
// row held for a peer's slot (s, f) into s's staging at slot f, with its scale and value; rows
// of this rank's own slots stay where they are. The reduce phase (one warp per token, after
// every peer's data_done flag) sums a token's delivered slots in slot order in float32, reading
// its own rows in place and the others from staging. Fixed order, no atomics: deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/api.h"
#include "cuda/device_utils.cuh"
#include "cuda/vec16.cuh"

namespace jax_ep {
namespace normal {
namespace {

constexpr int kThreads = 1024;

struct CombineParams {
  CommEnv env;
  CallShape shape;
  const int4* rows;
  const float* row_scale;
  const float* row_values;
  const int32_t* dest_rank;
  const int32_t* dest_row;
  const int32_t* row_src;
  const int32_t* num_recv;
  int4* out;
  float* slot_values;
};

__global__ void __launch_bounds__(kThreads) PushKernel(CombineParams p) {
  const CommEnv& env = p.env;
  const BufferMap& L = env.map;
  if (Poisoned(env)) return;
  const int lane = Lane();
  const int vecs = static_cast<int>(p.shape.row_bytes / 16);
  const int slots = p.shape.tokens * p.shape.top_k;
  const long long used = *p.num_recv;
  // (row, piece of the row) items over every warp: at decode sizes a rank holds about T * k
  // rows, too few for a warp each. Rows of this rank's own slots stay where they are.
  const int units = p.rows ? (vecs + kWarp - 1) / kWarp : 1;
  const int pieces = PiecesPerToken(static_cast<int>(used), units);
  for (long long item = GlobalWarp(); item < used * pieces; item += NumWarps()) {
    const long long r = item / pieces;
    const int piece = static_cast<int>(item % pieces);
    const int id = p.row_src[r];
    const int s_rank = id >= 0 ? id / slots : env.rank;
    if (s_rank == env.rank || s_rank >= env.num_ranks) continue;
    const int f = id % slots;
    if (p.rows) {
      WarpCopyUnits<false>(At<int4>(env, s_rank, L.staging) + static_cast<long long>(f) * vecs,
                           p.rows + r * vecs, piece * units / pieces, (piece + 1) * units / pieces,
                           vecs, lane);
    }
    if (piece == 0 && lane == 0) {
      if (p.row_scale) At<float>(env, s_rank, L.row_f32)[f] = p.row_scale[r];
      if (p.row_values) At<float>(env, s_rank, L.slot_f32)[f] = p.row_values[r];
    }
  }
  if (LastBlockDone(&Signal(env, env.rank)->block_counter[1])) {
    BlockSignalPeers(env, CurrentSeq(env),
                     [&](int d) { return &Signal(env, d)->data_done[env.rank]; });
  }
}

// Slots are summed in groups of kGroup, each lane loading kPerLane vectors of every slot of
// the group before it accumulates: kGroup * kPerLane = 8 loads in flight per lane. Top-2 takes
// 4 vectors of each slot (measured 171 vs 181 us at the Mixtral shape on 24 SMs); top-3 and up
// 2 vectors of 4 slots at a time (all 8 slots of a top-8 token at once, 1 vector each, measured
// slower: 859 vs 538 us at the DeepSeek-V3 shape, 35 vs 23 us at decode, on 24 SMs).
// Threads a block: at most 85 registers a thread at 768, 128 at 512 (wide accumulators for
// kPerLane = 4); no spills either way (ptxas -v).
constexpr int ReduceThreads(int per_lane) { return per_lane >= 4 ? 512 : 768; }

template <typename T, int kGroup, int kPerLane, bool kOutF32>
__global__ void __launch_bounds__(ReduceThreads(kPerLane)) ReduceKernel(CombineParams p) {
  using V = Vec16F32<T>;
  const CommEnv& env = p.env;
  const BufferMap& L = env.map;
  SignalArea* me = Signal(env, env.rank);
  if (!BlockWaitPeers(env, me->data_done, CurrentSeq(env), kPhaseCombineData)) return;
  const int lane = Lane();
  const int k = p.shape.top_k;
  const int vecs = static_cast<int>(p.shape.row_bytes / 16);
  const int units = p.out ? (vecs + kWarp - 1) / kWarp : 1;  // 32-vector units of a row
  const int pieces = PiecesPerToken(p.shape.tokens, units);
  const int4* staging = At<int4>(env, env.rank, L.staging);
  const float* staged_scale = At<float>(env, env.rank, L.row_f32);
  const float* staged_values = At<float>(env, env.rank, L.slot_f32);

  // Work item = (token, piece of the output row): the slots are looked up once per piece.
  for (int item = GlobalWarp(); item < p.shape.tokens * pieces; item += NumWarps()) {
    const int t = item / pieces, piece = item % pieces;
    // Lane j < k describes slot j: where its row is and its scale.
    const int f = t * k + lane;
    const int4* src = nullptr;
    bool remote = false;
    float scale = 1.0f;
    if (lane < k) {
      const int d = p.dest_rank[f];
      const int r = p.dest_row[f];
      const bool delivered = r >= 0 && d >= 0;
      if (delivered) {
        remote = d != env.rank;
        src = remote ? staging + static_cast<long long>(f) * vecs
                     : p.rows + static_cast<long long>(r) * vecs;
        if (p.row_scale) scale = remote ? __ldcg(&staged_scale[f]) : p.row_scale[r];
      }
      if (p.slot_values && piece == 0) {
        p.slot_values[f] = !delivered ? 0.0f : remote ? __ldcg(&staged_values[f]) : p.row_values[r];
      }
    }
    if (!p.out) continue;
    const unsigned delivered = __ballot_sync(0xffffffffu, src != nullptr);
    const unsigned remote_mask = __ballot_sync(0xffffffffu, remote);
    // An output row is vecs vectors of T, or vecs * kN / 4 float4 when kOutF32.
    int4* dst = p.out + static_cast<long long>(t) * vecs * (kOutF32 ? V::kN / 4 : 1);
    const int unit_end = (piece + 1) * units / pieces;
    for (int u0 = piece * units / pieces; u0 < unit_end; u0 += kPerLane) {
      const int v0 = u0 * kWarp + lane;
      // Vectors of the row past this piece's end (or the row's) are not this warp's.
      const int v_end = min(unit_end * kWarp, vecs);
      float acc[kPerLane][V::kN];
      SumSlotRows<T, kGroup, kPerLane>(acc, delivered, remote_mask, src, scale, v0, v_end);
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int v = v0 + u * kWarp;
        if (v < v_end) StoreSum<T, kOutF32>(dst, v, acc[u]);
      }
    }
  }
}

template <typename T, bool kOutF32>
cudaError_t LaunchReduce(const CombineParams& p, cudaStream_t stream) {
  const int k = p.shape.top_k;
  if (k > 2) {
    ReduceKernel<T, 4, 2, kOutF32><<<p.shape.num_sms, ReduceThreads(2), 0, stream>>>(p);
  } else {
    ReduceKernel<T, 2, 4, kOutF32><<<p.shape.num_sms, ReduceThreads(4), 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchCombine(const CombineArgs& a, cudaStream_t stream) {
  CombineParams p{a.env, a.shape, static_cast<const int4*>(a.rows), a.row_scale, a.row_values,
                  a.dest_rank, a.dest_row, a.row_src, a.num_recv, static_cast<int4*>(a.out),
                  a.slot_values};
  cudaError_t err;
  if (a.env.num_ranks > 1) {  // with no peer there is nothing to push and no one to wait for
    if ((err = barrier::LaunchBarrier(a.env, stream)) != cudaSuccess) return err;
    PushKernel<<<a.shape.num_sms, kThreads, 0, stream>>>(p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return WithReduceTypes(a.elem, a.out_f32, [&](auto elem, auto out_f32) {
    return LaunchReduce<decltype(elem), decltype(out_f32)::value>(p, stream);
  });
}

}  // namespace normal
}  // namespace jax_ep
