// The routing of docs/contract.md ("Row order and the routing math") on the device, the same
// math as jax_ep/routing.py:
//   RoutingChunksKernel: per chunk of 256 slots, each slot's rank among earlier slots of the
//                        chunk with the same expert, and the chunk's per-expert histogram.
//   RoutingNotifyKernel: chunk bases and this rank's per-expert counts; the count exchange
//                        (each rank writes its counts into every peer's matrix row); then,
//                        from the full matrix, the row where this rank's slots of each expert
//                        start on their destination, and this rank's receive sizes.
#include <cub/block/block_scan.cuh>

#include "cuda/api.h"
#include "cuda/device_utils.cuh"

namespace jax_ep {
namespace routing {
namespace {

constexpr int kNotifyThreads = 1024;

// Up to this many chunks (kRoutingChunk slots each), chunk bases are scanned serially per expert.
constexpr int kSerialScanChunks = 8;

// The routing of one chunk of kRoutingChunk slots, by a group of kRoutingChunk threads (`tid` is
// the thread's index in the group, its slot in the chunk). warp_counts: the group's shared
// scratch [kRoutingChunk / 32][E]. Every thread of the block must call this the same number of
// times: it synchronises the block. Returns, to every thread, how many ids the block's chunks
// of this call hold outside [-1, E) (counted as -1, reported as num_invalid).
__device__ inline int ChunkRouting(const int32_t* __restrict__ topk_idx, int num_slots, int e_all,
                                   int chunk, int num_chunks, int tid,
                                   int32_t* __restrict__ warp_counts,
                                   int32_t* __restrict__ local_rank,
                                   int32_t* __restrict__ chunk_hist) {
  constexpr int kWarps = kRoutingChunk / kWarp;
  for (int i = tid; i < kWarps * e_all; i += kRoutingChunk) warp_counts[i] = 0;
  __syncthreads();

  const int f = chunk * kRoutingChunk + tid;
  int e = e_all;  // the "unrouted" key: ids outside [0, E) count as -1
  bool invalid = false;
  if (chunk < num_chunks && f < num_slots) {
    const int v = topk_idx[f];
    if (v >= 0 && v < e_all) e = v;
    invalid = v < -1 || v >= e_all;
  }
  const int lane = Lane(), warp = tid / kWarp;
  const unsigned same = __match_any_sync(0xffffffffu, e);
  const int rank_in_warp = __popc(same & ((1u << lane) - 1u));
  if (rank_in_warp == 0 && e < e_all) warp_counts[warp * e_all + e] = __popc(same);
  const int block_invalid = __syncthreads_count(invalid);

  if (e < e_all) {
    int r = rank_in_warp;
    for (int w = 0; w < warp; ++w) r += warp_counts[w * e_all + e];
    local_rank[f] = r;
  }
  if (chunk < num_chunks) {
    for (int i = tid; i < e_all; i += kRoutingChunk) {
      int s = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += warp_counts[w * e_all + i];
      chunk_hist[static_cast<size_t>(i) * num_chunks + chunk] = s;  // expert-major [E][chunks]
    }
  }
  return block_invalid;
}

__global__ void __launch_bounds__(kRoutingChunk)
    RoutingChunksKernel(const int32_t* __restrict__ topk_idx, int num_slots, int num_experts,
                        int32_t* __restrict__ local_rank, int32_t* __restrict__ chunk_hist,
                        unsigned int* __restrict__ invalid_slots) {
  extern __shared__ int32_t warp_counts[];  // [kRoutingChunk / 32][E]
  const int invalid = ChunkRouting(topk_idx, num_slots, num_experts, blockIdx.x, gridDim.x,
                                   threadIdx.x, warp_counts, local_rank, chunk_hist);
  if (threadIdx.x == 0 && invalid) atomicAdd(invalid_slots, static_cast<unsigned int>(invalid));
}

__global__ void __launch_bounds__(kNotifyThreads)
    RoutingNotifyKernel(CommEnv env, const int32_t* __restrict__ fused_topk_idx, int num_slots,
                        int num_chunks, int num_experts, int experts_local,
                        long long capacity, int32_t* __restrict__ group_sizes,
                        int32_t* __restrict__ num_dropped, int32_t* __restrict__ num_recv,
                        int32_t* __restrict__ num_invalid) {
  using Scan = cub::BlockScan<int, kNotifyThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ unsigned long long seq_shared;
  extern __shared__ int32_t smem[];
  const int e_all = num_experts;
  int32_t* total = smem;              // [E] my counts, then totals over sources
  int32_t* below = smem + e_all;      // [E] slots of lower-ranked sources
  int32_t* excl = smem + 2 * e_all;   // [E] exclusive scan of totals over all experts

  SignalArea* me = Signal(env, env.rank);
  if (threadIdx.x == 0) seq_shared = ++me->seq;
  __syncthreads();
  const unsigned long long seq = seq_shared;
  const BufferMap& L = env.map;
  const int32_t* hist = At<int32_t>(env, env.rank, L.chunk_hist);
  int32_t* chunk_base = At<int32_t>(env, env.rank, L.chunk_base);

  if (fused_topk_idx) {
    // Few chunks: the chunk pass runs here, kNotifyThreads / kRoutingChunk chunks at a time, in
    // the shared memory past the notify arrays, instead of in a kernel launch of its own.
    constexpr int kGroups = kNotifyThreads / kRoutingChunk;
    const int group = threadIdx.x / kRoutingChunk;
    int32_t* warp_counts = smem + 3 * e_all + group * (kRoutingChunk / kWarp) * e_all;
    int invalid = 0;
    for (int c0 = 0; c0 < num_chunks; c0 += kGroups) {
      invalid += ChunkRouting(fused_topk_idx, num_slots, e_all, c0 + group, num_chunks,
                  threadIdx.x % kRoutingChunk, warp_counts,
                  At<int32_t>(env, env.rank, L.local_rank), At<int32_t>(env, env.rank, L.chunk_hist));
      __syncthreads();  // the groups' shared scratch is reused by the next round
    }
    if (threadIdx.x == 0) *num_invalid = invalid;
  } else if (threadIdx.x == 0) {
    // The chunk kernel before us counted them; reset for the next call.
    *num_invalid = static_cast<int32_t>(me->invalid_slots);
    me->invalid_slots = 0;
  }

  // Chunk bases: a running sum over the chunks of each expert. hist and chunk_base are
  // expert-major [E][chunks], so a warp reads 32 chunks of an expert in one transaction; each
  // warp takes kScanExperts experts at a time and issues all their loads (up to kScanTiles * 32
  // chunks each) before scanning, to keep the dependent round trips few.
  if (num_chunks <= kSerialScanChunks) {
    // Few chunks (decode sizes): a thread per expert walks them; its loads are independent, so
    // this is one round trip, where the warp scans below would be a chain of shuffles.
    for (int e = threadIdx.x; e < e_all; e += blockDim.x) {
      int v[kSerialScanChunks];
#pragma unroll
      for (int b = 0; b < kSerialScanChunks; ++b) {
        v[b] = b < num_chunks ? hist[static_cast<size_t>(e) * num_chunks + b] : 0;
      }
      int run = 0;
#pragma unroll
      for (int b = 0; b < kSerialScanChunks; ++b) {
        if (b < num_chunks) chunk_base[static_cast<size_t>(e) * num_chunks + b] = run;
        run += v[b];
      }
      total[e] = run;
    }
  } else {
    constexpr int kScanExperts = 4, kScanTiles = 4;
    const int lane = Lane();
    const int warps = blockDim.x / kWarp;
    for (int e0 = (threadIdx.x / kWarp) * kScanExperts; e0 < e_all; e0 += warps * kScanExperts) {
      int carry[kScanExperts] = {};
      for (int b0 = 0; b0 < num_chunks; b0 += kScanTiles * kWarp) {
        int v[kScanExperts][kScanTiles];
#pragma unroll
        for (int i = 0; i < kScanExperts; ++i)
#pragma unroll
          for (int tt = 0; tt < kScanTiles; ++tt) {
            const int e = e0 + i, b = b0 + tt * kWarp + lane;
            v[i][tt] = e < e_all && b < num_chunks ? hist[static_cast<size_t>(e) * num_chunks + b] : 0;
          }
#pragma unroll
        for (int i = 0; i < kScanExperts; ++i)
#pragma unroll
          for (int tt = 0; tt < kScanTiles; ++tt) {
            int incl = v[i][tt];
#pragma unroll
            for (int o = 1; o < kWarp; o <<= 1) {
              const int up = __shfl_up_sync(0xffffffffu, incl, o);
              if (lane >= o) incl += up;
            }
            const int e = e0 + i, b = b0 + tt * kWarp + lane;
            if (e < e_all && b < num_chunks) {
              chunk_base[static_cast<size_t>(e) * num_chunks + b] = carry[i] + incl - v[i][tt];
            }
            carry[i] += __shfl_sync(0xffffffffu, incl, kWarp - 1);
          }
      }
#pragma unroll
      for (int i = 0; i < kScanExperts; ++i) {
        if (lane == 0 && e0 + i < e_all) total[e0 + i] = carry[i];
      }
    }
  }
  __syncthreads();

  // Count exchange: row `rank` of every rank's matrix (ours included).
  for (int i = threadIdx.x; i < env.num_ranks * e_all; i += blockDim.x) {
    const int d = i / e_all, e = i % e_all;
    At<int32_t>(env, d, L.counts)[env.rank * e_all + e] = total[e];
  }
  BlockSignalPeers(env, seq, [&](int d) { return &Signal(env, d)->notify[env.rank]; });
  const bool ok = BlockWaitPeers(env, me->notify, seq, kPhaseDispatchNotify);
  if (!ok) {
    for (int l = threadIdx.x; l < experts_local; l += blockDim.x) group_sizes[l] = 0;
    if (threadIdx.x == 0) *num_dropped = *num_recv = 0;
    return;
  }

  const int32_t* matrix = At<int32_t>(env, env.rank, L.counts);
  for (int e = threadIdx.x; e < e_all; e += blockDim.x) {
    int counts[kMaxRanks];
#pragma unroll
    for (int s = 0; s < kMaxRanks; ++s) counts[s] = s < env.num_ranks ? __ldcg(&matrix[s * e_all + e]) : 0;
    int tot = 0, low = 0;
#pragma unroll
    for (int s = 0; s < kMaxRanks; ++s) {
      tot += counts[s];
      if (s < env.rank) low += counts[s];
    }
    total[e] = tot;
    below[e] = low;
  }
  __syncthreads();
  int carry = 0;
  for (int first = 0; first < e_all; first += blockDim.x) {
    const int e = first + threadIdx.x;
    int ex, tile_sum;
    Scan(scan_storage).ExclusiveSum(e < e_all ? total[e] : 0, ex, tile_sum);
    if (e < e_all) excl[e] = carry + ex;
    carry += tile_sum;
    __syncthreads();
  }

  // Rows are expert-major on each destination: expert l of rank d starts after the experts of
  // d below l, and our slots follow those of lower-ranked sources.
  int32_t* dest_base = At<int32_t>(env, env.rank, L.dest_base);
  for (int e = threadIdx.x; e < e_all; e += blockDim.x) {
    const int start = excl[e] - excl[(e / experts_local) * experts_local];
    dest_base[e] = start + below[e];
  }
  const int mine = env.rank * experts_local;
  for (int l = threadIdx.x; l < experts_local; l += blockDim.x) {
    const long long start = excl[mine + l] - excl[mine];
    const long long room = capacity - start;
    const long long t = total[mine + l];
    group_sizes[l] = static_cast<int32_t>(room <= 0 ? 0 : (room < t ? room : t));
  }
  if (threadIdx.x == 0) {
    const int last = mine + experts_local - 1;
    const long long arrived = static_cast<long long>(excl[last]) + total[last] - excl[mine];
    const long long kept = arrived < capacity ? arrived : capacity;
    *num_recv = static_cast<int32_t>(kept);
    *num_dropped = static_cast<int32_t>(arrived - kept);
  }
}

size_t ChunkSmem(int num_experts) { return sizeof(int32_t) * (kRoutingChunk / kWarp) * num_experts; }
size_t NotifySmem(int num_experts) { return sizeof(int32_t) * 3 * num_experts; }
// The notify kernel with the chunk pass fused in: its arrays plus one chunk scratch per group.
size_t FusedNotifySmem(int num_experts) {
  return NotifySmem(num_experts) + (kNotifyThreads / kRoutingChunk) * ChunkSmem(num_experts);
}
constexpr size_t kFusedSmemLimit = 64 * 1024;  // E up to 455: decode-sized MoEs
bool CanFuse(int chunks, int num_experts) {
  return chunks <= kSerialScanChunks && FusedNotifySmem(num_experts) <= kFusedSmemLimit;
}

}  // namespace

size_t RoutingSmemBytes(int num_experts) {
  const size_t notify = CanFuse(1, num_experts) ? FusedNotifySmem(num_experts) : NotifySmem(num_experts);
  return ChunkSmem(num_experts) > notify ? ChunkSmem(num_experts) : notify;
}

// The limits are function attributes, shared by every group on the device: they are set to what
// the largest supported E needs (clamped to the device's opt-in maximum), never to one group's E,
// so creating a group with fewer experts cannot lower the limit below what an older group's
// launches use. A group whose E needs more than the device allows is refused at creation
// (RoutingSmemBytes against cudaDevAttrMaxSharedMemoryPerBlockOptin).
cudaError_t PrepareRoutingKernels() {
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  const size_t cap = static_cast<size_t>(optin);
  const size_t chunk = ChunkSmem(kMaxExperts) < cap ? ChunkSmem(kMaxExperts) : cap;
  const size_t notify_need =
      kFusedSmemLimit > NotifySmem(kMaxExperts) ? kFusedSmemLimit : NotifySmem(kMaxExperts);
  const size_t notify = notify_need < cap ? notify_need : cap;
  err = cudaFuncSetAttribute(RoutingChunksKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(chunk));
  if (err != cudaSuccess) return err;
  return cudaFuncSetAttribute(RoutingNotifyKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(notify));
}

cudaError_t LaunchRoutingAndNotify(const CommEnv& env, const CallShape& shape,
                                   const int32_t* topk_idx, int32_t* group_sizes,
                                   int32_t* num_dropped, int32_t* num_recv, int32_t* num_invalid,
                                   cudaStream_t stream) {
  const int num_experts = shape.num_experts;
  const int slots = shape.tokens * shape.top_k;
  const int chunks = (slots + kRoutingChunk - 1) / kRoutingChunk;
  const BufferMap& L = env.map;
  const bool fuse = chunks > 0 && CanFuse(chunks, num_experts);
  if (chunks > 0 && !fuse) {
    RoutingChunksKernel<<<chunks, kRoutingChunk, ChunkSmem(num_experts), stream>>>(
        topk_idx, slots, num_experts, reinterpret_cast<int32_t*>(env.base[env.rank] + L.local_rank),
        reinterpret_cast<int32_t*>(env.base[env.rank] + L.chunk_hist),
        &reinterpret_cast<SignalArea*>(env.base[env.rank] + L.signal)->invalid_slots);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  RoutingNotifyKernel<<<1, kNotifyThreads,
                        fuse ? FusedNotifySmem(num_experts) : NotifySmem(num_experts), stream>>>(
      env, fuse ? topk_idx : nullptr, slots, chunks, num_experts, shape.experts_local,
      shape.capacity, group_sizes, num_dropped, num_recv, num_invalid);
  return cudaGetLastError();
}

}  // namespace routing
}  // namespace jax_ep
