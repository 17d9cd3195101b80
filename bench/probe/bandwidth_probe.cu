// What the hardware allows dispatch- and combine-shaped traffic on a given SM budget: a
// standalone probe (no JAX), timed with CUDA events, used to choose the kernels' structure for
// issue 16 (bench/RESULTS.md, "What the SM budget allows"). Each variant runs on S blocks (one
// per SM of the budget) and moves the bytes jax_ep's operation must move at world size 1:
//   fan-out (dispatch): each of T rows is read once and written to its k slot rows, which sit at
//                       a random permutation of the T*k output rows (as expert-major rows do);
//   fan-in (combine):   each output row is the float32 weighted sum of its k slot rows, read
//                       from that permutation, rounded to bf16.
// and, as ceilings, a plain copy, write-only and read-only passes, with ordinary 16-byte
// accesses (regs) and with the bulk copy engine (cp.async.bulk, "tma").
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 bench/probe/bandwidth_probe.cu -o probe
//   ./probe T H k sms,sms,... [name,name,...]   # e.g. ./probe 4096 7168 8 8,24,132 fan-in,copy
// (the optional last argument runs only the variants whose names hold one of its strings). It
// ends by checking the copy-engine variants' bytes against the ordinary ones'.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#define CHECK(x)                                                                           \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

constexpr int kWarp = 32;

__device__ __forceinline__ int GlobalWarp() { return (blockIdx.x * blockDim.x + threadIdx.x) / kWarp; }
__device__ __forceinline__ int NumWarps() { return gridDim.x * blockDim.x / kWarp; }

// ---- bulk copy engine helpers (sm_90) ------------------------------------------------------
__device__ __forceinline__ uint32_t Smem(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void BarInit(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(Smem(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void BarExpect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(Smem(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void BarWait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n}\n" ::"r"(Smem(bar)), "r"(parity) : "memory");
}
__device__ __forceinline__ void BulkLoad(void* dst_smem, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          Smem(dst_smem)), "l"(src), "r"(bytes), "r"(Smem(bar))
      : "memory");
}
__device__ __forceinline__ void BulkStore(void* dst, const void* src_smem, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(Smem(src_smem)),
               "r"(bytes) : "memory");
}
__device__ __forceinline__ void BulkCommit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void BulkWaitRead() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void BulkWaitAll() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
__device__ __forceinline__ void FenceProxyAsync() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// A warp's kStages buffers of stage_bytes in the block's dynamic shared memory, and its kStages
// mbarriers after every warp's buffers, initialised (arrival count 1) by its lane 0.
struct WarpStages {
  char* buf;
  uint64_t* bars;
};
template <int kStages>
__device__ WarpStages InitWarpStages(char* smem, long long stage_bytes) {
  const int warps = blockDim.x / kWarp, w = threadIdx.x / kWarp;
  const WarpStages st{smem + w * kStages * stage_bytes,
                      reinterpret_cast<uint64_t*>(smem + warps * kStages * stage_bytes) + w * kStages};
  if (threadIdx.x % kWarp == 0) {
    for (int s = 0; s < kStages; ++s) BarInit(&st.bars[s], 1);
    FenceProxyAsync();
  }
  __syncwarp();
  return st;
}

// How many of items_all items, handed out round-robin over the grid's warps (item GlobalWarp() +
// i * NumWarps() is this warp's i-th), are this warp's.
__device__ __forceinline__ long long WarpItemCount(long long items_all) {
  const long long first = GlobalWarp(), step = NumWarps();
  return first < items_all ? (items_all - first + step - 1) / step : 0;
}

// ---- ceilings -------------------------------------------------------------------------------
template <int kUnroll>
__global__ void CopyRegs(const int4* __restrict__ src, int4* __restrict__ dst, long long n) {
  const long long lanes = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long lane = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (long long base = lane; base < n; base += lanes * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * lanes < n) v[u] = src[base + u * lanes];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * lanes < n) dst[base + u * lanes] = v[u];
  }
}

__global__ void WriteRegs(int4* __restrict__ dst, long long n) {
  const long long lanes = static_cast<long long>(gridDim.x) * blockDim.x;
  const int4 z = make_int4(threadIdx.x, 1, 2, 3);
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += lanes) dst[i] = z;
}

