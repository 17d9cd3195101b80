// The XLA FFI handler symbols that module.cc hands to Python for registration.
#pragma once
#include "xla/ffi/api/c_api.h"

// XLA_FFI_DEFINE_HANDLER_SYMBOL defines the handlers with C linkage.
extern "C" {

XLA_FFI_Error* JaxEpAbiVersionCpu(XLA_FFI_CallFrame* call_frame);

#ifdef JAX_EP_WITH_CUDA
XLA_FFI_Error* JaxEpDispatchCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpRedispatchCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpCombineCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpPaddedDispatchCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpPaddedCombineCuda(XLA_FFI_CallFrame* call_frame);
#endif

}  // extern "C"
