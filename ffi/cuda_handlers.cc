// XLA FFI handlers of the cuda backend: decode XLA's buffers, find the group's state for this
// device, check the shapes against what the buffers were sized for, and enqueue the kernels.
// Command-buffer compatible: no allocation, no synchronisation, no per-call host state.
#include <cuda_runtime.h>

#include <string>

#include "cuda/ep_kernels.h"
#include "ffi/group_state.h"
#include "ffi/handler_util.h"
#include "ffi/handlers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_ep {
namespace {

// Checks a call's shape against the limits the group's buffers were sized for.
ffi::ErrorOr<CallShape> Shape(const Context& ctx, int64_t tokens, int64_t top_k, int64_t hidden,
                              size_t itemsize, int64_t capacity) {
  const CommLimits& lim = ctx.limits;
  if (top_k != lim.top_k) return ffi::Unexpected(InvalidArgument("top_k differs from the group's EPConfig"));
  if (tokens > lim.max_tokens) return ffi::Unexpected(InvalidArgument("T exceeds EPConfig.max_tokens"));
  if (capacity > lim.max_capacity) return ffi::Unexpected(InvalidArgument("C exceeds the buffers' capacity"));
  const int64_t row_bytes = hidden * static_cast<int64_t>(itemsize);
  if (row_bytes % 16) return ffi::Unexpected(InvalidArgument("rows must be a multiple of 16 bytes"));
  if (row_bytes > lim.max_row_bytes) {
    return ffi::Unexpected(InvalidArgument("rows are wider than EPConfig.hidden_size * itemsize(EPConfig.dtype)"));
  }
  CallShape s{};
  s.tokens = static_cast<int>(tokens);
  s.top_k = static_cast<int>(top_k);
  s.num_experts = lim.num_experts;
  s.experts_local = lim.num_experts / ctx.num_ranks;
  s.capacity = capacity;
  s.row_bytes = row_bytes;
  s.num_blocks = ctx.num_blocks;
  return s;
}

ffi::Error DispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                        ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> topk_weights,
                        ffi::Result<ffi::AnyBuffer> out_x, ffi::Result<ffi::Buffer<ffi::F32>> out_w,
                        ffi::Result<ffi::Buffer<ffi::S32>> group_sizes,
                        ffi::Result<ffi::Buffer<ffi::S32>> num_dropped,
                        ffi::Result<ffi::Buffer<ffi::S32>> dest_rank,
                        ffi::Result<ffi::Buffer<ffi::S32>> dest_row,
                        ffi::Result<ffi::Buffer<ffi::S32>> row_src,
                        ffi::Result<ffi::Buffer<ffi::S32>> num_recv,
                        ffi::Result<ffi::Buffer<ffi::S32>> num_invalid, int64_t group_id) {
  auto ctx = Lookup(group_id, device);
  if (ctx.has_error()) return ctx.error();
  const auto xd = x.dimensions();
  const auto kd = topk_idx.dimensions();
  if (xd.size() != 2 || kd.size() != 2 || kd[0] != xd[0]) {
    return InvalidArgument("dispatch expects x [T, H] and topk_idx [T, k]");
  }
  auto shape = Shape(**ctx, xd[0], kd[1], xd[1], ffi::ByteWidth(x.element_type()),
                     out_x->dimensions()[0]);
  if (shape.has_error()) return shape.error();
  DispatchArgs a{};
  a.env = (*ctx)->Env();
  a.shape = *shape;
  a.x = x.untyped_data();
  a.topk_idx = topk_idx.typed_data();
  a.topk_weights = topk_weights.typed_data();
  a.out_x = out_x->untyped_data();
  a.out_weights = out_w->typed_data();
  a.group_sizes = group_sizes->typed_data();
  a.num_dropped = num_dropped->typed_data();
  a.dest_rank = dest_rank->typed_data();
  a.dest_row = dest_row->typed_data();
  a.row_src = row_src->typed_data();
  a.num_recv = num_recv->typed_data();
  a.num_invalid = num_invalid->typed_data();
  const cudaError_t err = LaunchDispatch(a, stream);
  return err == cudaSuccess ? ffi::Error::Success() : CudaError(err, "dispatch");
}