template <int kUnroll>
__global__ void __launch_bounds__(1024) ReadRegs(const int4* __restrict__ src, long long n, int* sink) {
  const long long lanes = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long lane = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  int acc = 0;
  for (long long base = lane; base < n; base += lanes * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * lanes < n) v[u] = src[base + u * lanes];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc ^= v[u].x ^ v[u].w;
  }
  if (acc == 0x12345678) *sink = acc;
}

// Write-only through the copy engine: each warp's lane 0 stores one smem chunk over and over.
template <int kChunk>
__global__ void WriteTma(char* __restrict__ dst, long long bytes) {
  extern __shared__ __align__(128) char smem[];
  const int w = threadIdx.x / kWarp;
  char* buf = smem + w * kChunk;
  for (int i = threadIdx.x % kWarp * 16; i < kChunk; i += kWarp * 16) *reinterpret_cast<int4*>(buf + i) = make_int4(1, 2, 3, 4);
  FenceProxyAsync();
  __syncwarp();
  if (threadIdx.x % kWarp == 0) {
    int n = 0;
    for (long long off = static_cast<long long>(GlobalWarp()) * kChunk; off < bytes;
         off += static_cast<long long>(NumWarps()) * kChunk) {
      BulkStore(dst + off, buf, static_cast<uint32_t>(min(static_cast<long long>(kChunk), bytes - off)));
      BulkCommit();
      if (++n % 8 == 0) BulkWaitRead<4>();
    }
    BulkWaitAll();
  }
}

// Read-only through the copy engine: kStages chunks in flight per warp.
template <int kChunk, int kStages>
__global__ void ReadTma(const char* __restrict__ src, long long bytes, int* sink) {
  extern __shared__ __align__(128) char smem[];
  const auto [buf, bars] = InitWarpStages<kStages>(smem, kChunk);
  if (threadIdx.x % kWarp != 0) return;
  // Item i of the warp: chunk GlobalWarp() + i * NumWarps(), at byte first + i * step.
  const long long step = static_cast<long long>(NumWarps()) * kChunk;
  const long long first = static_cast<long long>(GlobalWarp()) * kChunk;
  const long long items = WarpItemCount((bytes + kChunk - 1) / kChunk);
  int acc = 0;
  for (long long i = 0; i < items + kStages - 1; ++i) {
    if (i < items) {  // issue item i
      const int s = i % kStages;
      const long long off = first + i * step;
      const uint32_t n = static_cast<uint32_t>(min(static_cast<long long>(kChunk), bytes - off));
      BarExpect(&bars[s], n);
      BulkLoad(buf + s * kChunk, src + off, n, &bars[s]);
    }
    const long long j = i - (kStages - 1);  // consume item j
    if (j >= 0) {
      const int s = j % kStages;
      BarWait(&bars[s], (j / kStages) & 1);
      acc ^= buf[s * kChunk];
    }
  }
  if (acc == 0x12345678) *sink = acc;
}

// ---- fan-out (dispatch) ---------------------------------------------------------------------
// jax_ep's send pass today: a warp per token, 8 vectors a lane loaded, then stored to each slot.
template <int kPerLane, int kThreads>
__global__ void __launch_bounds__(kThreads) FanoutRegs(const int4* __restrict__ x, int4* __restrict__ out, const int* __restrict__ dest_row,
                           int T, int k, int vecs) {
  const int lane = threadIdx.x % kWarp;
  for (int t = GlobalWarp(); t < T; t += NumWarps()) {
    const int row = lane < k ? dest_row[t * k + lane] : -1;
    const int4* src = x + static_cast<long long>(t) * vecs;
    for (int v0 = 0; v0 < vecs; v0 += kPerLane * kWarp) {
      int4 c[kPerLane];
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int v = v0 + u * kWarp + lane;
        if (v < vecs) c[u] = src[v];
      }
      for (int j = 0; j < k; ++j) {
        int4* dst = out + static_cast<long long>(__shfl_sync(0xffffffffu, row, j)) * vecs;
#pragma unroll
        for (int u = 0; u < kPerLane; ++u) {
          const int v = v0 + u * kWarp + lane;
          if (v < vecs) dst[v] = c[u];
        }
      }
    }
  }
}

