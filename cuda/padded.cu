// The padded layout (the low-latency decode format): one round trip per call, no count exchange
// before the data.
//
// Dispatch-kind call (dispatch, and redispatch along a PaddedHandle):
//   Send (warps own (expert, share) items): the warp scans the source's tokens for its expert,
//   numbers the hits in token order (their position p), writes each of its share of the rows,
//   weights and scales straight to their final slot [l][s][p] in the expert rank's buffer, and
//   the last warp of the expert publishes the count word (call tag << 32 | rows) with a release
//   store: receivers wait on that word only.
//   Receive (warps own contiguous padded rows): waits for each (local expert, source) count word,
//   copies the rows below the count into XLA's output and zero-fills the rest.
//   A source's rows for its own experts skip the buffer: the send writes them straight into
//   XLA's output (the same index: [l][s][p]) and the receive leaves them there.
// Combine-kind call:
//   Send: each row below its count goes back to the source rank's buffer at [expert][p]; the last
//   block releases one flag per rank. Rows of this rank's own tokens stay where they are.
//   Reduce (warps own (token, segment) items): sums the token's delivered slots in slot order in
//   float32 with the fused scales, reading its own experts' rows in place. Fixed order, no
//   atomics: deterministic.
// Every region is double-buffered by the call's sequence parity: a peer can only be one call of
// a kind ahead of us (it waits on our words of the call we are in), so it never writes the half
// we are reading. Sequences live on the device (PaddedSignal) and are advanced by each
// call's last kernel: CUDA-graph replay behaves like a fresh launch.
//
// Sources. In a flat group rank s sends for source s alone. In a host group of the hierarchical
// backend a rank is a forwarder: it sends for S = shape.segments sources at once, its pool's
// segments of T tokens (one per host, each its source's tokens in token order), and the ranks'
// outputs keep the flat layout of the N = S * L global sources. Block (l, source) of an expert
// rank has one writer (the forwarder of that source), so its count word still has one writer, and
// positions numbered per (expert, segment) in token order are the flat ones. The `sources` table
// (null in a flat group: the identity) says which source a segment holds and where a source is.
#include <cub/block/block_scan.cuh>

#include "cuda/api.h"
#include "cuda/device_utils.cuh"
#include "cuda/vec16.cuh"

