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
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import fp8, validation
from jax_ep import routing
from jax_ep.config import CallShape
from jax_ep.errors import InvalidExpertIdError
from jax_ep.group import EPGroup
from jax_ep.types import Dispatched, Handle, PaddedHandle

_f32 = jnp.float32


def _ops(group: EPGroup, handle) -> object:
    """The group's operations for the layout a handle belongs to (decided at group creation)."""
    return group.ops["padded" if isinstance(handle, PaddedHandle) else "normal"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _redispatch_lin(group: EPGroup, sizes: CallShape, x, slot_values, handle: Handle):
    return _ops(group, handle).redispatch(x, slot_values, handle, sizes)


def _redispatch_fwd(group, sizes, x, slot_values, handle):
    return _redispatch_lin(group, sizes, x, slot_values, handle), handle


def _redispatch_bwd(group, sizes, handle, cts):
    ct_rows, ct_row_values = cts
    ct_x, ct_slot_values = _combine_lin(group, sizes, ct_rows, ct_row_values, handle)
    return ct_x, ct_slot_values, None


_redispatch_lin.defvjp(_redispatch_fwd, _redispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _combine_lin(group: EPGroup, sizes: CallShape, rows, row_values, handle: Handle):
    return _ops(group, handle).combine(rows, None, row_values, handle, sizes)


def _combine_fwd(group, sizes, rows, row_values, handle):
    return _combine_lin(group, sizes, rows, row_values, handle), handle


def _combine_bwd(group, sizes, handle, cts):
    ct_out, ct_slot_values = cts
    ct_rows, ct_row_values = _redispatch_lin(group, sizes, ct_out, ct_slot_values, handle)
    return ct_rows, ct_row_values, None


_combine_lin.defvjp(_combine_fwd, _combine_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _combine_weighted(group: EPGroup, sizes: CallShape, rows, weights, handle: Handle):
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


def _backend_dispatch(group: EPGroup, sizes: CallShape, layout_name: str, x, topk_idx,
                      topk_weights, x_scales):
    """-> (rows, row_weights, group_sizes, num_dropped, handle, scales | None, num_invalid).

    The normal layout's backends count the invalid ids themselves (the cuda kernels while they
    read the ids anyway, so the count costs no kernel of its own)."""
    if layout_name == "padded":
        return group.ops["padded"].dispatch(x, topk_idx, topk_weights, sizes, x_scales) + (
            routing.count_invalid(topk_idx, sizes.num_experts),)
    normal = group.ops["normal"]
    rows, row_weights, group_sizes, num_dropped, handle, num_invalid = normal.dispatch(
        x, topk_idx, topk_weights, sizes)
    scales = None
    if x_scales is not None:
        # A second payload along the routing just made.
        scales = normal.redispatch(x_scales, None, handle, sizes)[0]
    return rows, row_weights, group_sizes, num_dropped, handle, scales, num_invalid


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _dispatch(group: EPGroup, sizes: CallShape, layout_name: str, x, topk_idx, topk_weights,
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


def _raise_invalid_ids(rank, per_rank, *, num_experts: int, top_k: int, axis_name: str,
                       reporter: int) -> np.ndarray:
    """Host side of EPConfig.debug, on every rank of the EP axis; returns 0 if all ids are valid.

    Args:
      rank: [] this rank's index along the axis.
      per_rank: [N, 3] int32, the same on every rank: (invalid ids, flat slot t * k + j of the
        first, its id) of each rank.
      reporter: the rank whose error is logged in this process; the others raise too, as echoes.
    """
    counts, first_slot, first_id = np.asarray(per_rank).T
    bad_ranks = np.flatnonzero(counts)
    if not bad_ranks.size:
        return np.zeros((), np.int32)
    r = int(bad_ranks[0])
    t, j = divmod(int(first_slot[r]), top_k)
    ranks = str(bad_ranks[:8].tolist())[:-1] + (", ...]" if bad_ranks.size > 8 else "]")
    err = InvalidExpertIdError(
        f"jax_ep.dispatch: topk_idx holds expert ids outside [-1, {num_experts}): "
        f"{int(counts.sum())} in all, on ranks {ranks} of axis {axis_name!r}; the "
        f"first: topk_idx[{t}, {j}] = {int(first_id[r])} on rank {r} (token {t}, slot {j}). "
        f"Valid ids are -1 (unrouted) and 0..{num_experts - 1}. EPConfig(debug=True) raised "
        f"this; without it they count in Dispatched.num_invalid and act as -1")
    # Every rank raises: one that carried on would wait forever in dispatch's collectives for
    # those that stopped. Only the reporter's traceback is logged (see _DropEchoes).
    err.echo = int(rank) != reporter
    raise err


class _DropEchoes(logging.Filter):
    """JAX logs the traceback of every failing callback: keep one per process."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, InvalidExpertIdError) and exc.echo)


# By name: a filter on a logger JAX renames does nothing (more tracebacks), breaks nothing.
logging.getLogger("jax._src.callback").addFilter(_DropEchoes())


def _reporting_rank(group: EPGroup) -> int:
    """The lowest rank along the EP axis whose device this process drives."""
    axis = group.mesh.axis_names.index(group.axis_name)
    me = jax.process_index()
    return min(idx[axis] for idx, dev in np.ndenumerate(group.mesh.devices)
               if dev.process_index == me)


def _checked_ids(group: EPGroup, topk_idx: jax.Array) -> jax.Array:
    """EPConfig.debug: topk_idx [T, k] unchanged, but only once a host check of every rank's ids
    passed; it raises InvalidExpertIdError on every rank otherwise.

    A pure_callback carries no effect, so it is allowed under jax.checkpoint (an io_callback's
    IOEffect is not), and making dispatch consume its result orders every collective of
    dispatch (and of its VJP) after the check: all ranks stop there, none waits in a collective
    for a rank that stopped. Its inputs are integers, so it needs no JVP rule.
    """
    num_experts, top_k = group.config.num_experts, group.config.top_k
    flat = topk_idx.reshape(-1)
    bad = (flat < -1) | (flat >= num_experts)
    first = jnp.argmax(bad).astype(jnp.int32) if flat.shape[0] else jnp.int32(0)
    first_id = flat[first] if flat.shape[0] else jnp.int32(0)
    mine = jnp.stack([jnp.sum(bad, dtype=jnp.int32), first, first_id])
    zero = jax.pure_callback(
        functools.partial(_raise_invalid_ids, num_experts=num_experts, top_k=top_k,
                          axis_name=group.axis_name, reporter=_reporting_rank(group)),
        jax.ShapeDtypeStruct((), jnp.int32), jax.lax.axis_index(group.axis_name),
        jax.lax.all_gather(mine, group.axis_name), vmap_method="sequential")
    return topk_idx + zero


def dispatch(group: EPGroup, x: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array,
             layout: str = "normal", x_scales: jax.Array | None = None,
             num_sms: int | None = None) -> Dispatched:
    """Sends each token to the ranks holding its top-k experts. Call inside shard_map.

    Args (per rank):
      group: the EPGroup of the mesh axis this shard_map runs over.
      x: [T, H] bfloat16 | float16 | float32 tokens, or float8_e4m3fn with x_scales.
      topk_idx: [T, k] int32 expert ids in [-1, E); -1 = slot not routed.
      topk_weights: [T, k] float32 routing weights.
      layout: "normal" (rows packed expert-major, sized by a count exchange) or "padded" (the
        static low-latency layout: one round trip, for decoding; needs
        EPConfig(padded_layout=True)).
      x_scales: with an fp8 x, its [T, H/128] float32 scales (jax_ep.quantize_fp8); they travel
        with the rows and come back in Dispatched.scales.
      num_sms: thread blocks of the cuda kernels for this call (default EPConfig.num_sms); the
        SMs left over run what overlaps it (the experts' GEMMs). Its VJP runs with the same.

    Returns a Dispatched. Normal layout: x [C, H] rows expert-major in (local expert, source
    rank, source token, slot) order, weights [C] f32. Padded layout: x [E_local, N * M, H] with
    the rows of source s for local expert l at [l, s * M + p], weights [E_local, N * M],
    recv_counts [E_local, N] (M = EPConfig.max_tokens). Both: group_sizes [E_local] int32,
    num_dropped [] int32, num_invalid [] int32 and the handle for combine. Differentiable in x
    (unless fp8) and topk_weights.
    """
    sizes = validation.check_dispatch(group, x, topk_idx, topk_weights, x_scales, layout,
                                      num_sms)
    if group.config.debug:
        topk_idx = _checked_ids(group, topk_idx)
    rows, row_weights, group_sizes, num_dropped, handle, scales, num_invalid = _dispatch(
        group, sizes, layout, x, topk_idx, topk_weights, x_scales)
    recv_counts = handle.recv_counts if layout == "padded" else None
    return Dispatched(x=rows, weights=row_weights, group_sizes=group_sizes,
                      num_dropped=num_dropped, num_invalid=num_invalid, handle=handle,
                      scales=scales, recv_counts=recv_counts)


def combine(group: EPGroup, rows: jax.Array, handle: Handle | PaddedHandle,
            weights: jax.Array | None = None, num_sms: int | None = None) -> jax.Array:
    """Brings rows back to their source tokens and sums them. Call inside shard_map.

    Args (per rank):
      rows: [C, H] rows in the layout dispatch produced (e.g. the experts' outputs); with a
        padded-layout handle, [E_local, N * M, H] (rows past recv_counts are ignored).
      handle: Dispatched.handle of that dispatch.
      weights: optional per-row float32 weights (Dispatched.weights: [C], or [E_local, N * M])
        fused into the sum.
      num_sms: thread blocks of the cuda kernels for this call (default EPConfig.num_sms).

    Returns [T, H] in rows.dtype: out[t] = sum over t's delivered slots, in slot order, of
    weights[r] * rows[r] accumulated in float32. Differentiable in rows and weights.
    """
    validation.check_handle(handle)
    if isinstance(handle, PaddedHandle):
        sizes = validation.check_padded_combine(group, rows, handle, weights, num_sms)
    else:
        sizes = validation.check_combine(group, rows, handle, weights, num_sms)
    if weights is None:
        return _combine_lin(group, sizes, rows, None, handle)[0]
    return _combine_weighted(group, sizes, rows, weights, handle)
