// Dispatch and redispatch: the send phase and the receive (finalize) phase.
//
// Send (one warp per token): every delivered slot (t, j) has a destination rank d and row r.
// Rows for this rank are written straight into XLA's output. A token goes to each peer once:
// its first slot for d (in slot order) is the token's primary row there, the token's bytes go
// to d's staging buffer at that row, and every row of the token on d records the primary row so
// d can expand it. Per-row metadata (weight, source slot) goes with it.
// Finalize ((row, piece) items over every warp, after every peer's data_done flag): copies staged
// rows into XLA's output, and zero-fills the rows past num_recv.
#include "cuda/api.h"
#include "cuda/device_utils.cuh"

namespace jax_ep {
namespace normal {
namespace {

constexpr int kThreads = 1024;

// The send pass's block shape. Its loads stay 8 a lane at 1024 threads except for wide fan-outs
// (k >= 4) whose tokens give every warp a whole row: there 512 threads with 16 loads a lane move
// the k copies faster (DeepSeek-V3 shape, 24 SMs, H100: 411 against 441 us). Elsewhere the wide
// shape was slower (Mixtral, k = 2: 144 against 134 us at 24 SMs; decode, T = 128 at 132 SMs:
// 18.6 against 15.9 us): bench/RESULTS.md, "Kernel changes tried against these ceilings".
struct SendShape {
  int threads;
  int per_lane;  // 16-byte loads in flight per lane
};
constexpr SendShape kSendNarrow{1024, 8}, kSendWide{512, 16};
// Whether a call's send pass takes kSendWide: k >= 4, and at least two tokens per warp of the
// 512-thread grid (so PiecesPerToken gives each warp whole rows).
bool SendsWide(const CallShape& s) {
  const long long wide_warps = static_cast<long long>(s.num_sms) * kSendWide.threads / kWarp;
  return s.top_k >= 4 && s.tokens >= 2 * wide_warps;
}

struct SendParams {
  CommEnv env;
  CallShape shape;
  const int4* x;              // [T, H] or null
  const float* slot_values;   // [T, k] or null (dispatch: topk_weights)
  const int32_t* topk_idx;    // dispatch only
  int32_t* dest_rank;         // dispatch: written; redispatch: read
  int32_t* dest_row;
  int4* out_x;                // [C, H] or null
  float* out_values;          // [C] or null
  int32_t* out_row_src;       // [C]: dispatch always, redispatch when asked (or null)
  const int32_t* num_recv;    // []: rows in use on this rank
};

// Rows past num_recv are zero, their weight too, and they hold no slot (row_src -1).
__device__ inline void ZeroTail(const int32_t* num_recv, long long capacity, int vecs,
                                int4* out_x, float* out_values, int32_t* out_row_src) {
  const int lane = Lane();
  for (long long r = *num_recv + GlobalWarp(); r < capacity; r += NumWarps()) {
    if (out_x) WarpZeroRow(out_x + r * vecs, vecs, lane);
    if (lane == 0) {
      if (out_values) out_values[r] = 0.0f;
      if (out_row_src) out_row_src[r] = -1;
    }
  }
}

struct FinalizeParams {
  CommEnv env;
  CallShape shape;
  const int32_t* num_recv;
  int4* out_x;
  float* out_values;
  int32_t* out_row_src;
};

template <bool kDispatch, int kSendThreads, int kSendPerLane>
__global__ void __launch_bounds__(kSendThreads) SendKernel(SendParams p) {
  const CommEnv& env = p.env;
  const CallShape& s = p.shape;
  const BufferMap& L = env.map;
  if (Poisoned(env)) return;
  const int lane = Lane();
  const int k = s.top_k;
  const int slots = s.tokens * k;
  const int vecs = static_cast<int>(s.row_bytes / 16);
  const int units = p.x ? (vecs + kWarp - 1) / kWarp : 1;  // 32-vector units of a row
  const int pieces = PiecesPerToken(s.tokens, units);
  const int32_t* dest_base = At<int32_t>(env, env.rank, L.dest_base);
  const int32_t* chunk_base = At<int32_t>(env, env.rank, L.chunk_base);
  const int32_t* local_rank = At<int32_t>(env, env.rank, L.local_rank);
  const int chunks = (slots + kRoutingChunk - 1) / kRoutingChunk;

  // Work item = (token, piece of its row); piece 0 also writes the routing metadata.
  for (int item = GlobalWarp(); item < s.tokens * pieces; item += NumWarps()) {
    const int t = item / pieces, piece = item % pieces;
    const int f = t * k + lane;
    int d = -1;
    long long row = -1;
    if (lane < k) {
      if constexpr (kDispatch) {
        const int e = p.topk_idx[f];
        if (e >= 0 && e < s.num_experts) {
          const long long r = static_cast<long long>(dest_base[e]) +
                              chunk_base[static_cast<size_t>(e) * chunks + f / kRoutingChunk] +
                              local_rank[f];
          if (r < s.capacity) {
            d = e / s.experts_local;
            row = r;
          }
        }
      } else {
        d = p.dest_rank[f];
        row = p.dest_row[f];
        if (row < 0 || d < 0 || d >= env.num_ranks || row >= s.capacity) d = -1, row = -1;
      }
    }
    const bool delivered = d >= 0;
    // The token's first slot for each destination carries its bytes there.
    const unsigned same_dest = __match_any_sync(0xffffffffu, delivered ? d : -1 - lane);
    const int first = __ffs(same_dest) - 1;
    const long long primary = __shfl_sync(0xffffffffu, row, first);

    if (piece == 0 && lane < k) {
      if constexpr (kDispatch) {
        p.dest_rank[f] = d;
        p.dest_row[f] = static_cast<int32_t>(row);
      }
      if (delivered) {
        const int32_t src_id = env.rank * slots + f;
        if (d == env.rank) {
          At<int32_t>(env, d, L.row_primary)[row] = -1;  // written in place
          if (p.out_values) p.out_values[row] = p.slot_values[f];
          if (p.out_row_src) p.out_row_src[row] = src_id;
        } else {
          At<int32_t>(env, d, L.row_primary)[row] = static_cast<int32_t>(primary);
          if (p.slot_values) At<float>(env, d, L.row_f32)[row] = p.slot_values[f];
          // Every rank runs the same call, so the receiver wants row_src iff this sender does.
          if (p.out_row_src) At<int32_t>(env, d, L.row_src)[row] = src_id;
        }
      }
    }
    if (!p.x) continue;
    int4* target = nullptr;
    if (delivered && (d == env.rank || first == lane)) {
      target = d == env.rank ? p.out_x + row * vecs : At<int4>(env, d, L.staging) + row * vecs;
    }
    // Read each segment once (all its loads in flight), then store it to every target.
    const unsigned targets = __ballot_sync(0xffffffffu, target != nullptr);
    const int4* src = p.x + static_cast<size_t>(t) * vecs;
    const int unit_end = (piece + 1) * units / pieces;
    for (int u0 = piece * units / pieces; u0 < unit_end; u0 += kSendPerLane) {
      int4 chunk[kSendPerLane];
#pragma unroll
      for (int u = 0; u < kSendPerLane; ++u) {
        const int v = (u0 + u) * kWarp + lane;
        if (u0 + u < unit_end && v < vecs) chunk[u] = src[v];
      }
      for (unsigned m = targets; m; m &= m - 1) {
        int4* dst = reinterpret_cast<int4*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(target), __ffs(m) - 1));
#pragma unroll
        for (int u = 0; u < kSendPerLane; ++u) {
          const int v = (u0 + u) * kWarp + lane;
          if (u0 + u < unit_end && v < vecs) dst[v] = chunk[u];
        }
      }
    }
  }
  if (env.num_ranks == 1) {
    // No peer stages anything, so no finalize pass: rows past num_recv are zeroed here.
    ZeroTail(p.num_recv, s.capacity, vecs, p.out_x, p.out_values, p.out_row_src);
    return;
  }
  if (LastBlockDone(&Signal(env, env.rank)->block_counter[0])) {
    BlockSignalPeers(env, CurrentSeq(env),
                     [&](int d) { return &Signal(env, d)->data_done[env.rank]; });
  }
}

__global__ void __launch_bounds__(kThreads) FinalizeKernel(FinalizeParams p) {
  const CommEnv& env = p.env;
  const BufferMap& L = env.map;
  SignalArea* me = Signal(env, env.rank);
  if (!BlockWaitPeers(env, me->data_done, CurrentSeq(env), kPhaseDispatchData)) return;
  const int lane = Lane();
  const int vecs = static_cast<int>(p.shape.row_bytes / 16);
  const long long used = *p.num_recv;
  const long long capacity = p.shape.capacity;

  {
    // Rows a peer staged, as (row, piece of the row) items over every warp: at decode sizes a
    // rank receives about T * k rows, too few for a warp each. Rows the send pass wrote in
    // place have no primary (-1).
    const int32_t* primary = At<int32_t>(env, env.rank, L.row_primary);
    const float* staged_values = At<float>(env, env.rank, L.row_f32);
    const int32_t* staged_src = At<int32_t>(env, env.rank, L.row_src);
    const int4* staging = At<int4>(env, env.rank, L.staging);
    const int units = p.out_x ? (vecs + kWarp - 1) / kWarp : 1;
    const int pieces = PiecesPerToken(static_cast<int>(used), units);
    for (long long item = GlobalWarp(); item < used * pieces; item += NumWarps()) {
      const long long r = item / pieces;
      const int piece = static_cast<int>(item % pieces);
      const int from = __ldcg(&primary[r]);
      if (from < 0) continue;
      if (p.out_x) {
        WarpCopyUnits<true>(p.out_x + r * vecs, staging + static_cast<long long>(from) * vecs,
                            piece * units / pieces, (piece + 1) * units / pieces, vecs, lane);
      }
      if (piece == 0 && lane == 0) {
        if (p.out_values) p.out_values[r] = __ldcg(&staged_values[r]);
        if (p.out_row_src) p.out_row_src[r] = __ldcg(&staged_src[r]);
      }
    }
  }
  ZeroTail(p.num_recv, capacity, vecs, p.out_x, p.out_values, p.out_row_src);
}

template <bool kDispatch>
cudaError_t LaunchSend(const SendParams& p, cudaStream_t stream) {
  if (SendsWide(p.shape)) {
    SendKernel<kDispatch, kSendWide.threads, kSendWide.per_lane>
        <<<p.shape.num_sms, kSendWide.threads, 0, stream>>>(p);
  } else {
    SendKernel<kDispatch, kSendNarrow.threads, kSendNarrow.per_lane>
        <<<p.shape.num_sms, kSendNarrow.threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchDispatch(const DispatchArgs& a, cudaStream_t stream) {
  const CallShape& s = a.shape;
  cudaError_t err = routing::LaunchRoutingAndNotify(a.env, s, a.topk_idx, a.group_sizes,
                                                    a.num_dropped, a.num_recv, a.num_invalid,
                                                    stream);
  if (err != cudaSuccess) return err;
  SendParams sp{a.env, s, static_cast<const int4*>(a.x), a.topk_weights, a.topk_idx,
                a.dest_rank, a.dest_row, static_cast<int4*>(a.out_x), a.out_weights, a.row_src,
                a.num_recv};
  if ((err = LaunchSend<true>(sp, stream)) != cudaSuccess) return err;
  if (a.env.num_ranks == 1) return cudaSuccess;  // the send pass wrote every row
  FinalizeParams fp{a.env, s, a.num_recv, static_cast<int4*>(a.out_x), a.out_weights, a.row_src};
  FinalizeKernel<<<s.num_sms, kThreads, 0, stream>>>(fp);
  return cudaGetLastError();
}

cudaError_t LaunchRedispatch(const RedispatchArgs& a, cudaStream_t stream) {
  const CallShape& s = a.shape;
  cudaError_t err;
  // Alone there is no peer whose staging must be free first, and nothing to finalize.
  if (a.env.num_ranks > 1 && (err = barrier::LaunchBarrier(a.env, stream)) != cudaSuccess) {
    return err;
  }
  SendParams sp{a.env, s, static_cast<const int4*>(a.x), a.slot_values, nullptr,
                const_cast<int32_t*>(a.dest_rank), const_cast<int32_t*>(a.dest_row),
                static_cast<int4*>(a.out_x), a.out_values, a.out_row_src, a.num_recv};
  if ((err = LaunchSend<false>(sp, stream)) != cudaSuccess) return err;
  if (a.env.num_ranks == 1) return cudaSuccess;
  FinalizeParams fp{a.env, s, a.num_recv, static_cast<int4*>(a.out_x), a.out_values,
                    a.out_row_src};
  FinalizeKernel<<<s.num_sms, kThreads, 0, stream>>>(fp);
  return cudaGetLastError();
}

}  // namespace normal
}  // namespace jax_ep