namespace jax_ep {
namespace padded {
namespace {

constexpr int kThreads = 1024;
constexpr int kReduceThreads = 512;
constexpr int kKindDispatch = 0, kKindCombine = 1;
// block_counter slots of PaddedSignal
constexpr int kCounterDispatchRecv = 0, kCounterCombineSend = 1, kCounterCombineReduce = 2;

struct DispatchParams {
  CommEnv env;
  CallShape shape;
  const int4* x;
  const float* x_scales;
  const int32_t* ids;
  const float* slot_values;
  const int32_t* sources;
  int4* out_x;
  float* out_values;
  float* out_scales;
  int32_t* recv_counts;
  int32_t* group_sizes;
  int32_t* num_dropped;
  int32_t* slot_expert;
  int32_t* slot_pos;
};

struct CombineParams {
  CommEnv env;
  CallShape shape;
  const int4* rows;
  const float* row_scale;
  const float* row_values;
  const int32_t* recv_counts;
  const int32_t* slot_expert;
  const int32_t* slot_pos;
  const int32_t* sources;
  int4* out;
  float* slot_values;
};

__device__ __forceinline__ PaddedSignal* OwnPaddedSignal(const CommEnv& env) {
  return At<PaddedSignal>(env, env.rank, env.map.padded_signal);
}

// This call's sequence number for a kind: one past the calls the kind has completed.
__device__ __forceinline__ unsigned long long PaddedSeq(const CommEnv& env, int kind) {
  return *reinterpret_cast<volatile unsigned long long*>(&OwnPaddedSignal(env)->seq[kind]) + 1;
}

__device__ __forceinline__ unsigned long long CountWord(unsigned long long seq, int rows) {
  return (static_cast<unsigned long long>(static_cast<unsigned int>(seq)) << 32) |
         static_cast<unsigned int>(rows);
}

// Waits until the count word carries this call's tag; returns its row count, or 0 when the
// wait timed out (reported) or the group is poisoned.
__device__ int WaitCount(const CommEnv& env, const unsigned long long* word,
                         unsigned long long seq, int peer) {
  const unsigned int tag = static_cast<unsigned int>(seq);
  unsigned long long v = LoadAcquireSys(word);
  if (static_cast<unsigned int>(v >> 32) != tag) {
    const unsigned long long start = GlobalTimerNs();
    while (static_cast<unsigned int>((v = LoadAcquireSys(word)) >> 32) != tag) {
      if (Poisoned(env)) return 0;
      if (GlobalTimerNs() - start > env.timeout_ns) {
        ReportTimeout(env, kPhasePaddedDispatch, peer, seq);
        return 0;
      }
      __nanosleep(64);
    }
  }
  return static_cast<int>(v & 0xffffffffu);
}

__device__ __forceinline__ unsigned LanesBelow(int lane) { return (1u << lane) - 1u; }

// The global source whose tokens segment `segment` of rank `rank`'s ids holds: sources[0][g * L +
// r] (L = n ranks in the group); a flat group's rank sends for itself.
__device__ __forceinline__ int SourceOf(const int32_t* sources, int segment, int rank, int n) {
  return sources ? sources[segment * n + rank] : rank;
}

// Where source `src` sits in the forwarders' pools: g * L + r, segment g of rank r (its writer);
// sources[1][src]. A flat group: segment 0 of rank src.
__device__ __forceinline__ int PoolSlotOf(const int32_t* sources, int src, int num_sources) {
  return sources ? sources[num_sources + src] : src;
}

// Exclusive prefix sums of the (local expert, source) counts in dynamic shared memory
// ([pairs + 1] ints, starts[pairs] = the total), computed by the whole block, kPairsPerThread
// consecutive pairs a thread; count_of(q) gives pair q's count.
constexpr int kPairsPerThread = (kMaxExperts + kThreads - 1) / kThreads;
template <typename CountOf>
__device__ int* PairStarts(int pairs, CountOf count_of) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  extern __shared__ int starts[];
  int v[kPairsPerThread];
#pragma unroll
  for (int i = 0; i < kPairsPerThread; ++i) {
    const int q = threadIdx.x * kPairsPerThread + i;
    v[i] = q < pairs ? count_of(q) : 0;
  }
  int total;
  Scan(scan_storage).ExclusiveSum(v, v, total);
#pragma unroll
  for (int i = 0; i < kPairsPerThread; ++i) {
    const int q = threadIdx.x * kPairsPerThread + i;
    if (q < pairs) starts[q] = v[i];
  }
  if (threadIdx.x == 0) starts[pairs] = total;
  __syncthreads();
  return starts;
}

// The pair holding received row i (0 <= i < starts[pairs]): the last whose start is <= i.
__device__ __forceinline__ int PairOf(const int* starts, int pairs, int i) {
  int lo = 0, hi = pairs;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (starts[mid] <= i) lo = mid; else hi = mid;
  }
  return lo;
}

// Received rows move in chunks of kChunkVecs 16-byte vectors, one chunk a warp item with all
// its loads in flight (8 a lane): a row of a few KB spreads over several warps, which matters
// at decode sizes, where there are few rows.
constexpr int kChunkLoads = 8;
constexpr int kChunkVecs = kChunkLoads * kWarp;
template <bool kFromPeer>
__device__ __forceinline__ void WarpCopyChunk(int4* __restrict__ dst, const int4* __restrict__ src,
                                              int chunk, int vecs, int lane) {
  int4 buf[kChunkLoads];
#pragma unroll
  for (int u = 0; u < kChunkLoads; ++u) {
    const int v = chunk * kChunkVecs + u * kWarp + lane;
    if (v < vecs) buf[u] = kFromPeer ? __ldcg(src + v) : src[v];
  }
#pragma unroll
  for (int u = 0; u < kChunkLoads; ++u) {
    const int v = chunk * kChunkVecs + u * kWarp + lane;
    if (v < vecs) dst[v] = buf[u];
  }
}

// --- dispatch-kind --------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) DispatchSendKernel(DispatchParams p) {
  const CommEnv& env = p.env;
  const CallShape& s = p.shape;
  const BufferMap& L = env.map;
  if (Poisoned(env)) return;
  const unsigned long long seq = PaddedSeq(env, kKindDispatch);
  const int half = static_cast<int>(seq & 1);
  const int lane = Lane();
  const int k = s.top_k, n = env.num_ranks, m = s.max_tokens;
  const int vecs = static_cast<int>(s.row_bytes / 16);
  const int sc = s.scale_cols;
  const int num_sources = s.segments * n;    // N: blocks per local expert on every rank
  const int experts = s.experts_local * n;   // the experts of this group, which ids name

