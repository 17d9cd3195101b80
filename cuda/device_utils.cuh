// Device-side building blocks: views into the communication buffers, system-scope flags with
// timeouts, and 16-byte row copies.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/buffer_map.h"

namespace jax_ep {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T* At(const CommEnv& env, int r, size_t offset) {
  return reinterpret_cast<T*>(env.base[r] + offset);
}

__device__ __forceinline__ SignalArea* Signal(const CommEnv& env, int r) {
  return At<SignalArea>(env, r, env.map.signal);
}

__device__ __forceinline__ unsigned long long GlobalTimerNs() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned long long LoadAcquireSys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void StoreReleaseSys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// This call's sequence number (advanced by the call's first kernel).
__device__ __forceinline__ unsigned long long CurrentSeq(const CommEnv& env) {
  return *reinterpret_cast<volatile unsigned long long*>(&Signal(env, env.rank)->seq);
}

__device__ __forceinline__ bool Poisoned(const CommEnv& env) {
  return *reinterpret_cast<volatile unsigned long long*>(&Signal(env, env.rank)->poisoned) != 0;
}

// Marks the group dead and leaves the first error for the host. Every later wait returns at
// once, so a missing peer costs one timeout, not one per kernel.
__device__ inline void ReportTimeout(const CommEnv& env, int32_t phase, int peer,
                                     unsigned long long seq) {
  SignalArea* me = Signal(env, env.rank);
  if (atomicCAS(&me->poisoned, 0ull, 1ull) == 0ull) {
    volatile ErrorRecord* rec = env.error;
    rec->phase = phase;
    rec->peer = peer;
    rec->rank = env.rank;
    rec->seq = seq;
    __threadfence_system();
    rec->code = 1;
    __threadfence_system();
  }
}

// Waits until *flag >= seq. Returns false on timeout or when the group is already poisoned.
__device__ inline bool WaitFlag(const CommEnv& env, const unsigned long long* flag,
                                unsigned long long seq, int32_t phase, int peer) {
  if (LoadAcquireSys(flag) >= seq) return true;
  const unsigned long long start = GlobalTimerNs();
  while (LoadAcquireSys(flag) < seq) {
    if (Poisoned(env)) return false;
    if (GlobalTimerNs() - start > env.timeout_ns) {
      ReportTimeout(env, phase, peer, seq);
      return false;
    }
    __nanosleep(128);
  }
  return true;
}

// Threads 0..N-1 of the block each wait for one peer's flag (flags[s] >= seq); the whole block
// returns whether all arrived.
__device__ inline bool BlockWaitPeers(const CommEnv& env, const unsigned long long* flags,
                                      unsigned long long seq, int32_t phase) {
  __shared__ int ok;
  if (threadIdx.x == 0) ok = 1;
  __syncthreads();
  const int s = threadIdx.x;
  if (s < env.num_ranks && s != env.rank) {
    if (!WaitFlag(env, &flags[s], seq, phase, s)) atomicExch(&ok, 0);
  }
  __syncthreads();
  const bool all = ok != 0 && !Poisoned(env);
  __syncthreads();
  return all;
}

// Sets every peer's flag for us (flag_of(peer) = seq) once all of the block's writes are
// visible system-wide: the barrier orders them before thread 0's fence, and each flag store is a
// release. One fence per block, not per thread: system-scope fences are expensive.
template <typename FlagOf>
__device__ inline void BlockSignalPeers(const CommEnv& env, unsigned long long seq, FlagOf flag_of) {
  if (env.num_ranks == 1) return;
  __syncthreads();
  if (threadIdx.x == 0) __threadfence_system();
  __syncthreads();
  const int d = threadIdx.x;
  if (d < env.num_ranks && d != env.rank) StoreReleaseSys(flag_of(d), seq);
}

// The "last block" pattern: every block calls this once after its writes; the block that
// finishes last gets true (and resets the counter for the next call). Each block's thread 0
// fences after the barrier, so the counter's chain of increments releases every block's writes.
__device__ inline bool LastBlockDone(unsigned int* counter) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    const unsigned int prev = atomicAdd(counter, 1u);
    last = prev == gridDim.x - 1;
    if (last) {
      *counter = 0;
      __threadfence_system();
    }
  }
  __syncthreads();
  return last != 0;
}

// Copies 32-vector units [unit_begin, unit_end) of a row (unit u = vectors u * 32 .. u * 32 + 31,
// one a lane), kInFlight loads a lane issued before their stores. Work handed out per (row,
// piece) spreads a few long rows over every warp. kFromPeer: loads through L2 (ld.global.cg),
// for rows another rank wrote.
template <bool kFromPeer, int kInFlight = 8>
__device__ __forceinline__ void WarpCopyUnits(int4* __restrict__ dst, const int4* __restrict__ src,
                                              int unit_begin, int unit_end, int vecs, int lane) {
  for (int u0 = unit_begin; u0 < unit_end; u0 += kInFlight) {
    int4 chunk[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int v = (u0 + u) * kWarp + lane;
      if (u0 + u < unit_end && v < vecs) chunk[u] = kFromPeer ? __ldcg(src + v) : src[v];
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int v = (u0 + u) * kWarp + lane;
      if (u0 + u < unit_end && v < vecs) dst[v] = chunk[u];
    }
  }
}

__device__ __forceinline__ void WarpZeroRow(int4* __restrict__ dst, int vecs, int lane) {
  const int4 z = make_int4(0, 0, 0, 0);
  for (int v = lane; v < vecs; v += kWarp) dst[v] = z;
}

// Work is handed out per (token, piece of its row). A token's routing costs a few dependent
// loads, so a piece should be long; but with few tokens the pieces must be many to keep every
// warp busy. PiecesPerToken splits rows of `units` 32-vector units (one vector per lane) so
// there are about two pieces per warp of the grid.
__device__ __forceinline__ int PiecesPerToken(int tokens, int units) {
  const int warps = gridDim.x * blockDim.x / kWarp;
  const int want = tokens > 0 ? (2 * warps + tokens - 1) / tokens : 1;
  return want < 1 ? 1 : (want > units ? units : want);
}

__device__ __forceinline__ int GlobalWarp() { return (blockIdx.x * blockDim.x + threadIdx.x) / kWarp; }
__device__ __forceinline__ int NumWarps() { return gridDim.x * blockDim.x / kWarp; }
__device__ __forceinline__ int Lane() { return threadIdx.x % kWarp; }

}  // namespace jax_ep
