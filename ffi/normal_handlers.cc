// XLA FFI handlers of the normal layout: decode XLA's buffers, find the group's state for this
// device, check the shapes against what the buffers were sized for, and enqueue the kernels of
// jax_ep::normal (cuda/api.h). Command-buffer compatible: no allocation, no synchronisation, no
// per-call host state. Each handler's operands are listed in its Bind below, in the order of
// its function in jax_ep/backends/cuda/calls.py.
#include <cuda_runtime.h>

#include "cuda/api.h"
#include "ffi/group_state.h"
#include "ffi/handler_util.h"
#include "ffi/handlers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_ep {
namespace {

constexpr Layout kLayout = Layout::kNormal;

ffi::Error DispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                        ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> topk_weights,
                        ffi::Result<ffi::AnyBuffer> out_x, ffi::Result<ffi::Buffer<ffi::F32>> out_w,
                        ffi::Result<ffi::Buffer<ffi::S32>> group_sizes,
                        ffi::Result<ffi::Buffer<ffi::S32>> num_dropped,
                        ffi::Result<ffi::Buffer<ffi::S32>> dest_rank,
                        ffi::Result<ffi::Buffer<ffi::S32>> dest_row,
                        ffi::Result<ffi::Buffer<ffi::S32>> row_src,
                        ffi::Result<ffi::Buffer<ffi::S32>> num_recv,
                        ffi::Result<ffi::Buffer<ffi::S32>> num_invalid, CallAttrs attrs) {
  auto ctx = Lookup(attrs, device, kLayout);
  if (ctx.has_error()) return ctx.error();
  const auto xd = x.dimensions();
  const auto kd = topk_idx.dimensions();
  if (xd.size() != 2 || kd.size() != 2 || kd[0] != xd[0]) {
    return InvalidArgument(kLayout, "dispatch expects x [T, H] and topk_idx [T, k]");
  }
  auto shape = Shape(**ctx, attrs, kLayout, xd[0], kd[1],
                     xd[1] * static_cast<int64_t>(ffi::ByteWidth(x.element_type())),
                     out_x->dimensions()[0], 0);
  if (shape.has_error()) return shape.error();
  normal::DispatchArgs a{};
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
  return Launched(normal::LaunchDispatch(a, stream), "dispatch");
}

ffi::Error RedispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                          ffi::Buffer<ffi::F32> slot_values, ffi::Buffer<ffi::S32> dest_rank,
                          ffi::Buffer<ffi::S32> dest_row, ffi::Buffer<ffi::S32> num_recv,
                          ffi::Result<ffi::AnyBuffer> out_x,
                          ffi::Result<ffi::Buffer<ffi::F32>> out_values,
                          ffi::Result<ffi::Buffer<ffi::S32>> out_row_src, CallAttrs attrs) {
  auto ctx = Lookup(attrs, device, kLayout);
  if (ctx.has_error()) return ctx.error();
  const auto rd = dest_rank.dimensions();
  const auto xd = x.dimensions();
  const bool has_x = !IsAbsent(x);
  if (rd.size() != 2 || xd.size() != 2 || (has_x && xd[0] != rd[0])) {
    return InvalidArgument(kLayout, "redispatch expects x [T, H] and dest_rank [T, k]");
  }
  const bool has_values = !IsAbsent(slot_values);
  const bool has_row_src = out_row_src->element_count() != 0;
  const int64_t capacity = has_x ? out_x->dimensions()[0]
                           : has_values ? out_values->dimensions()[0]
                                        : out_row_src->dimensions()[0];
  const int64_t row_bytes =
      has_x ? xd[1] * static_cast<int64_t>(ffi::ByteWidth(x.element_type())) : 0;
  auto shape = Shape(**ctx, attrs, kLayout, rd[0], rd[1], row_bytes, capacity, 0);
  if (shape.has_error()) return shape.error();
  normal::RedispatchArgs a{};
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
  return Launched(normal::LaunchRedispatch(a, stream), "redispatch");
}