  // Slots that are not delivered (unrouted, invalid, or a repeat of an earlier slot's expert).
  if (p.slot_expert) {
    for (int f = blockIdx.x * blockDim.x + threadIdx.x; f < s.segments * s.tokens * k;
         f += gridDim.x * blockDim.x) {
      const int e = p.ids[f];
      bool delivered = e >= 0 && e < experts;
      for (int j = f - f % k; delivered && j < f; ++j) delivered = p.ids[j] != e;
      if (!delivered) p.slot_expert[f] = p.slot_pos[f] = -1;
    }
  }

  const int chunks = p.x ? (vecs + kChunkVecs - 1) / kChunkVecs : 1;
  // Item (segment, expert e, share g of its rows): G warps per (segment, expert) when there are
  // enough warps. segments * experts = E in a flat group and in a host group alike.
  const int targets = s.segments * experts;
  const int shares = NumWarps() / targets > 1 ? NumWarps() / targets : 1;
  unsigned int* counters = At<unsigned int>(env, env.rank, L.padded_expert_counter);
  for (int item = GlobalWarp(); item < targets * shares; item += NumWarps()) {
    const int q = item / shares, g = item % shares;
    const int segment = q / experts, e = q % experts;
    const int d = e / s.experts_local, l = e % s.experts_local;
    // (l, the segment's source) on d
    const long long pair =
        static_cast<long long>(l) * num_sources + SourceOf(p.sources, segment, env.rank, n);
    const int first_token = segment * s.tokens;  // the segment's rows of ids
    // Our own experts' rows go straight to XLA's output, whose index [l][s][p] is the buffer's.
    const bool self = d == env.rank;
    int4* rows = self ? p.out_x : At<int4>(env, d, L.padded_disp_rows[half]);
    float* values = self ? p.out_values : At<float>(env, d, L.padded_disp_w[half]);
    float* scales = self ? p.out_scales : At<float>(env, d, L.padded_disp_scales[half]);
    int carry = 0, repeats = 0;
    for (int t0 = 0; t0 < s.tokens; t0 += kWarp) {
      const int t = first_token + t0 + lane;
      int first = -1, hits = 0;
      if (t0 + lane < s.tokens) {
        for (int j = 0; j < k; ++j) {
          if (p.ids[t * k + j] == e) {
            if (first < 0) first = j;
            ++hits;
          }
        }
      }
      const unsigned hit_mask = __ballot_sync(0xffffffffu, first >= 0);
      const int pos = carry + __popc(hit_mask & LanesBelow(lane));
      if (first >= 0) {
        repeats += hits - 1;
        if (g == 0 && p.slot_expert) {
          p.slot_expert[t * k + first] = e;
          p.slot_pos[t * k + first] = pos;
        }
      }
      // The expert's rows in chunks: chunk c of row p is share (p * chunks + c) % G's, so a
      // few rows (decode) still spread over all G warps of the expert.
      for (unsigned mm = hit_mask; mm; mm &= mm - 1) {
        const int b = __ffs(mm) - 1;
        const int tb = first_token + t0 + b;
        const int pb = __shfl_sync(0xffffffffu, pos, b);
        const int jb = __shfl_sync(0xffffffffu, first, b);
        const long long slot = pair * m + pb;
        const int base = (pb * chunks) % shares;  // the share of the row's chunk 0
        if (p.x) {
          for (int c = (g - base + shares) % shares; c < chunks; c += shares) {
            WarpCopyChunk<false>(rows + slot * vecs, p.x + static_cast<long long>(tb) * vecs, c,
                                 vecs, lane);
          }
        }
        if (base != g) continue;
        if (p.x_scales) {
          for (int c = lane; c < sc; c += kWarp) {
            scales[slot * sc + c] = p.x_scales[static_cast<long long>(tb) * sc + c];
          }
        }
        if (p.slot_values && lane == 0) values[slot] = p.slot_values[tb * k + jb];
      }
      carry += __popc(hit_mask);
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) repeats += __shfl_xor_sync(0xffffffffu, repeats, o);
    // The last of the expert's warps publishes the count once every share's rows are visible:
    // each warp fences before counting itself in, the last fences again before its release.
    __syncwarp();
    if (lane == 0) {
      __threadfence_system();
      if (atomicAdd(&counters[q], 1u) == static_cast<unsigned int>(shares - 1)) {
        counters[q] = 0;
        At<int32_t>(env, d, L.padded_disp_dups[half])[pair] = repeats;
        __threadfence_system();
        StoreReleaseSys(At<unsigned long long>(env, d, L.padded_disp_flag[half]) + pair,
                        CountWord(seq, carry));
      }
    }
    __syncwarp();
  }
}

