"""The cuda backend's FFI targets, one typed function each: operands in the order of the
handler's Bind (ffi/normal_handlers.cc, ffi/padded_handlers.cc), then the static sizes of its
results, then its attributes (group_id, num_sms). Called inside shard_map.

An optional operand or result the caller does not use is absent: an empty array (absent()),
which the handler reads as a null pointer; the functions return None for absent results.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep._vma import make_varying, varying_axes

_i32, _f32 = jnp.int32, jnp.float32
_VECTOR_BYTES = 16  # the kernels copy rows in 16-byte vectors


def absent(ndim: int, dtype=_f32) -> jax.Array:
    """An absent optional operand of `ndim` dimensions, in the element type of its Bind slot (the
    handler checks operands' ranks, and XLA the types of typed buffers)."""
    return jnp.zeros((0,) * ndim, dtype)


def _operand(a: jax.Array | None, ndim: int, dtype=_f32) -> jax.Array:
    return a if a is not None else absent(ndim, dtype)


def _result(shape: tuple[int, ...], dtype, present: bool) -> jax.ShapeDtypeStruct:
    """A result of `shape`, or an absent one of its rank (in `dtype`: the handler checks the
    element type of its typed results)."""
    return jax.ShapeDtypeStruct(shape if present else (0,) * len(shape), dtype)


def _call(target: str, results, operands, group_id: int, num_sms: int) -> list[jax.Array]:
    axes = varying_axes(*operands)
    operands = [make_varying(a, axes) for a in operands]
    # Not marked side-effecting (that would take JAX off its fast dispatch path): every rank
    # runs the same compiled program, so whatever XLA drops, merges or reorders, it does the
    # same on all ranks and the device-side sequence numbers stay in step.
    outs = jax.ffi.ffi_call(target, results)(*operands, group_id=np.int64(group_id),
                                             num_sms=np.int64(num_sms))
    return [make_varying(o, axes) for o in outs]


def _whole_vectors(x: jax.Array) -> jax.Array:
    """[R, W] padded to rows of whole 16-byte vectors; rows that are already whole (every row
    a caller's check admits) are returned as they are."""
    per_vector = _VECTOR_BYTES // math.gcd(_VECTOR_BYTES, x.dtype.itemsize)
    extra = -x.shape[1] % per_vector
    return jnp.pad(x, ((0, 0), (0, extra))) if extra else x


# --- normal layout ---------------------------------------------------------------------------


class DispatchResults(NamedTuple):
    rows: jax.Array         # [C, H]
    row_weights: jax.Array  # [C] f32
    group_sizes: jax.Array  # [E_local] i32
    num_dropped: jax.Array  # [] i32
    dest_rank: jax.Array    # [T, k] i32
    dest_row: jax.Array     # [T, k] i32
    row_src: jax.Array      # [C] i32
    num_recv: jax.Array     # [] i32
    num_invalid: jax.Array  # [] i32


def dispatch(x: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array, *, capacity: int,
             experts_local: int, group_id: int, num_sms: int) -> DispatchResults:
    """jax_ep_dispatch: x [T, H], topk_idx [T, k] i32, topk_weights [T, k] f32 -> the rows of
    this rank's experts and the routing, after the routing pass and count exchange."""
    (t, h), k = x.shape, topk_idx.shape[1]
    results = (_result((capacity, h), x.dtype, True), _result((capacity,), _f32, True),
               _result((experts_local,), _i32, True), _result((), _i32, True),
               _result((t, k), _i32, True), _result((t, k), _i32, True),
               _result((capacity,), _i32, True), _result((), _i32, True),
               _result((), _i32, True))
    return DispatchResults(*_call("jax_ep_dispatch", results, (x, topk_idx, topk_weights),
                                  group_id, num_sms))


def redispatch(x: jax.Array | None, slot_values: jax.Array | None, dest_rank: jax.Array,
               dest_row: jax.Array, num_recv: jax.Array, *, capacity: int, with_row_src: bool,
               group_id: int, num_sms: int):
    """jax_ep_redispatch: x [T, W] | None and slot_values [T, k] f32 | None along a routing
    (dest_rank, dest_row [T, k], num_recv []) -> (rows [C, W] | None, row_values [C] | None,
    row_src [C] | None, the latter when with_row_src).

    Rows of any width move: the kernels copy whole 16-byte vectors, so narrower rows (an fp8
    dispatch's scales, H / 128 float32 each) travel padded to them and are cut back here."""
    width = x.shape[1] if x is not None else 0
    if x is not None:
        x = _whole_vectors(x)
    results = (_result((capacity, x.shape[1] if x is not None else 0),
                       x.dtype if x is not None else _f32, x is not None),
               _result((capacity,), _f32, slot_values is not None),
               _result((capacity,), _i32, with_row_src))
    rows, row_values, row_src = _call(
        "jax_ep_redispatch", results,
        (_operand(x, 2), _operand(slot_values, 2), dest_rank, dest_row, num_recv),
        group_id, num_sms)
    if x is not None and x.shape[1] != width:
        rows = rows[:, :width]
    return (rows if x is not None else None,
            row_values if slot_values is not None else None,
            row_src if with_row_src else None)


def combine(rows: jax.Array | None, row_scale: jax.Array | None, row_values: jax.Array | None,
            dest_rank: jax.Array, dest_row: jax.Array, row_src: jax.Array, num_recv: jax.Array,
            *, out_f32: bool, group_id: int, num_sms: int):
    """jax_ep_combine: rows [C, H] | None, row_scale [C] f32 | None, row_values [C] f32 | None
    back along a routing (dest_rank, dest_row [T, k], row_src [C], num_recv []) -> (out [T, H]
    | None: per token, the sum over its slots in slot order in float32, times row_scale;
    slot_values [T, k] f32 | None). out is in the rows' type, or float32 when out_f32 (unrounded
    partial sums, which the hierarchical backend adds across hosts)."""
    t, k = dest_rank.shape
    results = (_result((t, rows.shape[1]) if rows is not None else (0, 0),
                       _f32 if out_f32 or rows is None else rows.dtype, rows is not None),
               _result((t, k), _f32, row_values is not None))
    out, slot_values = _call(
        "jax_ep_combine", results,
        (_operand(rows, 2), _operand(row_scale, 1), _operand(row_values, 1), dest_rank,
         dest_row, row_src, num_recv),
        group_id, num_sms)
    return (out if rows is not None else None,
            slot_values if row_values is not None else None)


# --- padded layout ---------------------------------------------------------------------------


class PaddedDispatchResults(NamedTuple):
    rows: jax.Array | None        # [E_local, N * M, H]
    row_values: jax.Array | None  # [E_local, N * M] f32
    scales: jax.Array | None      # [E_local, N * M, S] f32
    recv_counts: jax.Array        # [E_local, N] i32
    group_sizes: jax.Array        # [E_local] i32
    num_dropped: jax.Array        # [] i32
    slot_expert: jax.Array        # [T, k] i32
    slot_pos: jax.Array           # [T, k] i32


def padded_dispatch(x: jax.Array | None, x_scales: jax.Array | None, ids: jax.Array,
                    slot_values: jax.Array | None, sources: jax.Array | None = None, *,
                    experts_local: int, num_ranks: int, max_tokens: int, group_id: int,
                    num_sms: int) -> PaddedDispatchResults:
    """jax_ep_padded_dispatch: x [T, H] | None, x_scales [T, S] f32 | None, ids [T, k] i32
    (topk_idx, or a PaddedHandle's slot_expert to move along its routing), slot_values [T, k]
    f32 | None -> each delivered slot at its (expert, source) block position, M = max_tokens
    rows per block, num_ranks = N source blocks.

    sources [2, N] i32 | None: in a host group of the hierarchical backend each rank sends for
    several sources, segments of T tokens of the [T, ...] operands (cuda/api.h says how the
    table numbers them); None where each rank sends for itself (the cuda backend)."""
    t, k = ids.shape
    el, rows = experts_local, num_ranks * max_tokens
    results = (
        _result((el, rows, x.shape[1] if x is not None else 0),
                x.dtype if x is not None else _f32, x is not None),
        _result((el, rows), _f32, slot_values is not None),
        _result((el, rows, x_scales.shape[1] if x_scales is not None else 0), _f32,
                x_scales is not None),
        _result((el, num_ranks), _i32, True), _result((el,), _i32, True),
        _result((), _i32, True), _result((t, k), _i32, True), _result((t, k), _i32, True))
    out = _call("jax_ep_padded_dispatch", results,
                (_operand(x, 2), _operand(x_scales, 2), ids, _operand(slot_values, 1),
                 _operand(sources, 2, _i32)),
                group_id, num_sms)
    return PaddedDispatchResults(
        out[0] if x is not None else None, out[1] if slot_values is not None else None,
        out[2] if x_scales is not None else None, *out[3:])


def padded_combine(rows: jax.Array | None, row_scale: jax.Array | None,
                   row_values: jax.Array | None, recv_counts: jax.Array, slot_expert: jax.Array,
                   slot_pos: jax.Array, sources: jax.Array | None = None, *, out_f32: bool,
                   group_id: int, num_sms: int):
    """jax_ep_padded_combine: rows [E_local, N * M, H] | None, row_scale and row_values
    [E_local, N * M] f32 | None back along a PaddedHandle (recv_counts, slot_expert, slot_pos)
    -> (out [T, H] | None, slot_values [T, k] f32 | None). out is in the rows' type, or float32
    when out_f32 (unrounded partial sums, which the hierarchical backend adds across hosts).
    sources as for padded_dispatch."""
    t, k = slot_expert.shape
    results = (_result((t, rows.shape[-1]) if rows is not None else (0, 0),
                       _f32 if out_f32 or rows is None else rows.dtype, rows is not None),
               _result((t, k), _f32, row_values is not None))
    out, slot_values = _call(
        "jax_ep_padded_combine", results,
        (_operand(rows, 3), _operand(row_scale, 1), _operand(row_values, 1), recv_counts,
         slot_expert, slot_pos, _operand(sources, 2, _i32)),
        group_id, num_sms)
    return (out if rows is not None else None,
            slot_values if row_values is not None else None)
