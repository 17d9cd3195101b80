// The nanobind module `jax_ep._jax_ep`: FFI handler capsules for registration with XLA, and (when
// built with CUDA) the lifetime of the communication state behind an EPGroup.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "ffi/abi.h"
#include "ffi/handlers.h"
#ifdef JAX_EP_WITH_CUDA
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

}  // namespace

NB_MODULE(_jax_ep, m) {
  m.doc() = "jax_ep compiled extension: XLA FFI handlers and CUDA communication state";
  m.attr("ABI_VERSION") = JAX_EP_ABI_VERSION;
#ifdef JAX_EP_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("cpu_targets", &CpuTargets, "FFI handler capsules for the CPU platform, by target name");
  m.def("cuda_targets", &CudaTargets, "FFI handler capsules for the CUDA platform, by target name");
#ifdef JAX_EP_WITH_CUDA
  jax_ep::BindGroupState(m);
#endif
}