__global__ void __launch_bounds__(kThreads) DispatchRecvKernel(DispatchParams p) {
  const CommEnv& env = p.env;
  const CallShape& s = p.shape;
  const BufferMap& L = env.map;
  const unsigned long long seq = PaddedSeq(env, kKindDispatch);
  const int half = static_cast<int>(seq & 1);
  const int lane = Lane();
  const int n = env.num_ranks, m = s.max_tokens;
  const int vecs = static_cast<int>(s.row_bytes / 16);
  const int sc = s.scale_cols;
  const unsigned long long* words = At<unsigned long long>(env, env.rank, L.padded_disp_flag[half]);
  const int4* rows = At<int4>(env, env.rank, L.padded_disp_rows[half]);
  const float* values = At<float>(env, env.rank, L.padded_disp_w[half]);
  const float* scales = At<float>(env, env.rank, L.padded_disp_scales[half]);
  const bool alive = !Poisoned(env);

  // Every block learns every (local expert, source) count: each thread waits on a few count
  // words, then the block scans them. The buffer and the output share the row index
  // r = (l * N + s) * M + p.
  const int num_sources = s.segments * n;
  const int pairs = s.experts_local * num_sources;
  // The rank that writes source src's blocks here (src itself in a flat group).
  auto writer = [&](int src) { return PoolSlotOf(p.sources, src, num_sources) % n; };
  const int* start = PairStarts(pairs, [&](int q) {
    return alive ? WaitCount(env, words + q, seq, writer(q % num_sources)) : 0;
  });
  const int received = start[pairs];
  if (blockIdx.x == 0 && p.recv_counts) {
    for (int q = threadIdx.x; q < pairs; q += blockDim.x) p.recv_counts[q] = start[q + 1] - start[q];
  }
  // Received rows: items (row i, chunk c), so that few rows still spread over every warp. Alone,
  // every row is our own (we forward every source) and already in place.
  const int chunks = p.out_x ? (vecs + kChunkVecs - 1) / kChunkVecs : 1;
  const long long items = n > 1 ? static_cast<long long>(received) * chunks : 0;
  for (long long item = GlobalWarp(); item < items; item += NumWarps()) {
    const int i = static_cast<int>(item / chunks), c = static_cast<int>(item % chunks);
    const int pair = PairOf(start, pairs, i);
    if (writer(pair % num_sources) == env.rank) continue;  // the send wrote them in place
    const long long r = static_cast<long long>(pair) * m + (i - start[pair]);
    if (p.out_x) WarpCopyChunk<true>(p.out_x + r * vecs, rows + r * vecs, c, vecs, lane);
    if (c == 0) {
      if (p.out_scales) {
        for (int col = lane; col < sc; col += kWarp) p.out_scales[r * sc + col] = __ldcg(&scales[r * sc + col]);
      }
      if (p.out_values && lane == 0) p.out_values[r] = __ldcg(&values[r]);
    }
  }
  if (s.zero_fill) {  // the padding past each count
    const long long total = static_cast<long long>(pairs) * m;
    for (long long r = GlobalWarp(); r < total; r += NumWarps()) {
      const int pair = static_cast<int>(r / m);
      if (r % m < start[pair + 1] - start[pair]) continue;
      if (p.out_x) WarpZeroRow(p.out_x + r * vecs, vecs, lane);
      if (p.out_scales) {
        for (int col = lane; col < sc; col += kWarp) p.out_scales[r * sc + col] = 0.0f;
      }
      if (p.out_values && lane == 0) p.out_values[r] = 0.0f;
    }
  }

  if (LastBlockDone(&OwnPaddedSignal(env)->block_counter[kCounterDispatchRecv])) {
    // Every count word of this call has arrived (or the group is dead): the per-expert sums.
    __shared__ int dropped;
    if (threadIdx.x == 0) dropped = 0;
    __syncthreads();
    const int32_t* dups = At<int32_t>(env, env.rank, L.padded_disp_dups[half]);
    for (int l = threadIdx.x; l < s.experts_local; l += blockDim.x) {
      int sum = 0, drop = 0;
      for (int src = 0; src < num_sources; ++src) {
        const long long q = static_cast<long long>(l) * num_sources + src;
        const unsigned long long w = LoadAcquireSys(words + q);
        if (static_cast<unsigned int>(w >> 32) == static_cast<unsigned int>(seq)) {
          sum += static_cast<int>(w & 0xffffffffu);
          drop += __ldcg(&dups[q]);
        }
      }
      if (p.group_sizes) p.group_sizes[l] = sum;
      atomicAdd(&dropped, drop);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      if (p.num_dropped) *p.num_dropped = dropped;
      OwnPaddedSignal(env)->seq[kKindDispatch] = seq;
    }
  }
}