// Through the copy engine: items (token, piece of kPiece bytes); lane 0 of each warp loads a
// piece into one of kStages shared buffers (kAhead items ahead) and stores it to the k slots.
template <int kPiece, int kStages, int kAhead>
__global__ void FanoutTma(const char* __restrict__ x, char* __restrict__ out, const int* __restrict__ dest_row,
                          int T, int k, int row_bytes) {
  static_assert(kAhead < kStages, "a buffer is reloaded only after its stores have read it");
  extern __shared__ __align__(128) char smem[];
  const auto [buf, bars] = InitWarpStages<kStages>(smem, kPiece);
  if (threadIdx.x % kWarp != 0) return;
  const int pieces = (row_bytes + kPiece - 1) / kPiece;
  const long long first = GlobalWarp(), step = NumWarps();
  const long long items = WarpItemCount(static_cast<long long>(T) * pieces);
  auto piece_bytes = [&](long long item) {
    const int piece = static_cast<int>(item % pieces);
    return static_cast<uint32_t>(min(kPiece, row_bytes - piece * kPiece));
  };
  for (long long i = 0; i < items + kAhead; ++i) {
    if (i < items) {
      // buffer i % kStages last held item i - kStages, whose stores are older than the
      // kStages - kAhead - 1 groups committed since
      if (i >= kStages) BulkWaitRead<kStages - kAhead - 1>();
      const long long item = first + i * step;
      const int s = i % kStages;
      const uint32_t n = piece_bytes(item);
      BarExpect(&bars[s], n);
      BulkLoad(buf + s * kPiece, x + (item / pieces) * row_bytes + (item % pieces) * kPiece, n, &bars[s]);
    }
    const long long j = i - kAhead;
    if (j >= 0) {
      const long long item = first + j * step;
      const int s = j % kStages;
      BarWait(&bars[s], (j / kStages) & 1);
      const long long t = item / pieces;
      const uint32_t n = piece_bytes(item);
      for (int q = 0; q < k; ++q) {
        BulkStore(out + static_cast<long long>(dest_row[t * k + q]) * row_bytes + (item % pieces) * kPiece,
                  buf + s * kPiece, n);
      }
      BulkCommit();
    }
  }
  BulkWaitAll();
}

// ---- fan-in (combine) -----------------------------------------------------------------------
__device__ __forceinline__ void AddBf16(float* acc, const int4& v, float w) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] += w * f.x;
    acc[2 * i + 1] += w * f.y;
  }
}
__device__ __forceinline__ int4 ToBf16(const float* acc) {
  int4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  return v;
}

// jax_ep's reduce today: a warp per token; kGroup slots x kPerLane vectors loaded, then added.
template <int kGroup, int kPerLane, int kThreads>
__global__ void __launch_bounds__(kThreads) FaninRegs(const int4* __restrict__ rows, const int* __restrict__ dest_row,
                          const float* __restrict__ weight, int4* __restrict__ out, int T, int k, int vecs) {
  const int lane = threadIdx.x % kWarp;
  for (int t = GlobalWarp(); t < T; t += NumWarps()) {
    const int row = lane < k ? dest_row[t * k + lane] : 0;
    const float wt = lane < k ? weight[t * k + lane] : 0.f;
    for (int v0 = lane; v0 < vecs; v0 += kPerLane * kWarp) {
      float acc[kPerLane][8] = {};
      for (int j0 = 0; j0 < k; j0 += kGroup) {
        int4 c[kGroup][kPerLane];
        float ws[kGroup];
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
          const int j = j0 + g < k ? j0 + g : k - 1;
          const int4* s = rows + static_cast<long long>(__shfl_sync(0xffffffffu, row, j)) * vecs;
          ws[g] = __shfl_sync(0xffffffffu, wt, j);
#pragma unroll
          for (int u = 0; u < kPerLane; ++u)
            if (v0 + u * kWarp < vecs && j0 + g < k) c[g][u] = s[v0 + u * kWarp];
        }
#pragma unroll
        for (int g = 0; g < kGroup; ++g)
#pragma unroll
          for (int u = 0; u < kPerLane; ++u)
            if (v0 + u * kWarp < vecs && j0 + g < k) AddBf16(acc[u], c[g][u], ws[g]);
      }
#pragma unroll
      for (int u = 0; u < kPerLane; ++u)
        if (v0 + u * kWarp < vecs) out[static_cast<long long>(t) * vecs + v0 + u * kWarp] = ToBf16(acc[u]);
    }
  }
}

