// XLA FFI handlers of the padded layout: decode XLA's buffers, find the group's state for this
// device, check the shapes against the padded-layout buffers, enqueue the kernels of
// jax_ep::padded (cuda/api.h). Command-buffer compatible: no allocation, no synchronisation, no
// per-call host state. Each handler's operands are listed in its Bind below, in the order of
// its function in jax_ep/backends/cuda/calls.py. [T, ...] operands hold segments * T tokens
// (cuda/api.h: one segment in a flat group).
#include <cuda_runtime.h>

#include "cuda/api.h"
#include "ffi/group_state.h"
#include "ffi/handler_util.h"
#include "ffi/handlers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_ep {
namespace {

constexpr Layout kLayout = Layout::kPadded;

// The sources table of a call: [2, N] int32 (N = segments * ranks; cuda/api.h), or null where the
// group's ranks send for one source each (the cuda backend), whose calls pass it absent.
ffi::ErrorOr<const int32_t*> SourceTable(ffi::Buffer<ffi::S32> sources, const CallShape& shape,
                                         int num_ranks) {
  if (IsAbsent(sources)) {
    if (shape.segments == 1) return static_cast<const int32_t*>(nullptr);
    return ffi::Unexpected(InvalidArgument(
        kLayout, "a group whose ranks send for several sources needs the sources table"));
  }
  const auto d = sources.dimensions();
  if (d.size() != 2 || d[0] != 2 || d[1] != static_cast<int64_t>(shape.segments) * num_ranks) {
    return ffi::Unexpected(InvalidArgument(kLayout, "sources must be [2, segments * ranks]"));
  }
  return sources.typed_data();
}

ffi::Error PaddedDispatchImpl(
    cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> x_scales,
    ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> slot_values, ffi::Buffer<ffi::S32> sources,
    ffi::Result<ffi::AnyBuffer> out_x, ffi::Result<ffi::Buffer<ffi::F32>> out_values,
    ffi::Result<ffi::Buffer<ffi::F32>> out_scales,
    ffi::Result<ffi::Buffer<ffi::S32>> recv_counts,
    ffi::Result<ffi::Buffer<ffi::S32>> group_sizes,
    ffi::Result<ffi::Buffer<ffi::S32>> num_dropped,
    ffi::Result<ffi::Buffer<ffi::S32>> slot_expert, ffi::Result<ffi::Buffer<ffi::S32>> slot_pos,
    CallAttrs attrs) {
  auto ctx = Lookup(attrs, device, kLayout);
  if (ctx.has_error()) return ctx.error();
  const auto kd = ids.dimensions();
  const auto xd = x.dimensions();
  const bool has_x = !IsAbsent(x), has_scales = !IsAbsent(x_scales);
  const bool has_values = !IsAbsent(slot_values);
  if (kd.size() != 2 || xd.size() != 2 || (has_x && xd[0] != kd[0])) {
    return InvalidArgument(kLayout, "dispatch expects x [T, H] and ids [T, k]");
  }
  // ids hold one segment of T tokens per source the rank sends for.
  const int64_t segments = (*ctx)->limits.padded_segments;
  if (kd[0] % segments) {
    return InvalidArgument(kLayout, "ids must be [segments * T, k]: whole segments of T tokens");
  }
  const int64_t row_bytes =
      has_x ? xd[1] * static_cast<int64_t>(ffi::ByteWidth(x.element_type())) : 0;
  const int64_t cols = has_scales ? x_scales.dimensions()[1] : 0;
  auto shape = Shape(**ctx, attrs, kLayout, kd[0] / segments, kd[1], row_bytes, 0, cols);
  if (shape.has_error()) return shape.error();
  auto table = SourceTable(sources, *shape, (*ctx)->num_ranks);
  if (table.has_error()) return table.error();
  const int64_t padded_rows = static_cast<int64_t>(shape->experts_local) * segments *
                              (*ctx)->num_ranks * shape->max_tokens;
  if (has_x && out_x->element_count() != padded_rows * xd[1]) {
    return InvalidArgument(kLayout, "out_x must be [E_local, N * max_tokens, H]");
  }
  if (has_values && out_values->element_count() != padded_rows) {
    return InvalidArgument(kLayout, "row weights must be [E_local, N * max_tokens]");
  }
  if (has_scales && out_scales->element_count() != padded_rows * cols) {
    return InvalidArgument(kLayout, "scales must be [E_local, N * max_tokens, H / 128]");
  }
  padded::DispatchArgs a{};
  a.env = (*ctx)->Env();
  a.shape = *shape;
  a.x = has_x ? x.untyped_data() : nullptr;
  a.x_scales = has_scales ? x_scales.typed_data() : nullptr;
  a.ids = ids.typed_data();
  a.slot_values = has_values ? slot_values.typed_data() : nullptr;
  a.sources = *table;
  a.out_x = has_x ? out_x->untyped_data() : nullptr;
  a.out_values = has_values ? out_values->typed_data() : nullptr;
  a.out_scales = has_scales ? out_scales->typed_data() : nullptr;
  a.recv_counts = recv_counts->typed_data();
  a.group_sizes = group_sizes->typed_data();
  a.num_dropped = num_dropped->typed_data();
  a.slot_expert = slot_expert->typed_data();
  a.slot_pos = slot_pos->typed_data();
  return Launched(padded::LaunchDispatch(a, stream), "padded dispatch");
}

ffi::Error PaddedCombineImpl(
    cudaStream_t stream, int32_t device, ffi::AnyBuffer rows, ffi::Buffer<ffi::F32> row_scale,
    ffi::Buffer<ffi::F32> row_values, ffi::Buffer<ffi::S32> recv_counts,
    ffi::Buffer<ffi::S32> slot_expert, ffi::Buffer<ffi::S32> slot_pos,
    ffi::Buffer<ffi::S32> sources, ffi::Result<ffi::AnyBuffer> out,
    ffi::Result<ffi::Buffer<ffi::F32>> slot_values, CallAttrs attrs) {
  auto ctx = Lookup(attrs, device, kLayout);
  if (ctx.has_error()) return ctx.error();
  const auto kd = slot_expert.dimensions();
  const auto rd = rows.dimensions();
  const bool has_rows = !IsAbsent(rows);
  const bool has_values = !IsAbsent(row_values);
  if (kd.size() != 2 || rd.size() != 3) {
    return InvalidArgument(
        kLayout, "combine expects rows [E_local, N * max_tokens, H] and slot_expert [T, k]");
  }
  auto elem = CombineRowType(rows.element_type(), "padded combine");
  if (has_rows && elem.has_error()) return elem.error();
  const int64_t segments = (*ctx)->limits.padded_segments;
  if (kd[0] % segments) {
    return InvalidArgument(kLayout,
                           "slot_expert must be [segments * T, k]: whole segments of T tokens");
  }
  const int64_t row_bytes =
      has_rows ? rd[2] * static_cast<int64_t>(ffi::ByteWidth(rows.element_type())) : 0;
  auto shape = Shape(**ctx, attrs, kLayout, kd[0] / segments, kd[1], row_bytes, 0, 0);
  if (shape.has_error()) return shape.error();
  auto table = SourceTable(sources, *shape, (*ctx)->num_ranks);
  if (table.has_error()) return table.error();
  const int64_t pairs = static_cast<int64_t>(shape->experts_local) * segments * (*ctx)->num_ranks;
  if (recv_counts.element_count() != pairs) {
    return InvalidArgument(kLayout, "recv_counts must be [E_local, N]");
  }
  if (has_rows && (rd[0] != shape->experts_local ||
                   rd[1] != pairs / shape->experts_local * shape->max_tokens)) {
    return InvalidArgument(kLayout, "rows must be [E_local, N * max_tokens, H]");
  }
  padded::CombineArgs a{};
  a.env = (*ctx)->Env();
  a.shape = *shape;
  a.elem = has_rows ? *elem : ElemType::kF32;
  a.rows = has_rows ? rows.untyped_data() : nullptr;
  a.row_scale = IsAbsent(row_scale) ? nullptr : row_scale.typed_data();
  a.row_values = has_values ? row_values.typed_data() : nullptr;
  a.recv_counts = recv_counts.typed_data();
  a.slot_expert = slot_expert.typed_data();
  a.slot_pos = slot_pos.typed_data();
  a.sources = *table;
  a.out = has_rows ? out->untyped_data() : nullptr;
  // float32 output of 16-bit rows: unrounded partial sums (the hierarchical backend adds them
  // across hosts).
  a.out_f32 = has_rows && out->element_type() == ffi::DataType::F32;
  if (has_rows && (out->dimensions().size() != 2 || out->dimensions()[0] != kd[0] ||
                   out->dimensions()[1] != rd[2] ||
                   (out->element_type() != rows.element_type() && !a.out_f32))) {
    return InvalidArgument(kLayout,
                           "combine's output must be [T, H] in the rows' type or float32");
  }
  a.slot_values = has_values ? slot_values->typed_data() : nullptr;
  return Launched(padded::LaunchCombine(a, stream), "padded combine");
}

}  // namespace
}  // namespace jax_ep

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpPaddedDispatchCuda, jax_ep::PaddedDispatchImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()          // x [T, H] or absent
        .Arg<ffi::Buffer<ffi::F32>>()   // x_scales [T, S] or absent
        .Arg<ffi::Buffer<ffi::S32>>()   // ids [T, k]: topk_idx or slot_expert
        .Arg<ffi::Buffer<ffi::F32>>()   // slot_values [T, k] or absent
        .Arg<ffi::Buffer<ffi::S32>>()   // sources [2, N] or absent (one source per rank)
        .Ret<ffi::AnyBuffer>()          // rows [E_local, N * M, H] or absent
        .Ret<ffi::Buffer<ffi::F32>>()   // row_values [E_local, N * M] or absent
        .Ret<ffi::Buffer<ffi::F32>>()   // scales [E_local, N * M, S] or absent
        .Ret<ffi::Buffer<ffi::S32>>()   // recv_counts [E_local, N]
        .Ret<ffi::Buffer<ffi::S32>>()   // group_sizes [E_local]
        .Ret<ffi::Buffer<ffi::S32>>()   // num_dropped []
        .Ret<ffi::Buffer<ffi::S32>>()   // slot_expert [T, k]
        .Ret<ffi::Buffer<ffi::S32>>()   // slot_pos [T, k]
        .Attrs<jax_ep::CallAttrs>(),    // group_id, num_sms
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpPaddedCombineCuda, jax_ep::PaddedCombineImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()          // rows [E_local, N * M, H] or absent
        .Arg<ffi::Buffer<ffi::F32>>()   // row_scale [E_local, N * M] or absent
        .Arg<ffi::Buffer<ffi::F32>>()   // row_values [E_local, N * M] or absent
        .Arg<ffi::Buffer<ffi::S32>>()   // recv_counts [E_local, N]
        .Arg<ffi::Buffer<ffi::S32>>()   // slot_expert [T, k]
        .Arg<ffi::Buffer<ffi::S32>>()   // slot_pos [T, k]
        .Arg<ffi::Buffer<ffi::S32>>()   // sources [2, N] or absent (one source per rank)
        .Ret<ffi::AnyBuffer>()          // out [T, H] (rows' type or f32) or absent
        .Ret<ffi::Buffer<ffi::F32>>()   // slot_values [T, k] or absent
        .Attrs<jax_ep::CallAttrs>(),    // group_id, num_sms
    {ffi::Traits::kCmdBufferCompatible});