// --- combine-kind ---------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) CombineSendKernel(CombineParams p) {
  const CommEnv& env = p.env;
  const CallShape& s = p.shape;
  const BufferMap& L = env.map;
  const unsigned long long seq = PaddedSeq(env, kKindCombine);
  const int half = static_cast<int>(seq & 1);
  const int lane = Lane();
  const int n = env.num_ranks, m = s.max_tokens;
  const int vecs = static_cast<int>(s.row_bytes / 16);
  const int num_sources = s.segments * n, experts = s.experts_local * n;
  if (!Poisoned(env)) {
    // Only the rows below each (local expert, source) count go back: the block scans the
    // counts into shared memory once, then warps take received rows i = 0 .. total - 1 in a
    // grid stride and find their (pair, position) by binary search, never visiting padding.
    const int pairs = s.experts_local * num_sources;
    const int* start = PairStarts(pairs, [&](int q) { return p.recv_counts[q]; });
    const int total = start[pairs];
    const int chunks = p.rows ? (vecs + kChunkVecs - 1) / kChunkVecs : 1;
    for (long long item = GlobalWarp(); item < static_cast<long long>(total) * chunks;
         item += NumWarps()) {
      const int i = static_cast<int>(item / chunks), c = static_cast<int>(item % chunks);
      const int pair = PairOf(start, pairs, i);
      const int l = pair / num_sources;
      // The row goes back to its source's forwarder (the source itself in a flat group), at
      // [segment][expert][p] there.
      const int at = PoolSlotOf(p.sources, pair % num_sources, num_sources);
      const int to = at % n, segment = at / n;
      if (to == env.rank) continue;  // the reduce reads the rows of our own pool in place
      const int pos = i - start[pair];
      const long long r = static_cast<long long>(pair) * m + pos;
      const long long slot =
          (static_cast<long long>(segment) * experts + env.rank * s.experts_local + l) * m + pos;
      if (p.rows) {
        WarpCopyChunk<false>(At<int4>(env, to, L.padded_comb_rows[half]) + slot * vecs,
                             p.rows + r * vecs, c, vecs, lane);
      }
      if (c == 0 && lane == 0) {
        if (p.row_scale) At<float>(env, to, L.padded_comb_scale[half])[slot] = p.row_scale[r];
        if (p.row_values) At<float>(env, to, L.padded_comb_value[half])[slot] = p.row_values[r];
      }
    }
  }
  if (LastBlockDone(&OwnPaddedSignal(env)->block_counter[kCounterCombineSend])) {
    const int d = threadIdx.x;
    if (d < n && d != env.rank) {
      StoreReleaseSys(At<unsigned long long>(env, d, L.padded_comb_flag[half]) + env.rank, seq);
    }
  }
}