// Through the copy engine: items (token, piece of kPiece bytes); lane 0 loads the k slot pieces
// of an item into one stage (kStages - 1 items ahead), the warp sums them from shared memory.
template <int kPiece, int kStages>
__global__ void FaninTma(const char* __restrict__ rows, const int* __restrict__ dest_row,
                         const float* __restrict__ weight, int4* __restrict__ out, int T, int k,
                         int row_bytes, int max_k) {
  extern __shared__ __align__(128) char smem[];
  const int lane = threadIdx.x % kWarp;
  const int stage_bytes = max_k * kPiece;
  const auto [buf, bars] = InitWarpStages<kStages>(smem, stage_bytes);
  const int pieces = (row_bytes + kPiece - 1) / kPiece;
  const long long first = GlobalWarp(), step = NumWarps();
  const long long items = WarpItemCount(static_cast<long long>(T) * pieces);
  constexpr int kAhead = kStages - 1;
  for (long long i = 0; i < items + kAhead; ++i) {
    if (i < items && lane == 0) {
      const long long item = first + i * step;
      const int s = i % kStages;
      const long long t = item / pieces;
      const int piece = static_cast<int>(item % pieces);
      const uint32_t n = static_cast<uint32_t>(min(kPiece, row_bytes - piece * kPiece));
      FenceProxyAsync();  // the warp's earlier reads of this buffer come before the refill
      BarExpect(&bars[s], n * k);
      for (int q = 0; q < k; ++q) {
        BulkLoad(buf + s * stage_bytes + q * kPiece,
                 rows + static_cast<long long>(dest_row[t * k + q]) * row_bytes + piece * kPiece, n, &bars[s]);
      }
    }
    const long long j = i - kAhead;
    if (j >= 0) {
      const long long item = first + j * step;
      const int s = j % kStages;
      const long long t = item / pieces;
      const int piece = static_cast<int>(item % pieces);
      const int nv = min(kPiece, row_bytes - piece * kPiece) / 16;
      const float wt = lane < k ? weight[t * k + lane] : 0.f;
      float wts[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) wts[q] = __shfl_sync(0xffffffffu, wt, q);
      BarWait(&bars[s], (j / kStages) & 1);
      for (int v = lane; v < nv; v += kWarp) {
        float acc[8] = {};
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          if (q < k) AddBf16(acc, *reinterpret_cast<const int4*>(buf + s * stage_bytes + q * kPiece + v * 16), wts[q]);
        }
        out[(t * row_bytes + piece * kPiece) / 16 + v] = ToBf16(acc);
      }
      __syncwarp();
    }
  }
}

// Read-only with the fan-in's access pattern (k scattered slot rows per token, a warp per token,
// kGroup x kPerLane loads in flight a lane) and no arithmetic: separates the pattern's cost from
// the reduction's.
template <int kGroup, int kPerLane, int kThreads>
__global__ void __launch_bounds__(kThreads) FaninReadOnly(const int4* __restrict__ rows, const int* __restrict__ dest_row,
                                                          int* sink, int T, int k, int vecs) {
  const int lane = threadIdx.x % kWarp;
  int x = 0;
  for (int t = GlobalWarp(); t < T; t += NumWarps()) {
    const int row = lane < k ? dest_row[t * k + lane] : 0;
    for (int v0 = lane; v0 < vecs; v0 += kPerLane * kWarp) {
      for (int j0 = 0; j0 < k; j0 += kGroup) {
        int4 c[kGroup][kPerLane];
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
          const int j = j0 + g < k ? j0 + g : k - 1;
          const int4* s = rows + static_cast<long long>(__shfl_sync(0xffffffffu, row, j)) * vecs;
#pragma unroll
          for (int u = 0; u < kPerLane; ++u)
            if (v0 + u * kWarp < vecs && j0 + g < k) c[g][u] = s[v0 + u * kWarp];
        }
#pragma unroll
        for (int g = 0; g < kGroup; ++g)
#pragma unroll
          for (int u = 0; u < kPerLane; ++u)
            if (v0 + u * kWarp < vecs && j0 + g < k) x ^= c[g][u].x ^ c[g][u].w;
      }
    }
  }
  if (x == 0x12345678) *sink = x;
}

