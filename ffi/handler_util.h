// Helpers shared by the XLA FFI handlers of both layouts: errors and the group-state lookup.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "cuda/ep_kernels.h"
#include "ffi/group_state.h"
#include "xla/ffi/api/ffi.h"

namespace jax_ep {

inline xla::ffi::Error InvalidArgument(const std::string& msg) {
  return xla::ffi::Error::InvalidArgument("jax_ep: " + msg);
}

inline xla::ffi::Error CudaError(cudaError_t err, const char* op) {
  return xla::ffi::Error::Internal(std::string("jax_ep: launching ") + op + " failed: " +
                                   cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

// The group's context on this device, or an error (unknown group, or a peer timed out before).
inline xla::ffi::ErrorOr<Context*> Lookup(int64_t group_id, int32_t device) {
  Context* ctx = FindContext(group_id, device);
  if (!ctx) {
    return xla::ffi::Unexpected(xla::ffi::Error(
        xla::ffi::ErrorCode::kFailedPrecondition,
        "jax_ep: EP group " + std::to_string(group_id) + " has no state on device " +
            std::to_string(device) + " (closed, or built for other devices)"));
  }
  const std::string err = ErrorMessage(*ctx);
  if (!err.empty()) return xla::ffi::Unexpected(xla::ffi::Error::Internal(err));
  return ctx;
}

inline bool IsAbsent(const xla::ffi::AnyBuffer& b) { return b.element_count() == 0; }

// The element type of rows a combine reduces (it sums them in float32), for either layout's
// handler; `op` names the operation in the error.
inline xla::ffi::ErrorOr<ElemType> CombineRowType(xla::ffi::DataType t, const char* op) {
  switch (t) {
    case xla::ffi::DataType::F32: return ElemType::kF32;
    case xla::ffi::DataType::BF16: return ElemType::kBF16;
    case xla::ffi::DataType::F16: return ElemType::kF16;
    default:
      return xla::ffi::Unexpected(
          InvalidArgument(std::string(op) + " rows must be float32, bfloat16 or float16"));
  }
}

}  // namespace jax_ep