constexpr int kPerLane = 2;                    // 16-byte vectors per lane per segment
constexpr int kSegVecs = kPerLane * kWarp;     // vectors per (token, segment) item
constexpr int kGroup = 4;                      // slots loaded before they are summed

// A reduced vector of kN floats to the output row: in the rows' type (one 16-byte vector), or as
// float32 (kN / 4 float4s: the hierarchical backend's partial sums, added again across hosts).
template <typename T, bool kOutF32>
__global__ void __launch_bounds__(kReduceThreads) CombineReduceKernel(CombineParams p) {
  using V = Vec16F32<T>;
  const CommEnv& env = p.env;
  const CallShape& s = p.shape;
  const BufferMap& L = env.map;
  const unsigned long long seq = PaddedSeq(env, kKindCombine);
  const int half = static_cast<int>(seq & 1);
  const int lane = Lane();
  const int k = s.top_k, m = s.max_tokens, n = env.num_ranks;
  const int vecs = static_cast<int>(s.row_bytes / 16);
  const int num_sources = s.segments * n, experts = s.experts_local * n;
  const int tokens = s.segments * s.tokens;  // rows of slot_expert: every segment's tokens
  const bool ok = BlockWaitPeers(
      env, At<unsigned long long>(env, env.rank, L.padded_comb_flag[half]), seq,
      kPhasePaddedCombine);
  const int4* rows = At<int4>(env, env.rank, L.padded_comb_rows[half]);
  const float* scales = At<float>(env, env.rank, L.padded_comb_scale[half]);
  const float* values = At<float>(env, env.rank, L.padded_comb_value[half]);
  const int row_segments = p.out ? (vecs + kSegVecs - 1) / kSegVecs : 1;

  for (int item = ok ? GlobalWarp() : tokens * row_segments; item < tokens * row_segments;
       item += NumWarps()) {
    const int t = item / row_segments, seg = item % row_segments;
    const int pool_segment = t / s.tokens;
    // Lane j < k describes slot j: where its row is (a peer's row in our buffer at
    // [pool segment][e][p], our own expert's in place in rows at [l][the segment's source][p])
    // and its scale.
    const int4* src = nullptr;
    bool staged = false;
    float scale = 1.0f;
    if (lane < k) {
      const int e = p.slot_expert[t * k + lane];
      float value = 0.0f;
      if (e >= 0) {
        const int pos = p.slot_pos[t * k + lane];
        if (e / s.experts_local == env.rank) {
          const long long r = (static_cast<long long>(e % s.experts_local) * num_sources +
                               SourceOf(p.sources, pool_segment, env.rank, n)) * m + pos;
          if (p.rows) src = p.rows + r * vecs;
          if (p.row_scale) scale = p.row_scale[r];
          if (p.row_values) value = p.row_values[r];
        } else {
          const long long slot = (static_cast<long long>(pool_segment) * experts + e) * m + pos;
          staged = true;
          if (p.rows) src = rows + slot * vecs;
          if (p.row_scale) scale = __ldcg(&scales[slot]);
          if (p.row_values) value = __ldcg(&values[slot]);
        }
      }
      if (p.slot_values && seg == 0) p.slot_values[t * k + lane] = value;
    }
    if (!p.out) continue;
    const unsigned staged_mask = __ballot_sync(0xffffffffu, staged);
    const int v0 = seg * kSegVecs + lane;
    float acc[kPerLane][V::kN];
    SumSlotRows<T, kGroup, kPerLane>(acc, __ballot_sync(0xffffffffu, src != nullptr),
                                     staged_mask, src, scale, v0, vecs);
    // An output row is vecs vectors of T, or vecs * kN / 4 float4 when kOutF32.
    int4* dst = p.out + static_cast<long long>(t) * vecs * (kOutF32 ? V::kN / 4 : 1);
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) {
      const int v = v0 + u * kWarp;
      if (v < vecs) StoreSum<T, kOutF32>(dst, v, acc[u]);
    }
  }
  PaddedSignal* own = OwnPaddedSignal(env);
  if (LastBlockDone(&own->block_counter[kCounterCombineReduce]) && threadIdx.x == 0) {
    own->seq[kKindCombine] = seq;
  }
}

