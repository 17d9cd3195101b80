// What the XLA FFI handlers of both layouts share: the call's attributes, errors, the group-state
// lookup and the one check of a call's shape against the group's buffers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/api.h"
#include "ffi/group_state.h"
#include "xla/ffi/api/ffi.h"

namespace jax_ep {

// The attributes of every cuda custom call (jax_ep/backends/cuda/calls.py passes both). num_sms
// is per call, not per group, so each call may run on its own SM budget.
struct CallAttrs {
  int64_t group_id;
  int64_t num_sms;
};

enum class Layout { kNormal, kPadded };

inline xla::ffi::Error InvalidArgument(Layout layout, const std::string& msg) {
  return xla::ffi::Error::InvalidArgument(
      (layout == Layout::kPadded ? "jax_ep (padded layout): " : "jax_ep: ") + msg);
}

inline xla::ffi::Error CudaError(cudaError_t err, const char* op) {
  return xla::ffi::Error::Internal(std::string("jax_ep: launching ") + op + " failed: " +
                                   cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

inline xla::ffi::Error Launched(cudaError_t err, const char* op) {
  return err == cudaSuccess ? xla::ffi::Error::Success() : CudaError(err, op);
}

// The group's context on this device, or an error (unknown group, a peer timed out before, or
// a padded-layout call on a group without the padded-layout buffers).
inline xla::ffi::ErrorOr<Context*> Lookup(const CallAttrs& attrs, int32_t device, Layout layout) {
  Context* ctx = FindContext(attrs.group_id, device);
  if (!ctx) {
    return xla::ffi::Unexpected(xla::ffi::Error(
        xla::ffi::ErrorCode::kFailedPrecondition,
        "jax_ep: EP group " + std::to_string(attrs.group_id) + " has no state on device " +
            std::to_string(device) + " (closed, or built for other devices)"));
  }
  const std::string err = ErrorMessage(*ctx);
  if (!err.empty()) return xla::ffi::Unexpected(xla::ffi::Error::Internal(err));
  if (layout == Layout::kPadded && ctx->buffer_map.padded_max_tokens <= 0) {
    return xla::ffi::Unexpected(
        InvalidArgument(layout, "the group has no padded-layout buffers; create it with "
                                "EPConfig(low_latency=True)"));
  }
  return ctx;
}

// The call's shape, checked against what the group's buffers were sized for: k, T <= max_tokens
// (and <= M for the padded layout, where T counts the tokens of one segment), C <= the buffers'
// capacity, rows of whole 16-byte vectors no wider than the buffers' rows, at most the buffers'
// fp8 scale columns, and an SM budget a launch accepts. capacity and scale_cols are 0 where the
// layout has none. Checked before any kernel is enqueued: a call refused half-way would leave the
// ranks' sequences out of step.
inline xla::ffi::ErrorOr<CallShape> Shape(const Context& ctx, const CallAttrs& attrs,
                                          Layout layout, int64_t tokens, int64_t top_k,
                                          int64_t row_bytes, int64_t capacity,
                                          int64_t scale_cols) {
  auto invalid = [layout](const char* msg) {
    return xla::ffi::Unexpected(InvalidArgument(layout, msg));
  };
  const BufferLimits& lim = ctx.limits;
  const bool padded = layout == Layout::kPadded;
  if (top_k != lim.top_k) return invalid("top_k differs from the group's EPConfig");
  if (tokens > lim.max_tokens || (padded && tokens > lim.padded_max_tokens)) {
    return invalid("T exceeds EPConfig.max_tokens");
  }
  if (capacity > lim.max_capacity) return invalid("C exceeds the buffers' capacity");
  if (row_bytes % 16) return invalid("rows must be a multiple of 16 bytes");
  if (row_bytes > lim.max_row_bytes) {
    return invalid("rows are wider than EPConfig.hidden_size * itemsize(EPConfig.dtype)");
  }
  if (scale_cols > lim.padded_scale_cols) {
    return invalid("more fp8 scales per row than hidden_size / 128");
  }
  if (attrs.num_sms < 1 || attrs.num_sms > INT32_MAX) {
    return invalid("num_sms must be a positive int32");
  }
  CallShape s{};
  s.tokens = static_cast<int>(tokens);
  s.top_k = static_cast<int>(top_k);
  s.num_experts = lim.num_experts;
  // The padded layout of a hierarchical host group has padded_segments * num_ranks sources.
  s.segments = padded ? lim.padded_segments : 1;
  s.experts_local = lim.num_experts / (ctx.num_ranks * s.segments);
  s.row_bytes = row_bytes;
  s.num_sms = static_cast<int>(attrs.num_sms);
  s.capacity = capacity;
  s.max_tokens = lim.padded_max_tokens;
  s.scale_cols = static_cast<int>(scale_cols);
  s.zero_fill = lim.padded_zero_fill;
  return s;
}

// An absent optional operand is an empty buffer (calls.py's absent()).
inline bool IsAbsent(const xla::ffi::AnyBuffer& b) { return b.element_count() == 0; }

template <xla::ffi::DataType T>
bool IsAbsent(const xla::ffi::Buffer<T>& b) {
  return b.element_count() == 0;
}

// The element type of rows a combine reduces (it sums them in float32), for either layout's
// handler; `op` names the operation in the error.
inline xla::ffi::ErrorOr<ElemType> CombineRowType(xla::ffi::DataType t, const char* op) {
  switch (t) {
    case xla::ffi::DataType::F32: return ElemType::kF32;
    case xla::ffi::DataType::BF16: return ElemType::kBF16;
    case xla::ffi::DataType::F16: return ElemType::kF16;
    default:
      return xla::ffi::Unexpected(xla::ffi::Error::InvalidArgument(
          std::string("jax_ep: ") + op + " rows must be float32, bfloat16 or float16"));
  }
}

}  // namespace jax_ep

// At global scope: the macro specialises templates in namespace xla::ffi.
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::CallAttrs, StructMember<int64_t>("group_id"),
                                      StructMember<int64_t>("num_sms"));
