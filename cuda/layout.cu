// The layout of DESIGN.md on the device (the same math as jax_ep/layout.py):
//   LayoutChunksKernel:   per chunk of 256 slots, each slot's rank among earlier slots of the
//                         chunk with the same expert, and the chunk's per-expert histogram.
//   DispatchNotifyKernel: chunk bases and this rank's per-expert counts; the count exchange
//                         (each rank writes its counts into every peer's matrix row); then,
//                         from the full matrix, the row where this rank's slots of each expert
//                         start on their destination, and this rank's receive sizes.
#include <cub/block/block_scan.cuh>

#include "cuda/device_utils.cuh"
#include "cuda/layout_kernels.cuh"

namespace jax_ep {

__global__ void __launch_bounds__(kLayoutChunk)
    LayoutChunksKernel(const int32_t* __restrict__ topk_idx, int num_slots, int num_experts,
                       int32_t* __restrict__ local_rank, int32_t* __restrict__ chunk_hist) {
  constexpr int kWarps = kLayoutChunk / kWarp;
  extern __shared__ int32_t warp_counts[];  // [kWarps][E]
  const int e_all = num_experts;
  for (int i = threadIdx.x; i < kWarps * e_all; i += blockDim.x) warp_counts[i] = 0;
  __syncthreads();

  const int f = blockIdx.x * kLayoutChunk + threadIdx.x;
  int e = e_all;  // the "unrouted" key: ids outside [0, E) count as -1
  if (f < num_slots) {
    const int v = topk_idx[f];
    if (v >= 0 && v < e_all) e = v;
  }
  const int lane = Lane(), warp = threadIdx.x / kWarp;
  const unsigned same = __match_any_sync(0xffffffffu, e);
  const int rank_in_warp = __popc(same & ((1u << lane) - 1u));
  if (rank_in_warp == 0 && e < e_all) warp_counts[warp * e_all + e] = __popc(same);
  __syncthreads();

  if (f < num_slots && e < e_all) {
    int r = rank_in_warp;
    for (int w = 0; w < warp; ++w) r += warp_counts[w * e_all + e];
    local_rank[f] = r;
  }
  for (int i = threadIdx.x; i < e_all; i += blockDim.x) {
    int s = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += warp_counts[w * e_all + i];
    chunk_hist[static_cast<size_t>(blockIdx.x) * e_all + i] = s;
  }
}

__global__ void __launch_bounds__(kNotifyThreads)
    DispatchNotifyKernel(CommEnv env, int num_chunks, int num_experts, int experts_local,
                         long long capacity, int32_t* __restrict__ group_sizes,
                         int32_t* __restrict__ num_dropped, int32_t* __restrict__ num_recv) {
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
  const CommLayout& L = env.layout;
  const int32_t* hist = At<int32_t>(env, env.rank, L.chunk_hist);
  int32_t* chunk_base = At<int32_t>(env, env.rank, L.chunk_base);

  for (int e = threadIdx.x; e < e_all; e += blockDim.x) {
    int run = 0;
    for (int b = 0; b < num_chunks; ++b) {
      chunk_base[static_cast<size_t>(b) * e_all + e] = run;
      run += hist[static_cast<size_t>(b) * e_all + e];
    }
    total[e] = run;
  }
  __syncthreads();

  // Count exchange: row `rank` of every rank's matrix (ours included).
  for (int i = threadIdx.x; i < env.num_ranks * e_all; i += blockDim.x) {
    const int d = i / e_all, e = i % e_all;
    At<int32_t>(env, d, L.counts)[env.rank * e_all + e] = total[e];
  }
  __threadfence_system();
  __syncthreads();
  BlockSignalPeers(env, seq, [&](int d) { return &Signal(env, d)->notify[env.rank]; });
  const bool ok = BlockWaitPeers(env, me->notify, seq, kPhaseDispatchNotify);
  if (!ok) {
    for (int l = threadIdx.x; l < experts_local; l += blockDim.x) group_sizes[l] = 0;
    if (threadIdx.x == 0) *num_dropped = *num_recv = 0;
    return;
  }

  const int32_t* matrix = At<int32_t>(env, env.rank, L.counts);
  for (int e = threadIdx.x; e < e_all; e += blockDim.x) {
    int tot = 0, low = 0;
    for (int s = 0; s < env.num_ranks; ++s) {
      const int c = __ldcg(&matrix[s * e_all + e]);
      tot += c;
      if (s < env.rank) low += c;
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

}  // namespace jax_ep

namespace jax_ep {

namespace {
size_t ChunkSmem(int num_experts) { return sizeof(int32_t) * (kLayoutChunk / kWarp) * num_experts; }
size_t NotifySmem(int num_experts) { return sizeof(int32_t) * 3 * num_experts; }
}  // namespace

cudaError_t PrepareLayoutKernels(int num_experts) {
  cudaError_t err = cudaFuncSetAttribute(LayoutChunksKernel,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(ChunkSmem(num_experts)));
  if (err != cudaSuccess) return err;
  return cudaFuncSetAttribute(DispatchNotifyKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(NotifySmem(num_experts)));
}

cudaError_t LaunchLayoutAndNotify(const CommEnv& env, const int32_t* topk_idx, int tokens,
                                  int top_k, int num_experts, int experts_local,
                                  long long capacity, int32_t* group_sizes, int32_t* num_dropped,
                                  int32_t* num_recv, cudaStream_t stream) {
  const int slots = tokens * top_k;
  const int chunks = (slots + kLayoutChunk - 1) / kLayoutChunk;
  const CommLayout& L = env.layout;
  if (chunks > 0) {
    LayoutChunksKernel<<<chunks, kLayoutChunk, ChunkSmem(num_experts), stream>>>(
        topk_idx, slots, num_experts, reinterpret_cast<int32_t*>(env.base[env.rank] + L.local_rank),
        reinterpret_cast<int32_t*>(env.base[env.rank] + L.chunk_hist));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  DispatchNotifyKernel<<<1, kNotifyThreads, NotifySmem(num_experts), stream>>>(
      env, chunks, num_experts, experts_local, capacity, group_sizes, num_dropped, num_recv);
  return cudaGetLastError();
}

}  // namespace jax_ep