template <typename T, bool kOutF32>
cudaError_t LaunchReduce(const CombineParams& p, cudaStream_t stream) {
  CombineReduceKernel<T, kOutF32><<<p.shape.num_sms, kReduceThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Bytes of PairStarts' shared memory: one int per (local expert, source) pair, and the total.
size_t StartsBytes(const CallShape& shape, int num_ranks) {
  return sizeof(int) * (static_cast<size_t>(shape.experts_local) * shape.segments * num_ranks + 1);
}

}  // namespace

cudaError_t LaunchDispatch(const DispatchArgs& a, cudaStream_t stream) {
  if (a.env.map.padded_max_tokens <= 0) return cudaErrorInvalidValue;
  DispatchParams p{a.env, a.shape, static_cast<const int4*>(a.x), a.x_scales, a.ids,
                   a.slot_values, a.sources, static_cast<int4*>(a.out_x), a.out_values,
                   a.out_scales, a.recv_counts, a.group_sizes, a.num_dropped, a.slot_expert,
                   a.slot_pos};
  DispatchSendKernel<<<a.shape.num_sms, kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  DispatchRecvKernel<<<a.shape.num_sms, kThreads, StartsBytes(a.shape, a.env.num_ranks),
                       stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchCombine(const CombineArgs& a, cudaStream_t stream) {
  if (a.env.map.padded_max_tokens <= 0) return cudaErrorInvalidValue;
  CombineParams p{a.env, a.shape, static_cast<const int4*>(a.rows), a.row_scale, a.row_values,
                  a.recv_counts, a.slot_expert, a.slot_pos, a.sources,
                  static_cast<int4*>(a.out), a.slot_values};
  // Alone there is nothing to send back (the reduce reads our own rows in place: we forward
  // every source) and no flag to raise: the reduce kernel alone makes the call.
  if (a.env.num_ranks > 1) {
    CombineSendKernel<<<a.shape.num_sms, kThreads, StartsBytes(a.shape, a.env.num_ranks),
                        stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return WithReduceTypes(a.elem, a.out_f32, [&](auto elem, auto out_f32) {
    return LaunchReduce<decltype(elem), decltype(out_f32)::value>(p, stream);
  });
}

}  // namespace padded
}  // namespace jax_ep