// FanoutTma with the slot rows loaded by lanes 0..k-1 (in parallel with the piece's bulk load)
// and each slot's bulk store issued by its own lane (bulk groups are per thread).
template <int kPiece, int kStages>
__global__ void FanoutTma2(const char* __restrict__ x, char* __restrict__ out, const int* __restrict__ dest_row,
                           int T, int k, int row_bytes) {
  extern __shared__ __align__(128) char smem[];
  const int lane = threadIdx.x % kWarp;
  const auto [buf, bars] = InitWarpStages<kStages>(smem, kPiece);
  const int pieces = (row_bytes + kPiece - 1) / kPiece;
  const long long first = GlobalWarp(), step = NumWarps();
  const long long items = WarpItemCount(static_cast<long long>(T) * pieces);
  constexpr int kAhead = kStages - 1;
  int rows_of[kStages];  // lane q < k: slot q's row for the item in each stage
  for (long long i = 0; i < items + kAhead; ++i) {
    if (i < items) {
      const int s = i % kStages;
      const long long item = first + i * step;
      // This buffer's previous stores (item i - kStages) must have read it: each storing lane
      // waits until all its bulk groups have read shared memory (bulk groups are per thread).
      if (i >= kStages) BulkWaitRead<0>();
      __syncwarp();
      const long long t = item / pieces;
      const int piece = static_cast<int>(item % pieces);
      const uint32_t n = static_cast<uint32_t>(min(kPiece, row_bytes - piece * kPiece));
      const int r = lane < k ? dest_row[t * k + lane] : 0;
#pragma unroll
      for (int q = 0; q < kStages; ++q)
        if (q == s) rows_of[q] = r;
      if (lane == 0) {
        BarExpect(&bars[s], n);
        BulkLoad(buf + s * kPiece, x + t * row_bytes + piece * kPiece, n, &bars[s]);
      }
    }
    const long long j = i - kAhead;
    if (j >= 0) {
      const long long item = first + j * step;
      const int s = j % kStages;
      const int piece = static_cast<int>(item % pieces);
      const uint32_t n = static_cast<uint32_t>(min(kPiece, row_bytes - piece * kPiece));
      int r = 0;
#pragma unroll
      for (int q = 0; q < kStages; ++q)
        if (q == s) r = rows_of[q];
      BarWait(&bars[s], (j / kStages) & 1);
      if (lane < k) {
        BulkStore(out + static_cast<long long>(r) * row_bytes + piece * kPiece, buf + s * kPiece, n);
        BulkCommit();
      }
    }
  }
  BulkWaitAll();
}

// ---- driver ---------------------------------------------------------------------------------
struct Timer {
  cudaEvent_t a, b;
  Timer() { CHECK(cudaEventCreate(&a)); CHECK(cudaEventCreate(&b)); }
  float Time(const std::function<void()>& launch, int reps) {
    launch();
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      std::printf("  launch failed: %s\n", cudaGetErrorString(err));
      return -1.0f;
    }
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaEventRecord(a));
    for (int r = 0; r < reps; ++r) launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    CHECK(cudaGetLastError());
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    return ms * 1e3f / reps;
  }
};

