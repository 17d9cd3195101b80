// CPU FFI handlers. The reference backend is pure JAX; the only CPU custom call reports the
// extension's ABI version so tests can check that Python and the built module agree.
#include "ffi/abi.h"
#include "ffi/handlers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_ep {
namespace {

ffi::Error AbiVersionImpl(ffi::ResultBuffer<ffi::S32> out) {
  if (out->element_count() != 1) {
    return ffi::Error::InvalidArgument("jax_ep_abi_version: output must be a scalar int32");
  }
  out->typed_data()[0] = JAX_EP_ABI_VERSION;
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_ep

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpAbiVersionCpu, jax_ep::AbiVersionImpl,
                              xla::ffi::Ffi::Bind().Ret<xla::ffi::Buffer<xla::ffi::S32>>());
