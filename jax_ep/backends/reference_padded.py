"""The padded (low-latency) layout on the reference backend, in pure JAX collectives.

The same three operations as a backend (see jax_ep/backends/__init__.py), for the padded layout
of docs/padded_layout.md: rows are [E_local, N * M, ...] per rank (M = EPConfig.max_tokens) and the
handle is a PaddedHandle. Each rank scatters its slots into a dense [N, E_local, M, ...] block
(entry d for rank d) and one all_to_all delivers them: E * M rows per rank, as on the GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jax_ep import routing
from jax_ep.backends.reference import sum_slots
from jax_ep.config import CallShape
from jax_ep.types import PaddedHandle


class ReferencePaddedOps:

    def __init__(self, axis_name: str):
        self.axis_name = axis_name

    def _exchange(self, per_peer: jax.Array) -> jax.Array:
        """[N, ...] (entry d goes to rank d) -> [N, ...] (entry s came from rank s)."""
        return lax.all_to_all(per_peer, self.axis_name, 0, 0)

    @staticmethod
    def _flat_target(handle: PaddedHandle, sizes: CallShape) -> jax.Array:
        """[T * k]: slot -> index (e * M + p) into the [E * M] blocks, -1 if not delivered."""
        e = handle.slot_expert.reshape(-1)
        return jnp.where(e >= 0, e * sizes.slots_per_source + handle.slot_pos.reshape(-1), -1)

    def _to_blocks(self, per_slot: jax.Array, handle: PaddedHandle, sizes: CallShape) -> jax.Array:
        """[T * k, ...] per slot -> [E_local, N * M, ...] on the experts' ranks."""
        n, el, m = sizes.num_ranks, sizes.experts_per_rank, sizes.slots_per_source
        rest = per_slot.shape[1:]
        target = self._flat_target(handle, sizes)
        target = jnp.where(target >= 0, target, n * el * m)  # out of range: dropped
        blocks = jnp.zeros((n * el * m,) + rest, per_slot.dtype).at[target].set(
            per_slot, mode="drop")
        arrived = self._exchange(blocks.reshape((n, el, m) + rest))  # [N_src, E_local, M, ...]
        return jnp.moveaxis(arrived, 0, 1).reshape((el, n * m) + rest)

    def _from_blocks(self, blocks: jax.Array, handle: PaddedHandle, sizes: CallShape) -> jax.Array:
        """[E_local, N * M, ...] on the experts' ranks -> [T * k, ...] per slot of the source
        (zero where not delivered)."""
        n, el, m = sizes.num_ranks, sizes.experts_per_rank, sizes.slots_per_source
        rest = blocks.shape[2:]
        per_source = jnp.moveaxis(blocks.reshape((el, n, m) + rest), 1, 0)  # [N_src, El, M]
        arrived = self._exchange(per_source).reshape((n * el * m,) + rest)  # [E * M, ...]
        target = self._flat_target(handle, sizes)
        picked = arrived[jnp.maximum(target, 0)]
        has = (target >= 0).reshape((-1,) + (1,) * len(rest))
        return jnp.where(has, picked, jnp.zeros((), picked.dtype))

    # --- the three operations --------------------------------------------------------------------

    def dispatch(self, x, topk_idx, topk_weights, sizes: CallShape, x_scales=None):
        """-> (rows, row_weights, group_sizes, num_dropped, handle, scales | None)."""
        n, el = sizes.num_ranks, sizes.experts_per_rank
        slot_expert, slot_pos, counts, repeats = routing.padded_slots(topk_idx, sizes)
        meta = jnp.stack([counts, repeats]).reshape(2, n, el).transpose(1, 0, 2)  # [N_dst, 2, El]
        arrived = self._exchange(meta)  # [N_src, 2, E_local]
        recv_counts = arrived[:, 0].T.astype(jnp.int32)  # [E_local, N]
        num_dropped = jnp.sum(arrived[:, 1], dtype=jnp.int32)
        handle = PaddedHandle(slot_expert=slot_expert, slot_pos=slot_pos, recv_counts=recv_counts)
        rows, row_weights = self.redispatch(x, topk_weights, handle, sizes)
        scales = None
        if x_scales is not None:
            scales = self.redispatch(x_scales, None, handle, sizes)[0]
        return rows, row_weights, jnp.sum(recv_counts, axis=1, dtype=jnp.int32), num_dropped, \
            handle, scales

    def redispatch(self, x, slot_values, handle: PaddedHandle, sizes: CallShape):
        rows = row_values = None
        if x is not None:
            rows = self._to_blocks(jnp.repeat(x, sizes.top_k, axis=0), handle, sizes)
        if slot_values is not None:
            row_values = self._to_blocks(slot_values.reshape(-1), handle, sizes)
        return rows, row_values

    def combine(self, rows, row_scale, row_values, handle: PaddedHandle, sizes: CallShape):
        return sum_slots(lambda v: self._from_blocks(v, handle, sizes), handle.slot_expert >= 0,
                         rows, row_scale, row_values, sizes)