ffi::Error RedispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                          ffi::Buffer<ffi::F32> slot_values, ffi::Buffer<ffi::S32> dest_rank,
                          ffi::Buffer<ffi::S32> dest_row, ffi::Buffer<ffi::S32> num_recv,
                          ffi::Result<ffi::AnyBuffer> out_x,
                          ffi::Result<ffi::Buffer<ffi::F32>> out_values,
                          ffi::Result<ffi::Buffer<ffi::S32>> out_row_src, int64_t group_id) {
  auto ctx = Lookup(group_id, device);
  if (ctx.has_error()) return ctx.error();
  const auto rd = dest_rank.dimensions();
  const auto xd = x.dimensions();
  const bool has_x = !IsAbsent(x);
  if (rd.size() != 2 || xd.size() != 2 || (has_x && xd[0] != rd[0])) {
    return InvalidArgument("redispatch expects x [T, H] and dest_rank [T, k]");
  }
  const bool has_values = slot_values.element_count() != 0;
  const bool has_row_src = out_row_src->element_count() != 0;
  const int64_t capacity = has_x ? out_x->dimensions()[0]
                           : has_values ? out_values->dimensions()[0]
                                        : out_row_src->dimensions()[0];
  auto shape = Shape(**ctx, rd[0], rd[1], has_x ? xd[1] : 0, ffi::ByteWidth(x.element_type()),
                     capacity);
  if (shape.has_error()) return shape.error();
  RedispatchArgs a{};
  a.env = (*ctx)->Env();
  a.shape = *shape;
  a.x = has_x ? x.untyped_data() : nullptr;
  a.slot_values = has_values ? slot_values.typed_data() : nullptr;
  a.dest_rank = dest_rank.typed_data();
  a.dest_row = dest_row.typed_data();
  a.num_recv = num_recv.typed_data();
  a.out_x = has_x ? out_x->untyped_data() : nullptr;
  a.out_values = has_values ? out_values->typed_data() : nullptr;
  a.out_row_src = has_row_src ? out_row_src->typed_data() : nullptr;
  const cudaError_t err = LaunchRedispatch(a, stream);
  return err == cudaSuccess ? ffi::Error::Success() : CudaError(err, "redispatch");
}

ffi::Error CombineImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer rows,
                       ffi::Buffer<ffi::F32> row_scale, ffi::Buffer<ffi::F32> row_values,
                       ffi::Buffer<ffi::S32> dest_rank, ffi::Buffer<ffi::S32> dest_row,
                       ffi::Buffer<ffi::S32> row_src, ffi::Buffer<ffi::S32> num_recv,
                       ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::Buffer<ffi::F32>> slot_values, int64_t group_id) {
  auto ctx = Lookup(group_id, device);
  if (ctx.has_error()) return ctx.error();
  const auto rd = dest_rank.dimensions();
  const auto xd = rows.dimensions();
  const bool has_rows = !IsAbsent(rows);
  if (rd.size() != 2 || xd.size() != 2) {
    return InvalidArgument("combine expects rows [C, H] and dest_rank [T, k]");
  }
  auto elem = CombineRowType(rows.element_type(), "combine");
  if (has_rows && elem.has_error()) return elem.error();
  auto shape = Shape(**ctx, rd[0], rd[1], has_rows ? xd[1] : 0,
                     ffi::ByteWidth(rows.element_type()), row_src.dimensions()[0]);
  if (shape.has_error()) return shape.error();
  CombineArgs a{};
  a.env = (*ctx)->Env();
  a.shape = *shape;
  a.elem = has_rows ? *elem : ElemType::kF32;
  a.rows = has_rows ? rows.untyped_data() : nullptr;
  a.row_scale = row_scale.element_count() ? row_scale.typed_data() : nullptr;
  const bool has_values = row_values.element_count() != 0;
  a.row_values = has_values ? row_values.typed_data() : nullptr;
  a.dest_rank = dest_rank.typed_data();
  a.dest_row = dest_row.typed_data();
  a.row_src = row_src.typed_data();
  a.num_recv = num_recv.typed_data();
  a.out = has_rows ? out->untyped_data() : nullptr;
  // float32 output of 16-bit rows: unrounded partial sums (the hierarchical backend adds them
  // across hosts).
  a.out_f32 = has_rows && out->element_type() == ffi::DataType::F32;
  if (has_rows && (out->dimensions().size() != 2 || out->dimensions()[1] != xd[1] ||
                   (out->element_type() != rows.element_type() && !a.out_f32))) {
    return InvalidArgument("combine's output must be [T, H] in the rows' type or float32");
  }
  a.slot_values = has_values ? slot_values->typed_data() : nullptr;
  const cudaError_t err = LaunchCombine(a, stream);
  return err == cudaSuccess ? ffi::Error::Success() : CudaError(err, "combine");
}

}  // namespace
}  // namespace jax_ep

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpDispatchCuda, jax_ep::DispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("group_id"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpRedispatchCuda, jax_ep::RedispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("group_id"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpCombineCuda, jax_ep::CombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group_id"),
                              {ffi::Traits::kCmdBufferCompatible});
