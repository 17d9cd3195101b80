// The copy ceiling of bench/bench_ep.py: a device-to-device copy run on a given SM budget, as an
// XLA FFI custom call (bench only; not part of the jax_ep package). One block of 1024 threads
// per budgeted SM (grid = num_blocks), 16-byte loads and stores, each thread keeping 8 loads in
// flight before it stores them. Self-contained: built by bench/copy_kernel/build.py with nvcc
// against the XLA FFI headers only. Command-buffer compatible: no allocation, no
// synchronisation, no per-call host state.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_ep_bench {
namespace {

constexpr int kThreads = 1024;           // per block
constexpr int kUnroll = 8;               // 16-byte loads in flight per thread
constexpr int64_t kMaxBlocks = 1 << 20;  // far above any SM count

// The grid's lanes (thread t of block b is lane b * 1024 + t, of L = gridDim.x * 1024) walk the
// array in steps of 8 * L vectors: in each, lane l loads vectors l, l + L, ..., l + 7 * L (each
// a coalesced 16 KiB per block and L * 16 bytes across the grid), then stores the 8. The part
// past the last whole step (fewer than 8 * L vectors) is one more step with each load and store
// predicated on being in bounds.
__global__ void __launch_bounds__(kThreads, 1)
    CopyKernel(const uint4* __restrict__ src, uint4* __restrict__ dst, int64_t num_vectors) {
  const int64_t lanes = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t lane = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t step = lanes * kUnroll;
  const int64_t whole = num_vectors / step * step;
  for (int64_t base = lane; base < whole; base += step) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = src[base + u * lanes];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) dst[base + u * lanes] = v[u];
  }
  if (whole < num_vectors) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = whole + lane + u * lanes;
      if (i < num_vectors) v[u] = src[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = whole + lane + u * lanes;
      if (i < num_vectors) dst[i] = v[u];
    }
  }
}

ffi::Error CopyImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out,
                    int64_t num_blocks) {
  const size_t nbytes = x.size_bytes();
  if (nbytes % 16 != 0) {
    return ffi::Error::InvalidArgument("jax_ep bench copy: the buffer's size (" +
                                       std::to_string(nbytes) +
                                       " bytes) must be a multiple of 16 bytes");
  }
  if (out->size_bytes() != nbytes) {
    return ffi::Error::InvalidArgument("jax_ep bench copy: the output's size differs from x's");
  }
  if (num_blocks < 1 || num_blocks > kMaxBlocks) {
    return ffi::Error::InvalidArgument("jax_ep bench copy: num_blocks must be in [1, " +
                                       std::to_string(kMaxBlocks) + "], got " +
                                       std::to_string(num_blocks));
  }
  const void* src = x.untyped_data();
  void* dst = out->untyped_data();
  if ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) % 16 != 0) {
    return ffi::Error::InvalidArgument("jax_ep bench copy: buffers must be 16-byte aligned");
  }
  if (nbytes == 0) return ffi::Error::Success();
  CopyKernel<<<static_cast<unsigned>(num_blocks), kThreads, 0, stream>>>(
      static_cast<const uint4*>(src), static_cast<uint4*>(dst),
      static_cast<int64_t>(nbytes / 16));
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jax_ep bench copy: launching the copy kernel failed: ") +
                                cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_ep_bench

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpBenchCopy, jax_ep_bench::CopyImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::AnyBuffer>()          // x: any dtype and shape, a multiple of 16 bytes
        .Ret<ffi::AnyBuffer>()          // out: x's shape and dtype, x's bytes
        .Attr<int64_t>("num_blocks"),   // blocks of 1024 threads: the SM budget
    {ffi::Traits::kCmdBufferCompatible});
