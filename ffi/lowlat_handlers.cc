// XLA FFI handlers of the padded (low-latency) layout: decode XLA's buffers, find the group's
// state for this device, check the shapes against the padded-layout buffers, enqueue the
// kernels of cuda/lowlat.cu. Command-buffer compatible: no allocation, no synchronisation, no
// per-call host state. An absent optional operand is an empty buffer.
#include <cuda_runtime.h>

#include <string>

#include "cuda/lowlat.h"
#include "ffi/group_state.h"
#include "ffi/handler_util.h"
#include "ffi/handlers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_ep {
namespace {

ffi::Error Invalid(const std::string& msg) {
  return ffi::Error::InvalidArgument("jax_ep (padded layout): " + msg);
}

ffi::ErrorOr<Context*> LookupPadded(int64_t group_id, int32_t device) {
  auto ctx = Lookup(group_id, device);
  if (ctx.has_error()) return ctx;
  if ((*ctx)->layout.ll_max_tokens <= 0) {
    return ffi::Unexpected(Invalid("the group has no padded-layout buffers; create it with "
                                   "EPConfig(low_latency=True)"));
  }
  return ctx;
}


// The call's shape, checked against the buffers: T <= max_tokens, k, rows of whole 16-byte
// vectors no wider than the buffers' rows, at most the buffers' scale columns.
ffi::ErrorOr<PaddedShape> Shape(const Context& ctx, int64_t tokens, int64_t top_k,
                                int64_t row_bytes, int64_t scale_cols) {
  const CommLimits& lim = ctx.limits;
  if (top_k != lim.top_k) return ffi::Unexpected(Invalid("top_k differs from the group's EPConfig"));
  if (tokens > lim.max_tokens || tokens > lim.ll_max_tokens) {
    return ffi::Unexpected(Invalid("T exceeds EPConfig.max_tokens"));
  }
  if (row_bytes % 16) return ffi::Unexpected(Invalid("rows must be a multiple of 16 bytes"));
  if (row_bytes > lim.max_row_bytes) {
    return ffi::Unexpected(Invalid("rows are wider than EPConfig.hidden_size * itemsize(EPConfig.dtype)"));
  }
  if (scale_cols > lim.ll_scale_cols) {
    return ffi::Unexpected(Invalid("more fp8 scales per row than hidden_size / 128"));
  }
  PaddedShape s{};
  s.tokens = static_cast<int>(tokens);
  s.top_k = static_cast<int>(top_k);
  s.num_experts = lim.num_experts;
  s.experts_local = lim.num_experts / ctx.num_ranks;
  s.max_tokens = lim.ll_max_tokens;
  s.row_bytes = row_bytes;
  s.scale_cols = static_cast<int>(scale_cols);
  s.num_blocks = ctx.num_blocks;
  s.zero_fill = lim.ll_zero_fill;
  return s;
}

ffi::Error PaddedDispatchImpl(
    cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> x_scales,
    ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> slot_values,
    ffi::Result<ffi::AnyBuffer> out_x, ffi::Result<ffi::Buffer<ffi::F32>> out_values,
    ffi::Result<ffi::Buffer<ffi::F32>> out_scales,
    ffi::Result<ffi::Buffer<ffi::S32>> recv_counts,
    ffi::Result<ffi::Buffer<ffi::S32>> group_sizes,
    ffi::Result<ffi::Buffer<ffi::S32>> num_dropped,
    ffi::Result<ffi::Buffer<ffi::S32>> slot_expert, ffi::Result<ffi::Buffer<ffi::S32>> slot_pos,
    int64_t group_id) {
  auto ctx = LookupPadded(group_id, device);
  if (ctx.has_error()) return ctx.error();
  const auto kd = ids.dimensions();
  const auto xd = x.dimensions();
  const bool has_x = !IsAbsent(x), has_scales = x_scales.element_count() != 0;
  const bool has_values = slot_values.element_count() != 0;
  if (kd.size() != 2 || xd.size() != 2 || (has_x && xd[0] != kd[0])) {
    return Invalid("dispatch expects x [T, H] and ids [T, k]");
  }
  const int64_t row_bytes = has_x ? xd[1] * static_cast<int64_t>(ffi::ByteWidth(x.element_type())) : 0;
  const int64_t cols = has_scales ? x_scales.dimensions()[1] : 0;
  auto shape = Shape(**ctx, kd[0], kd[1], row_bytes, cols);
  if (shape.has_error()) return shape.error();
  const int64_t padded_rows = static_cast<int64_t>(shape->experts_local) * (*ctx)->num_ranks *
                              shape->max_tokens;
  if (has_x && out_x->element_count() != padded_rows * xd[1]) {
    return Invalid("out_x must be [E_local, N * max_tokens, H]");
  }
  if (has_values && out_values->element_count() != padded_rows) {
    return Invalid("row weights must be [E_local, N * max_tokens]");
  }
  if (has_scales && out_scales->element_count() != padded_rows * cols) {
    return Invalid("scales must be [E_local, N * max_tokens, H / 128]");
  }
  PaddedDispatchArgs a{};
  a.env = (*ctx)->Env();
  a.shape = *shape;
  a.x = has_x ? x.untyped_data() : nullptr;
  a.x_scales = has_scales ? x_scales.typed_data() : nullptr;
  a.ids = ids.typed_data();
  a.slot_values = has_values ? slot_values.typed_data() : nullptr;
  a.out_x = has_x ? out_x->untyped_data() : nullptr;
  a.out_values = has_values ? out_values->typed_data() : nullptr;
  a.out_scales = has_scales ? out_scales->typed_data() : nullptr;
  a.recv_counts = recv_counts->typed_data();
  a.group_sizes = group_sizes->typed_data();
  a.num_dropped = num_dropped->typed_data();
  a.slot_expert = slot_expert->typed_data();
  a.slot_pos = slot_pos->typed_data();
  const cudaError_t err = LaunchPaddedDispatch(a, stream);
  return err == cudaSuccess ? ffi::Error::Success() : CudaError(err, "padded dispatch");
}

ffi::Error PaddedCombineImpl(
    cudaStream_t stream, int32_t device, ffi::AnyBuffer rows, ffi::Buffer<ffi::F32> row_scale,
    ffi::Buffer<ffi::F32> row_values, ffi::Buffer<ffi::S32> recv_counts,
    ffi::Buffer<ffi::S32> slot_expert, ffi::Buffer<ffi::S32> slot_pos,
    ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> slot_values,
    int64_t group_id) {
  auto ctx = LookupPadded(group_id, device);
  if (ctx.has_error()) return ctx.error();
  const auto kd = slot_expert.dimensions();
  const auto rd = rows.dimensions();
  const bool has_rows = !IsAbsent(rows);
  const bool has_values = row_values.element_count() != 0;
  if (kd.size() != 2 || rd.size() != 3) {
    return Invalid("combine expects rows [E_local, N * max_tokens, H] and slot_expert [T, k]");
  }
  auto elem = CombineRowType(rows.element_type(), "padded combine");
  if (has_rows && elem.has_error()) return elem.error();
  const int64_t row_bytes = has_rows ? rd[2] * static_cast<int64_t>(ffi::ByteWidth(rows.element_type())) : 0;
  auto shape = Shape(**ctx, kd[0], kd[1], row_bytes, 0);
  if (shape.has_error()) return shape.error();
  const int64_t pairs = static_cast<int64_t>(shape->experts_local) * (*ctx)->num_ranks;
  if (recv_counts.element_count() != pairs) return Invalid("recv_counts must be [E_local, N]");
  if (has_rows && (rd[0] != shape->experts_local || rd[1] != pairs / shape->experts_local * shape->max_tokens)) {
    return Invalid("rows must be [E_local, N * max_tokens, H]");
  }
  PaddedCombineArgs a{};
  a.env = (*ctx)->Env();
  a.shape = *shape;
  a.elem = has_rows ? *elem : ElemType::kF32;
  a.rows = has_rows ? rows.untyped_data() : nullptr;
  a.row_scale = row_scale.element_count() ? row_scale.typed_data() : nullptr;
  a.row_values = has_values ? row_values.typed_data() : nullptr;
  a.recv_counts = recv_counts.typed_data();
  a.slot_expert = slot_expert.typed_data();
  a.slot_pos = slot_pos.typed_data();
  a.out = has_rows ? out->untyped_data() : nullptr;
  a.slot_values = has_values ? slot_values->typed_data() : nullptr;
  const cudaError_t err = LaunchPaddedCombine(a, stream);
  return err == cudaSuccess ? ffi::Error::Success() : CudaError(err, "padded combine");
}

}  // namespace
}  // namespace jax_ep

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpPaddedDispatchCuda, jax_ep::PaddedDispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("group_id"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpPaddedCombineCuda, jax_ep::PaddedCombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group_id"),
                              {ffi::Traits::kCmdBufferCompatible});
