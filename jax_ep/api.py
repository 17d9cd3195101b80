"""dispatch and combine: the public operations, and the custom_vjp rules that make them each
other's adjoint.

Three linear maps along a routing (its Handle) carry everything, each differentiable through
the other (so gradients of any order work):
  _redispatch_lin(x [T, H], slot_values [T, k]) -> (rows [C, H], row_values [C])
  _combine_lin(rows [C, H], row_values [C]) -> (sum over slots of rows [T, H],
                                                 row_values back per slot [T, k])
and the fused weighted combine, bilinear in (rows, weights). The padded layout (a PaddedHandle;
rows [E_local, N * M, H], row values [E_local, N * M]) goes through the same maps, computed by
the group's padded-layout operations instead of its backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jax_ep import fp8, validation
from jax_ep import layout as layout_math
from jax_ep.backends.padded import padded_ops
from jax_ep.config import Sizes
from jax_ep.group import EPGroup
from jax_ep.types import Dispatched, Handle, PaddedHandle

_f32 = jnp.float32


def _ops(group: EPGroup, routing) -> object:
    """The operations for a routing: a PaddedHandle (or layout "padded") or the normal layout."""
    if isinstance(routing, PaddedHandle) or routing == "padded":
        return padded_ops(group)
    return group.backend


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _redispatch_lin(group: EPGroup, sizes: Sizes, x, slot_values, handle: Handle):
    return _ops(group, handle).redispatch(x, slot_values, handle, sizes)


def _redispatch_fwd(group, sizes, x, slot_values, handle):
    return _redispatch_lin(group, sizes, x, slot_values, handle), handle


def _redispatch_bwd(group, sizes, handle, cts):
    ct_rows, ct_row_values = cts
    ct_x, ct_slot_values = _combine_lin(group, sizes, ct_rows, ct_row_values, handle)
    return ct_x, ct_slot_values, None


_redispatch_lin.defvjp(_redispatch_fwd, _redispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _combine_lin(group: EPGroup, sizes: Sizes, rows, row_values, handle: Handle):
    return _ops(group, handle).combine(rows, None, row_values, handle, sizes)


def _combine_fwd(group, sizes, rows, row_values, handle):
    return _combine_lin(group, sizes, rows, row_values, handle), handle


def _combine_bwd(group, sizes, handle, cts):
    ct_out, ct_slot_values = cts
    ct_rows, ct_row_values = _redispatch_lin(group, sizes, ct_out, ct_slot_values, handle)
    return ct_rows, ct_row_values, None


_combine_lin.defvjp(_combine_fwd, _combine_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _combine_weighted(group: EPGroup, sizes: Sizes, rows, weights, handle: Handle):
    return _ops(group, handle).combine(rows, weights, None, handle, sizes)[0]


def _combine_weighted_fwd(group, sizes, rows, weights, handle):
    return _combine_weighted(group, sizes, rows, weights, handle), (rows, weights, handle)


def _combine_weighted_bwd(group, sizes, residuals, ct_out):
    rows, weights, handle = residuals
    # out[t] = sum_j w[r] * rows[r]: the cotangent of each row is w[r] * ct_out[t], and that of
    # w[r] is <ct_out[t], rows[r]>; ct_out[t] reaches row r by a dispatch along the routing.
    ct_at_rows, _ = _redispatch_lin(group, sizes, ct_out, None, handle)
    ct_at_rows = ct_at_rows.astype(_f32)
    ct_rows = (weights[..., None] * ct_at_rows).astype(rows.dtype)
    ct_weights = jnp.sum(ct_at_rows * rows.astype(_f32), axis=-1)
    return ct_rows, ct_weights, None


_combine_weighted.defvjp(_combine_weighted_fwd, _combine_weighted_bwd)


def _backend_dispatch(group: EPGroup, sizes: Sizes, layout_name: str, x, topk_idx,
                      topk_weights, x_scales):
    """-> (rows, row_weights, group_sizes, num_dropped, handle, scales | None, num_invalid).

    The normal layout's backends count the invalid ids themselves (the cuda kernels while they
    read the ids anyway, so the count costs no kernel of its own)."""
    if layout_name == "padded":
        return padded_ops(group).dispatch(x, topk_idx, topk_weights, sizes, x_scales) + (
            layout_math.count_invalid(topk_idx, sizes.num_experts),)
    rows, row_weights, group_sizes, num_dropped, handle, num_invalid = group.backend.dispatch(
        x, topk_idx, topk_weights, sizes)
    scales = None
    if x_scales is not None:
        # A second payload along the routing just made (rows of whole 16-byte vectors).
        cols = x_scales.shape[1]
        scales = group.backend.redispatch(fp8.pad_scale_cols(x_scales), None, handle,
                                          sizes)[0][:, :cols]
    return rows, row_weights, group_sizes, num_dropped, handle, scales, num_invalid


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _dispatch(group: EPGroup, sizes: Sizes, layout_name: str, x, topk_idx, topk_weights,
              x_scales):
    return _backend_dispatch(group, sizes, layout_name, x, topk_idx, topk_weights, x_scales)


def _dispatch_fwd(group, sizes, layout_name, x, topk_idx, topk_weights, x_scales):
    out = _dispatch(group, sizes, layout_name, x, topk_idx, topk_weights, x_scales)
    quantised = (x, x_scales) if fp8.is_fp8(x) else None
    return out, (out[4], quantised)


def _dispatch_bwd(group, sizes, layout_name, residuals, cts):
    handle, quantised = residuals
    ct_rows, ct_row_weights = cts[0], cts[1]
    if quantised is not None:
        # Quantised tokens carry no gradient (documented): only the routing weights get one.
        x, x_scales = quantised
        _, ct_weights = _combine_lin(group, sizes, None, ct_row_weights, handle)
        return jnp.zeros_like(x), None, ct_weights, jnp.zeros_like(x_scales)
    ct_x, ct_weights = _combine_lin(group, sizes, ct_rows, ct_row_weights, handle)
    return ct_x, None, ct_weights, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


def _raise_invalid_ids(num_invalid, first_bad, *, num_experts: int) -> None:
    """Host side of EPConfig.debug: num_invalid and first_bad hold one entry per rank."""
    bad_ranks = np.flatnonzero(np.asarray(num_invalid))
    if bad_ranks.size:
        r = int(bad_ranks[0])
        raise ValueError(
            f"jax_ep.dispatch: topk_idx holds expert ids outside [-1, {num_experts}): "
            f"{int(np.sum(num_invalid))} in all, e.g. {int(first_bad[r])} on rank {r}; valid ids "
            f"are -1 (unrouted) and 0..{num_experts - 1} (EPConfig.debug=True raised this; "
            f"without it they count as -1)")


def _check_ids_on_host(group: EPGroup, topk_idx, num_invalid) -> None:
    """EPConfig.debug: every rank gathers the counts and raises together, so no rank is left
    waiting in a collective for one that failed."""
    num_experts = group.config.num_experts
    bad = ((topk_idx < -1) | (topk_idx >= num_experts)).reshape(-1)
    first_bad = topk_idx.reshape(-1)[jnp.argmax(bad)] if bad.shape[0] else jnp.int32(0)
    io_callback(functools.partial(_raise_invalid_ids, num_experts=num_experts), None,
                jax.lax.all_gather(num_invalid, group.axis_name),
                jax.lax.all_gather(first_bad, group.axis_name))


def dispatch(group: EPGroup, x: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array,
             layout: str = "normal", x_scales: jax.Array | None = None) -> Dispatched:
    """Sends each token to the ranks holding its top-k experts. Call inside shard_map.

    Args (per rank):
      group: the EPGroup of the mesh axis this shard_map runs over.
      x: [T, H] bfloat16 | float16 | float32 tokens, or float8_e4m3fn with x_scales.
      topk_idx: [T, k] int32 expert ids in [-1, E); -1 = slot not routed.
      topk_weights: [T, k] float32 routing weights.
      layout: "normal" (rows packed expert-major, sized by a count exchange) or "padded" (the
        static low-latency layout: one round trip, for decoding; needs
        EPConfig(low_latency=True)).
      x_scales: with an fp8 x, its [T, H/128] float32 scales (jax_ep.quantize_fp8); they travel
        with the rows and come back in Dispatched.scales.

    Returns a Dispatched. Normal layout: x [C, H] rows expert-major in (local expert, source
    rank, source token, slot) order, weights [C] f32. Padded layout: x [E_local, N * M, H] with
    the rows of source s for local expert l at [l, s * M + p], weights [E_local, N * M],
    recv_counts [E_local, N] (M = EPConfig.max_tokens). Both: group_sizes [E_local] int32,
    num_dropped [] int32, num_invalid [] int32 and the handle for combine. Differentiable in x
    (unless fp8) and topk_weights.
    """
    sizes = validation.check_dispatch(group, x, topk_idx, topk_weights, x_scales, layout)
    rows, row_weights, group_sizes, num_dropped, handle, scales, num_invalid = _dispatch(
        group, sizes, layout, x, topk_idx, topk_weights, x_scales)
    if group.config.debug:
        _check_ids_on_host(group, topk_idx, num_invalid)
    recv_counts = handle.recv_counts if layout == "padded" else None
    return Dispatched(x=rows, weights=row_weights, group_sizes=group_sizes,
                      num_dropped=num_dropped, num_invalid=num_invalid, handle=handle,
                      scales=scales, recv_counts=recv_counts)


def combine(group: EPGroup, rows: jax.Array, handle: Handle | PaddedHandle,
            weights: jax.Array | None = None) -> jax.Array:
    """Brings rows back to their source tokens and sums them. Call inside shard_map.

    Args (per rank):
      rows: [C, H] rows in the layout dispatch produced (e.g. the experts' outputs); with a
        padded-layout handle, [E_local, N * M, H] (rows past recv_counts are ignored).
      handle: Dispatched.handle of that dispatch.
      weights: optional per-row float32 weights (Dispatched.weights: [C], or [E_local, N * M])
        fused into the sum.

    Returns [T, H] in rows.dtype: out[t] = sum over t's delivered slots, in slot order, of
    weights[r] * rows[r] accumulated in float32. Differentiable in rows and weights.
    """
    if isinstance(handle, PaddedHandle):
        sizes = validation.check_padded_combine(group, rows, handle, weights)
    else:
        sizes = validation.check_combine(group, rows, handle, weights)
    if weights is None:
        return _combine_lin(group, sizes, rows, None, handle)[0]
    return _combine_weighted(group, sizes, rows, weights, handle)
