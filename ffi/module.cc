// The nanobind module `jax_ep._jax_ep`: FFI handler capsules for registration with XLA, the size
// of a group's communication buffer (cuda/buffer_map.h, in every build), and (when built with
// CUDA) the lifetime of the communication state behind an EPGroup.
#include <cstdint>
#include <stdexcept>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "cuda/buffer_map.h"
#include "ffi/abi.h"
#include "ffi/handlers.h"
#ifdef JAX_EP_WITH_CUDA
#include <cuda_runtime_api.h>

#include "ffi/group_state.h"
#endif

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Fn, XLA_FFI_CallFrame*>,
                "an FFI handler must take an XLA_FFI_CallFrame*");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

nb::dict CpuTargets() {
  nb::dict d;
  d["jax_ep_abi_version"] = Capsule(JaxEpAbiVersionCpu);
  return d;
}

nb::dict CudaTargets() {
  nb::dict d;
#ifdef JAX_EP_WITH_CUDA
  d["jax_ep_dispatch"] = Capsule(JaxEpDispatchCuda);
  d["jax_ep_redispatch"] = Capsule(JaxEpRedispatchCuda);
  d["jax_ep_combine"] = Capsule(JaxEpCombineCuda);
  d["jax_ep_padded_dispatch"] = Capsule(JaxEpPaddedDispatchCuda);
  d["jax_ep_padded_combine"] = Capsule(JaxEpPaddedCombineCuda);
#endif
  return d;
}

// Bytes of one rank's communication buffer for these limits: ComputeBufferMap, the same map the
// cuda backend allocates (plain C++, so CPU-only builds answer too).
int64_t BufferMapBytes(int num_ranks, int num_experts, int top_k, int max_tokens,
                       int64_t max_capacity, int64_t max_row_bytes, int padded_max_tokens,
                       int padded_scale_cols, bool padded_zero_fill, int padded_segments) {
  if (num_ranks < 1 || num_experts < 1 || top_k < 1 || max_tokens < 1 || max_capacity < 0 ||
      max_row_bytes < 0 || padded_max_tokens < 0 || padded_scale_cols < 0 ||
      padded_segments < 1) {
    throw std::invalid_argument("jax_ep: buffer_map_bytes needs positive sizes");
  }
  const jax_ep::BufferLimits lim{num_ranks,         num_experts,       top_k,
                                 max_tokens,        max_capacity,      max_row_bytes,
                                 padded_max_tokens, padded_scale_cols, padded_zero_fill,
                                 padded_segments};
  return static_cast<int64_t>(jax_ep::ComputeBufferMap(lim).total_bytes);
}

}  // namespace

#ifndef JAX_EP_CUDA_ARCHS
#define JAX_EP_CUDA_ARCHS ""
#endif

NB_MODULE(_jax_ep, m) {
  m.doc() = "jax_ep compiled extension: XLA FFI handlers and CUDA communication state";
  m.attr("ABI_VERSION") = JAX_EP_ABI_VERSION;
#ifdef JAX_EP_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  // The CUDA architectures the kernels were compiled for (CMAKE_CUDA_ARCHITECTURES, comma-separated;
  // empty in a CPU-only build).
  m.attr("CUDA_ARCHITECTURES") = JAX_EP_CUDA_ARCHS;
  m.attr("MAX_RANKS") = jax_ep::kMaxRanks;
  m.def("buffer_map_bytes", &BufferMapBytes, nb::arg("num_ranks"), nb::arg("num_experts"),
        nb::arg("top_k"), nb::arg("max_tokens"), nb::arg("max_capacity"), nb::arg("max_row_bytes"),
        nb::arg("padded_max_tokens") = 0, nb::arg("padded_scale_cols") = 0,
        nb::arg("padded_zero_fill") = true, nb::arg("padded_segments") = 1,
        "Bytes of one rank's communication buffer for these BufferLimits (cuda/buffer_map.h's "
        "ComputeBufferMap), with the padded-layout regions when padded_max_tokens > 0.");
  m.def("cpu_targets", &CpuTargets, "FFI handler capsules for the CPU platform, by target name");
  m.def("cuda_targets", &CudaTargets, "FFI handler capsules for the CUDA platform, by target name");
#ifdef JAX_EP_WITH_CUDA
  // The CUDA runtime is linked statically: it needs a driver of at least this version.
  m.attr("CUDA_RUNTIME_VERSION") = CUDART_VERSION;
  m.def("cuda_driver_version", [] {
    int version = 0;  // 0: no driver (cudaDriverGetVersion reports none installed as 0)
    return cudaDriverGetVersion(&version) == cudaSuccess ? version : 0;
  }, "The CUDA version the installed driver supports (e.g. 12080), 0 without a driver.");
  jax_ep::BindGroupState(m);
#endif
}