template <typename K>
void SetSmem(K kernel, int bytes) {
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s T H k sms[,sms...]\n", argv[0]);
    return 2;
  }
  const int T = std::atoi(argv[1]), H = std::atoi(argv[2]), k = std::atoi(argv[3]);
  std::vector<int> budgets;
  for (char* p = std::strtok(argv[4], ","); p; p = std::strtok(nullptr, ",")) budgets.push_back(std::atoi(p));
  const int row_bytes = H * 2, vecs = row_bytes / 16;
  const long long slots = static_cast<long long>(T) * k;
  const long long in_bytes = static_cast<long long>(T) * row_bytes, rows_bytes = slots * row_bytes;
  const double must_move = static_cast<double>(in_bytes + rows_bytes);

  char *x, *rows, *out, *copy_dst;
  int *dest_row, *sink;
  float* weight;
  CHECK(cudaMalloc(&x, in_bytes));
  CHECK(cudaMalloc(&rows, rows_bytes));
  CHECK(cudaMalloc(&out, in_bytes));
  CHECK(cudaMalloc(&copy_dst, rows_bytes));
  CHECK(cudaMalloc(&dest_row, slots * sizeof(int)));
  CHECK(cudaMalloc(&weight, slots * sizeof(float)));
  CHECK(cudaMalloc(&sink, sizeof(int)));
  {
    std::vector<int> perm(slots);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), std::mt19937(0));
    CHECK(cudaMemcpy(dest_row, perm.data(), slots * sizeof(int), cudaMemcpyHostToDevice));
    std::vector<float> w(slots, 0.125f);
    CHECK(cudaMemcpy(weight, w.data(), slots * sizeof(float), cudaMemcpyHostToDevice));
    std::vector<uint16_t> hx(in_bytes / 2);
    std::mt19937 g(1);
    for (auto& v : hx) v = 0x3f80 + (g() & 0x7f);  // bf16 in [1, 2)
    CHECK(cudaMemcpy(x, hx.data(), in_bytes, cudaMemcpyHostToDevice));
    CHECK(cudaMemset(rows, 0, rows_bytes));
  }
  const int reps = 20;
  Timer timer;
  std::printf("T=%d H=%d k=%d: must-move %.1f MB (fan-out reads %.1f, writes %.1f)\n", T, H, k,
              must_move / 1e6, in_bytes / 1e6, rows_bytes / 1e6);
  std::printf("%-34s %5s %9s %8s\n", "variant", "SMs", "us", "TB/s");
  // argv[5]: run only the variants whose name holds one of these comma-separated strings.
  std::vector<std::string> filters;
  if (argc > 5) {
    std::string f = argv[5];
    for (size_t a = 0, b; a <= f.size(); a = b + 1) {
      b = f.find(',', a);
      if (b == std::string::npos) b = f.size();
      if (b > a) filters.push_back(f.substr(a, b - a));
    }
  }
  auto run = [&](const char* name, int sms, const std::function<void()>& launch, double bytes) {
    bool want = filters.empty();
    for (const auto& f : filters) want = want || std::string(name).find(f) != std::string::npos;
    if (!want) return;
    const float us = timer.Time(launch, reps);
    std::printf("%-34s %5d %9.1f %8.3f\n", name, sms, us, bytes / (us * 1e-6) / 1e12);
    std::fflush(stdout);
  };

  constexpr int kFoPiece = 4096, kFoStages = 4, kFoAhead = 2;
  constexpr int kFiPiece = 1024, kFiStages = 3;
  SetSmem(WriteTma<8192>, 16 * 8192);
  SetSmem(ReadTma<8192, 3>, 8 * 3 * 8192 + 8 * 3 * 8);
  SetSmem(FanoutTma<kFoPiece, kFoStages, kFoAhead>, 8 * kFoStages * kFoPiece + 8 * kFoStages * 8);
  SetSmem(FanoutTma<kFoPiece, kFoStages, kFoAhead>, 12 * kFoStages * kFoPiece + 12 * kFoStages * 8);
  SetSmem(FaninTma<kFiPiece, kFiStages>, 8 * kFiStages * k * kFiPiece + 8 * kFiStages * 8);
  SetSmem(FaninTma<512, 3>, 16 * 3 * k * 512 + 16 * 3 * 8);

  for (int sms : budgets) {
    const long long copy_vecs = static_cast<long long>(must_move / 2 / 16);
    run("copy regs x8 (1024 thr)", sms, [&] {
      CopyRegs<8><<<sms, 1024>>>(reinterpret_cast<int4*>(rows), reinterpret_cast<int4*>(copy_dst), copy_vecs);
    }, must_move);
    run("copy regs x16 (512 thr)", sms, [&] {
      CopyRegs<16><<<sms, 512>>>(reinterpret_cast<int4*>(rows), reinterpret_cast<int4*>(copy_dst), copy_vecs);
    }, must_move);
    run("write-only regs (1024 thr)", sms, [&] {
      WriteRegs<<<sms, 1024>>>(reinterpret_cast<int4*>(rows), rows_bytes / 16);
    }, rows_bytes);
    run("write-only tma 8K x16 warps", sms, [&] {
      WriteTma<8192><<<sms, 16 * 32, 16 * 8192>>>(rows, rows_bytes);
    }, rows_bytes);
    run("read-only regs x8 (1024 thr)", sms, [&] {
      ReadRegs<8><<<sms, 1024>>>(reinterpret_cast<int4*>(rows), rows_bytes / 16, sink);
    }, rows_bytes);
    run("read-only tma 8K x3 x8 warps", sms, [&] {
      ReadTma<8192, 3><<<sms, 8 * 32, 8 * 3 * 8192 + 8 * 3 * 8>>>(rows, rows_bytes, sink);
    }, rows_bytes);
    run("fan-out regs x8 (1024 thr, today)", sms, [&] {
      FanoutRegs<8, 1024><<<sms, 1024>>>(reinterpret_cast<int4*>(x), reinterpret_cast<int4*>(rows), dest_row, T, k, vecs);
    }, must_move);
    run("fan-out regs x4 (1024 thr)", sms, [&] {
      FanoutRegs<4, 1024><<<sms, 1024>>>(reinterpret_cast<int4*>(x), reinterpret_cast<int4*>(rows), dest_row, T, k, vecs);
    }, must_move);
    run("fan-out regs x16 (512 thr)", sms, [&] {
      FanoutRegs<16, 512><<<sms, 512>>>(reinterpret_cast<int4*>(x), reinterpret_cast<int4*>(rows), dest_row, T, k, vecs);
    }, must_move);
    run("fan-out tma 4K s4 a2 x8 warps", sms, [&] {
      FanoutTma<kFoPiece, kFoStages, kFoAhead><<<sms, 8 * 32, 8 * kFoStages * kFoPiece + 8 * kFoStages * 8>>>(
          x, rows, dest_row, T, k, row_bytes);
    }, must_move);
    run("fan-out tma 4K s4 a2 x12 warps", sms, [&] {
      FanoutTma<kFoPiece, kFoStages, kFoAhead><<<sms, 12 * 32, 12 * kFoStages * kFoPiece + 12 * kFoStages * 8>>>(
          x, rows, dest_row, T, k, row_bytes);
    }, must_move);
    const float* wt = weight;
    int4* o = reinterpret_cast<int4*>(out);
    const int4* r = reinterpret_cast<const int4*>(rows);
    run("fan-in regs 4x2 (768 thr, today)", sms, [&] {
      FaninRegs<4, 2, 768><<<sms, 768>>>(r, dest_row, wt, o, T, k, vecs);
    }, must_move);
    run("fan-in regs 2x4 (512 thr)", sms, [&] {
      FaninRegs<2, 4, 512><<<sms, 512>>>(r, dest_row, wt, o, T, k, vecs);
    }, must_move);
    run("fan-in regs 4x4 (512 thr)", sms, [&] {
      FaninRegs<4, 4, 512><<<sms, 512>>>(r, dest_row, wt, o, T, k, vecs);
    }, must_move);
    run("fan-in regs 8x2 (512 thr)", sms, [&] {
      FaninRegs<8, 2, 512><<<sms, 512>>>(r, dest_row, wt, o, T, k, vecs);
    }, must_move);
    run("fan-in tma 1K s3 x8 warps", sms, [&] {
      FaninTma<kFiPiece, kFiStages><<<sms, 8 * 32, 8 * kFiStages * k * kFiPiece + 8 * kFiStages * 8>>>(
          rows, dest_row, wt, o, T, k, row_bytes, k);
    }, must_move);
    run("fan-in tma 512 s3 x16 warps", sms, [&] {
      FaninTma<512, 3><<<sms, 16 * 32, 16 * 3 * k * 512 + 16 * 3 * 8>>>(rows, dest_row, wt, o, T, k, row_bytes, k);
    }, must_move);
    run("fan-in read-only 4x4 (512 thr)", sms, [&] {
      FaninReadOnly<4, 4, 512><<<sms, 512>>>(r, dest_row, sink, T, k, vecs);
    }, rows_bytes);
    run("fan-in read-only 2x4 (1024 thr)", sms, [&] {
      FaninReadOnly<2, 4, 1024><<<sms, 1024>>>(r, dest_row, sink, T, k, vecs);
    }, rows_bytes);
    auto fo2 = [&](const char* name, auto kernel, int piece, int stages, int warps) {
      const int smem = warps * stages * piece + warps * stages * 8;
      SetSmem(kernel, smem);
      run(name, sms, [&] {
        kernel<<<sms, warps * 32, smem>>>(x, rows, dest_row, T, k, row_bytes);
      }, must_move);
    };
    fo2("fan-out tma2 4K s3 x16 warps", FanoutTma2<4096, 3>, 4096, 3, 16);
    fo2("fan-out tma2 2K s3 x32 warps", FanoutTma2<2048, 3>, 2048, 3, 32);
    fo2("fan-out tma2 1K s4 x32 warps", FanoutTma2<1024, 4>, 1024, 4, 32);
  }
  // Correctness of the fan-out and fan-in variants against each other (regs x8 as the oracle).
  {
    std::vector<char> a(rows_bytes), b(rows_bytes);
    FanoutRegs<8, 1024><<<24, 1024>>>(reinterpret_cast<int4*>(x), reinterpret_cast<int4*>(rows), dest_row, T, k, vecs);
    CHECK(cudaMemcpy(a.data(), rows, rows_bytes, cudaMemcpyDeviceToHost));
    CHECK(cudaMemset(rows, 0, rows_bytes));
    FanoutTma<kFoPiece, kFoStages, kFoAhead><<<24, 8 * 32, 8 * kFoStages * kFoPiece + 8 * kFoStages * 8>>>(
        x, rows, dest_row, T, k, row_bytes);
    CHECK(cudaMemcpy(b.data(), rows, rows_bytes, cudaMemcpyDeviceToHost));
    std::printf("fan-out tma == regs: %s\n", a == b ? "yes" : "NO");
    std::vector<char> c(in_bytes), d(in_bytes);
    FaninRegs<4, 2, 768><<<24, 768>>>(reinterpret_cast<int4*>(rows), dest_row, weight, reinterpret_cast<int4*>(out), T, k, vecs);
    CHECK(cudaMemcpy(c.data(), out, in_bytes, cudaMemcpyDeviceToHost));
    CHECK(cudaMemset(out, 0, in_bytes));
    FaninTma<kFiPiece, kFiStages><<<24, 8 * 32, 8 * kFiStages * k * kFiPiece + 8 * kFiStages * 8>>>(
        rows, dest_row, weight, reinterpret_cast<int4*>(out), T, k, row_bytes, k);
    CHECK(cudaMemcpy(d.data(), out, in_bytes, cudaMemcpyDeviceToHost));
    std::printf("fan-in tma == regs: %s\n", c == d ? "yes" : "NO");
    CHECK(cudaMemset(out, 0, in_bytes));
    FaninRegs<4, 4, 512><<<24, 512>>>(reinterpret_cast<int4*>(rows), dest_row, weight, reinterpret_cast<int4*>(out), T, k, vecs);
    CHECK(cudaMemcpy(d.data(), out, in_bytes, cudaMemcpyDeviceToHost));
    std::printf("fan-in regs 4x4 == 4x2: %s\n", c == d ? "yes" : "NO");
    CHECK(cudaMemset(rows, 0, rows_bytes));
    SetSmem(FanoutTma2<2048, 3>, 32 * 3 * 2048 + 32 * 3 * 8);
    FanoutTma2<2048, 3><<<24, 1024, 32 * 3 * 2048 + 32 * 3 * 8>>>(x, rows, dest_row, T, k, row_bytes);
    CHECK(cudaGetLastError());
    CHECK(cudaMemcpy(b.data(), rows, rows_bytes, cudaMemcpyDeviceToHost));
    std::printf("fan-out tma2 == regs: %s\n", a == b ? "yes" : "NO");
  }
  return 0;
}
