"""The reference backend: the contract in pure JAX collectives (all_gather, all_to_all).

Runs wherever JAX runs and is the oracle the cuda backend is tested against. Each rank sends a
dense stream of T * k slots to every peer (slot t * k + j at position t * k + j, zero where the
slot goes elsewhere), so the memory is N * T * k * H per rank: simple and exact, not fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jax_ep import routing
from jax_ep.backends import NoDeviceState
from jax_ep.config import CallShape
from jax_ep.types import Handle


class ReferenceBackend(NoDeviceState):

    def __init__(self, axis_name: str):
        self.axis_name = axis_name

    def check_row_width(self, op: str, hidden: int, dtype) -> None:
        """Any hidden size and supported dtype works here; EPConfig.portable (checked in
        jax_ep/validation.py for every backend) holds calls to the cuda kernels' rows."""

    # --- streams: [S, ...] per-slot values <-> [N, S, ...] per-peer exchange ---------------------

    def _exchange(self, per_peer: jax.Array) -> jax.Array:
        """[N, S, ...] (entry d goes to rank d) -> [N, S, ...] (entry s came from rank s)."""
        return lax.all_to_all(per_peer, self.axis_name, 0, 0)

    def _send_slots(self, slot_values: jax.Array, dest_rank: jax.Array, num_ranks: int):
        """Slot f's value to rank dest_rank[f], at stream position f; returns what arrived."""
        mask = dest_rank[None, :] == jnp.arange(num_ranks, dtype=jnp.int32)[:, None]
        mask = mask.reshape(mask.shape + (1,) * (slot_values.ndim - 1))
        return self._exchange(jnp.where(mask, slot_values[None], jnp.zeros((), slot_values.dtype)))

    @staticmethod
    def _rows_from_streams(streams: jax.Array, row_src: jax.Array) -> jax.Array:
        """Row r takes stream entry row_src[r] (flattened [N * S]); rows with -1 are zero."""
        flat = streams.reshape((streams.shape[0] * streams.shape[1],) + streams.shape[2:])
        has = row_src >= 0
        picked = flat[jnp.where(has, row_src, 0)]
        has = has.reshape(has.shape + (1,) * (flat.ndim - 1))
        return jnp.where(has, picked, jnp.zeros((), flat.dtype))

    # --- the three operations --------------------------------------------------------------------

    def dispatch(self, x, topk_idx, topk_weights, sizes: CallShape):
        dest_rank, dest_row, group_sizes, num_recv, num_dropped = routing.route(
            topk_idx, self.axis_name, sizes)

        # Receivers learn which slot each row holds from a stream of the rows' indices (+ 1, so
        # that the zeros of slots sent elsewhere read as "no row").
        arrived_row = self._send_slots(dest_row.reshape(-1) + 1, dest_rank.reshape(-1),
                                       sizes.num_ranks).reshape(-1) - 1
        target = jnp.where(arrived_row >= 0, arrived_row, sizes.capacity)
        row_src = jnp.full(sizes.capacity, -1, jnp.int32).at[target].set(
            jnp.arange(arrived_row.shape[0], dtype=jnp.int32), mode="drop")

        handle = Handle(dest_rank=dest_rank, dest_row=dest_row, row_src=row_src,
                        num_recv=num_recv)
        rows, row_weights = self.redispatch(x, topk_weights, handle, sizes)
        num_invalid = routing.count_invalid(topk_idx, sizes.num_experts)
        return rows, row_weights, group_sizes, num_dropped, handle, num_invalid

    def redispatch(self, x, slot_values, handle: Handle, sizes: CallShape):
        dest_rank = handle.dest_rank.reshape(-1)
        rows = row_values = None
        if x is not None:
            per_slot = jnp.repeat(x, sizes.top_k, axis=0)  # [T * k, H]
            rows = self._rows_from_streams(
                self._send_slots(per_slot, dest_rank, sizes.num_ranks), handle.row_src)
        if slot_values is not None:
            row_values = self._rows_from_streams(
                self._send_slots(slot_values.reshape(-1), dest_rank, sizes.num_ranks),
                handle.row_src)
        return rows, row_values

    def _return_to_slots(self, row_values: jax.Array, handle: Handle, sizes: CallShape):
        """Row r's value back to its source slot; [T * k, ...] per slot, zero if not delivered."""
        n, s = sizes.num_ranks, sizes.num_slots
        has = handle.row_src >= 0
        # stream_row[d * S + f]: the row of this rank that holds rank d's slot f.
        stream_row = jnp.full(n * s, -1, jnp.int32).at[
            jnp.where(has, handle.row_src, n * s)].set(
                jnp.arange(handle.row_src.shape[0], dtype=jnp.int32), mode="drop")
        back = self._rows_from_streams(row_values[None], stream_row).reshape(
            (n, s) + row_values.shape[1:])
        arrived = self._exchange(back)  # [N_dest, S, ...]: rank d's answer for my slot f
        dest_rank = handle.dest_rank.reshape(-1)
        delivered = dest_rank >= 0
        picked = arrived[jnp.where(delivered, dest_rank, 0), jnp.arange(s)]
        delivered = delivered.reshape(delivered.shape + (1,) * (picked.ndim - 1))
        return jnp.where(delivered, picked, jnp.zeros((), picked.dtype))

    def combine(self, rows, row_scale, row_values, handle: Handle, sizes: CallShape):
        return sum_slots(lambda v: self._return_to_slots(v, handle, sizes),
                         handle.dest_rank >= 0, rows, row_scale, row_values, sizes)


def sum_slots(to_slots, delivered, rows, row_scale, row_values, sizes: CallShape,
              out_dtype=None):
    """Combine's arithmetic once rows can be brought back to their slots, for every layout.

    to_slots maps per-row values [rows..., ...] to per-slot ones [T * k, ...] (zero where the
    slot was not delivered); delivered is [T, k] bool. Returns (out [T, H] in out_dtype, default
    rows.dtype: each token's delivered slots, scaled by row_scale, summed in float32 in slot
    order; slot_values [T, k]: row_values back at their slots), each None when its input is.
    """
    t, k = sizes.num_tokens, sizes.top_k
    out = slot_values = None
    if rows is not None:
        contrib = to_slots(rows).astype(jnp.float32)
        if row_scale is not None:
            contrib = to_slots(row_scale.astype(jnp.float32))[:, None] * contrib
        contrib = contrib.reshape(t, k, rows.shape[-1])
        acc = jnp.zeros((t, contrib.shape[-1]), jnp.float32)
        for j in range(k):  # fixed summation order: slot 0, 1, ..., k - 1
            acc = jnp.where(delivered[:, j, None], acc + contrib[:, j], acc)
        out = acc.astype(out_dtype or rows.dtype)
    if row_values is not None:
        slot_values = to_slots(row_values).reshape(t, k)
    return out, slot_values
