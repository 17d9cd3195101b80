"""The normal layout on the cuda backend (the three operations of jax_ep/backends/__init__.py):
one rank group per EP slice of the mesh, its buffers in state.py, its custom calls in calls.py."""

from __future__ import annotations

from jax.sharding import Mesh

from jax_ep.backends.cuda import calls
from jax_ep.backends.cuda.state import (BufferLimits, CudaGroupState, StateOwner,
                                        require_buffer_sizes)
from jax_ep.config import EPConfig, CallShape
from jax_ep.coordination import GroupCoordinator
from jax_ep.topology import ep_slices
from jax_ep.types import Handle


class CudaBackend(StateOwner):
    def __init__(self, mesh: Mesh, axis_name: str, config: EPConfig,
                 coordinator: GroupCoordinator):
        require_buffer_sizes(config, "EPGroup(backend='cuda')")
        self.config = config
        self.num_ranks = mesh.shape[axis_name]
        if self.num_ranks * config.max_tokens * config.top_k >= 2**31:
            raise ValueError("EPGroup(backend='cuda'): N * max_tokens * top_k must be < 2**31")
        limits = BufferLimits.of(config, config.max_tokens,
                                 config.capacity_rows(self.num_ranks, config.max_tokens))
        self.state = CudaGroupState(list(ep_slices(mesh, axis_name).values()), limits,
                                    coordinator)

    def dispatch(self, x, topk_idx, topk_weights, sizes: CallShape):
        out = calls.dispatch(x, topk_idx, topk_weights, capacity=sizes.capacity,
                             experts_local=sizes.experts_per_rank, **self.call_attrs(sizes))
        handle = Handle(dest_rank=out.dest_rank, dest_row=out.dest_row, row_src=out.row_src,
                        num_recv=out.num_recv)
        # The routing pass counts the invalid ids as it reads them: no extra kernel for them.
        return (out.rows, out.row_weights, out.group_sizes, out.num_dropped, handle,
                out.num_invalid)

    def redispatch(self, x, slot_values, handle: Handle, sizes: CallShape):
        """Rows of any width move (an fp8 dispatch's scales: calls.redispatch pads them)."""
        rows, values, _ = calls.redispatch(  # row_src: the handle has it
            x, slot_values, handle.dest_rank, handle.dest_row, handle.num_recv,
            capacity=sizes.capacity, with_row_src=False, **self.call_attrs(sizes))
        return rows, values

    def combine(self, rows, row_scale, row_values, handle: Handle, sizes: CallShape):
        return calls.combine(rows, row_scale, row_values, handle.dest_rank, handle.dest_row,
                             handle.row_src, handle.num_recv, out_f32=False,
                             **self.call_attrs(sizes))
