"""The padded layout on the cuda backend: custom calls over cuda/padded.cu (calls.py's
padded_dispatch and padded_combine), on the buffers of the group's CudaBackend.

One custom call per operation, one round trip each: senders write rows, weights and fp8 scales
straight to their final padded slot in the receivers' buffers and then a count word tagged with
the call's sequence number; receivers wait only on those words. Redispatch (the VJP of combine)
is the same call with the handle's slot_expert as the routing: it yields the same positions.
"""

from __future__ import annotations

from jax_ep.backends.cuda import calls
from jax_ep.backends.cuda.normal import CudaBackend
from jax_ep.config import CallShape
from jax_ep.types import PaddedHandle


class CudaPaddedOps:
    def __init__(self, backend: CudaBackend):
        self.backend = backend  # the group's CudaBackend: its buffers and config

    def _send(self, x, x_scales, ids, slot_values, sizes: CallShape) -> calls.PaddedDispatchResults:
        return calls.padded_dispatch(
            x, x_scales, ids, slot_values, experts_local=sizes.experts_per_rank,
            num_ranks=sizes.num_ranks, max_tokens=sizes.slots_per_source,
            **self.backend.call_attrs(sizes))

    def dispatch(self, x, topk_idx, topk_weights, sizes: CallShape, x_scales=None):
        """-> (rows, row_weights, group_sizes, num_dropped, handle, scales | None)."""
        out = self._send(x, x_scales, topk_idx, topk_weights, sizes)
        handle = PaddedHandle(slot_expert=out.slot_expert, slot_pos=out.slot_pos,
                              recv_counts=out.recv_counts)
        return out.rows, out.row_values, out.group_sizes, out.num_dropped, handle, out.scales

    def redispatch(self, x, slot_values, handle: PaddedHandle, sizes: CallShape):
        out = self._send(x, None, handle.slot_expert, slot_values, sizes)
        return out.rows, out.row_values

    def combine(self, rows, row_scale, row_values, handle: PaddedHandle, sizes: CallShape):
        return calls.padded_combine(rows, row_scale, row_values, handle.recv_counts,
                                    handle.slot_expert, handle.slot_pos, out_f32=False,
                                    **self.backend.call_attrs(sizes))
