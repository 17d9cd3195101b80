"""The padded (low-latency) layout on the cuda backend: custom calls over cuda/lowlat.cu.

One custom call per operation, one round trip each: senders write rows, weights and fp8 scales
straight to their final padded slot in the receivers' buffers and then a count word tagged with
the call's sequence number; receivers wait only on those words. Redispatch (the VJP of combine)
is the same call with the handle's slot_expert as the routing: it yields the same positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep.config import Sizes
from jax_ep.types import PaddedHandle

_i32, _f32 = jnp.int32, jnp.float32


def _empty(*shape_zeros: int, dtype=_f32):
    return jnp.zeros(shape_zeros, dtype)


class CudaPaddedOps:
    name = "cuda"

    def __init__(self, backend):
        self.backend = backend  # the group's CudaBackend: its custom-call plumbing and buffers

    def _send(self, x, x_scales, ids, slot_values, sizes: Sizes):
        """The dispatch-kind custom call; returns every output (absent ones empty)."""
        t, k = ids.shape
        el, rows = sizes.experts_per_rank, sizes.num_ranks * sizes.slots_per_source
        sds = jax.ShapeDtypeStruct
        out_types = (
            sds((el, rows, x.shape[1]) if x is not None else (0, 0, 0),
                x.dtype if x is not None else _f32),
            sds((el, rows) if slot_values is not None else (0, 0), _f32),
            sds((el, rows, x_scales.shape[1]) if x_scales is not None else (0, 0, 0), _f32),
            sds((el, sizes.num_ranks), _i32), sds((el,), _i32), sds((), _i32),
            sds((t, k), _i32), sds((t, k), _i32))
        return self.backend._call(
            "jax_ep_padded_dispatch", out_types,
            x if x is not None else _empty(0, 0),
            x_scales if x_scales is not None else _empty(0, 0),
            ids,
            slot_values if slot_values is not None else _empty(0))

    def dispatch(self, x, topk_idx, topk_weights, sizes: Sizes, x_scales=None):
        """-> (rows, row_weights, group_sizes, num_dropped, handle, scales | None)."""
        (rows, row_w, scales, recv_counts, group_sizes, num_dropped, slot_expert,
         slot_pos) = self._send(x, x_scales, topk_idx, topk_weights, sizes)
        handle = PaddedHandle(slot_expert=slot_expert, slot_pos=slot_pos, recv_counts=recv_counts)
        return rows, row_w, group_sizes, num_dropped, handle, (
            scales if x_scales is not None else None)

    def redispatch(self, x, slot_values, handle: PaddedHandle, sizes: Sizes):
        rows, values, *_ = self._send(x, None, handle.slot_expert, slot_values, sizes)
        return (rows if x is not None else None), (values if slot_values is not None else None)

    def combine(self, rows, row_scale, row_values, handle: PaddedHandle, sizes: Sizes):
        t, k = sizes.num_tokens, sizes.top_k
        sds = jax.ShapeDtypeStruct
        out, slot_values = self.backend._call(
            "jax_ep_padded_combine",
            (sds((t, rows.shape[-1]) if rows is not None else (0, 0),
                 rows.dtype if rows is not None else _f32),
             sds((t, k) if row_values is not None else (0,), _f32)),
            rows if rows is not None else _empty(0, 0, 0),
            row_scale if row_scale is not None else _empty(0),
            row_values if row_values is not None else _empty(0),
            handle.recv_counts, handle.slot_expert, handle.slot_pos)
        return (out if rows is not None else None), (
            slot_values if row_values is not None else None)