ffi::Error CombineImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer rows,
                       ffi::Buffer<ffi::F32> row_scale, ffi::Buffer<ffi::F32> row_values,
                       ffi::Buffer<ffi::S32> dest_rank, ffi::Buffer<ffi::S32> dest_row,
                       ffi::Buffer<ffi::S32> row_src, ffi::Buffer<ffi::S32> num_recv,
                       ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::Buffer<ffi::F32>> slot_values, CallAttrs attrs) {
  auto ctx = Lookup(attrs, device, kLayout);
  if (ctx.has_error()) return ctx.error();
  const auto rd = dest_rank.dimensions();
  const auto xd = rows.dimensions();
  const bool has_rows = !IsAbsent(rows);
  if (rd.size() != 2 || xd.size() != 2) {
    return InvalidArgument(kLayout, "combine expects rows [C, H] and dest_rank [T, k]");
  }
  auto elem = CombineRowType(rows.element_type(), "combine");
  if (has_rows && elem.has_error()) return elem.error();
  const int64_t row_bytes =
      has_rows ? xd[1] * static_cast<int64_t>(ffi::ByteWidth(rows.element_type())) : 0;
  auto shape = Shape(**ctx, attrs, kLayout, rd[0], rd[1], row_bytes, row_src.dimensions()[0], 0);
  if (shape.has_error()) return shape.error();
  normal::CombineArgs a{};
  a.env = (*ctx)->Env();
  a.shape = *shape;
  a.elem = has_rows ? *elem : ElemType::kF32;
  a.rows = has_rows ? rows.untyped_data() : nullptr;
  a.row_scale = IsAbsent(row_scale) ? nullptr : row_scale.typed_data();
  const bool has_values = !IsAbsent(row_values);
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
    return InvalidArgument(kLayout, "combine's output must be [T, H] in the rows' type or float32");
  }
  a.slot_values = has_values ? slot_values->typed_data() : nullptr;
  return Launched(normal::LaunchCombine(a, stream), "combine");
}

}  // namespace
}  // namespace jax_ep

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpDispatchCuda, jax_ep::DispatchImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()          // x [T, H]
        .Arg<ffi::Buffer<ffi::S32>>()   // topk_idx [T, k]
        .Arg<ffi::Buffer<ffi::F32>>()   // topk_weights [T, k]
        .Ret<ffi::AnyBuffer>()          // rows [C, H]
        .Ret<ffi::Buffer<ffi::F32>>()   // row_weights [C]
        .Ret<ffi::Buffer<ffi::S32>>()   // group_sizes [E_local]
        .Ret<ffi::Buffer<ffi::S32>>()   // num_dropped []
        .Ret<ffi::Buffer<ffi::S32>>()   // dest_rank [T, k]
        .Ret<ffi::Buffer<ffi::S32>>()   // dest_row [T, k]
        .Ret<ffi::Buffer<ffi::S32>>()   // row_src [C]
        .Ret<ffi::Buffer<ffi::S32>>()   // num_recv []
        .Ret<ffi::Buffer<ffi::S32>>()   // num_invalid []
        .Attrs<jax_ep::CallAttrs>(),    // group_id, num_sms
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpRedispatchCuda, jax_ep::RedispatchImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()          // x [T, H] or absent
        .Arg<ffi::Buffer<ffi::F32>>()   // slot_values [T, k] or absent
        .Arg<ffi::Buffer<ffi::S32>>()   // dest_rank [T, k]
        .Arg<ffi::Buffer<ffi::S32>>()   // dest_row [T, k]
        .Arg<ffi::Buffer<ffi::S32>>()   // num_recv []
        .Ret<ffi::AnyBuffer>()          // rows [C, H] or absent
        .Ret<ffi::Buffer<ffi::F32>>()   // row_values [C] or absent
        .Ret<ffi::Buffer<ffi::S32>>()   // row_src [C] or absent
        .Attrs<jax_ep::CallAttrs>(),    // group_id, num_sms
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpCombineCuda, jax_ep::CombineImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()          // rows [C, H] or absent
        .Arg<ffi::Buffer<ffi::F32>>()   // row_scale [C] or absent
        .Arg<ffi::Buffer<ffi::F32>>()   // row_values [C] or absent
        .Arg<ffi::Buffer<ffi::S32>>()   // dest_rank [T, k]
        .Arg<ffi::Buffer<ffi::S32>>()   // dest_row [T, k]
        .Arg<ffi::Buffer<ffi::S32>>()   // row_src [C]
        .Arg<ffi::Buffer<ffi::S32>>()   // num_recv []
        .Ret<ffi::AnyBuffer>()          // out [T, H] or absent
        .Ret<ffi::Buffer<ffi::F32>>()   // slot_values [T, k] or absent
        .Attrs<jax_ep::CallAttrs>(),    // group_id, num_sms
    {ffi::Traits::kCmdBufferCompatible});
