"""The cuda backend: XLA FFI custom calls over the CUDA kernels of cuda/, one rank group per EP
slice of the mesh (buffers and their mapping: jax_ep/backends/cuda_state.py)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jax_ep.backends.cuda_state import (BufferLimits, CudaGroupState, check_row_layout,
                                        require_buffer_sizes)
from jax_ep.config import EPConfig, Sizes
from jax_ep.coordination import GroupCoordinator
from jax_ep.types import Handle


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def ep_slices(mesh: Mesh, axis_name: str) -> dict[Any, list[jax.Device]]:
    """Devices of each EP group (one per index of the other mesh axes), in rank order."""
    axis = mesh.axis_names.index(axis_name)
    devices = np.moveaxis(mesh.devices, axis, -1)
    return {idx: list(devices[idx]) for idx in np.ndindex(devices.shape[:-1])}


class CudaBackend:
    name = "cuda"

    def __init__(self, mesh: Mesh, axis_name: str, config: EPConfig,
                 coordinator: GroupCoordinator):
        require_buffer_sizes(config, "EPGroup(backend='cuda')")
        self.config = config
        self.num_ranks = mesh.shape[axis_name]
        if self.num_ranks * config.max_tokens * config.top_k >= 2**31:
            raise ValueError("EPGroup(backend='cuda'): N * max_tokens * top_k must be < 2**31")
        limits = BufferLimits.of(config, config.max_tokens,
                                 config.capacity_rows(self.num_ranks, config.max_tokens),
                                 with_padded=True)
        self.state = CudaGroupState(list(ep_slices(mesh, axis_name).values()), limits,
                                    coordinator)

    def check_row_layout(self, op: str, hidden: int, dtype: np.dtype) -> None:
        check_row_layout(self.config, op, hidden, dtype)

    def check(self) -> None:
        """Raises EPRuntimeError if a kernel of this group reported a timeout."""
        self.state.check()

    def buffer_bytes(self) -> int:
        """Bytes of one local device's communication buffer."""
        return self.state.buffer_bytes()

    def close(self) -> None:
        self.state.close()

    def _call(self, target: str, out_types, *args):
        """A custom call on this group's buffers (also used by the padded layout's ops)."""
        return self.state.call(target, out_types, *args)

    # --- the three operations --------------------------------------------------------------------

    def dispatch(self, x, topk_idx, topk_weights, sizes: Sizes):
        t, h = x.shape
        c, k, el = sizes.capacity, sizes.top_k, sizes.experts_per_rank
        i32 = jnp.int32
        (rows, row_w, group_sizes, num_dropped, dest_rank, dest_row, row_src, num_recv,
         num_invalid) = self._call(
            "jax_ep_dispatch",
            (_sds((c, h), x.dtype), _sds((c,), jnp.float32), _sds((el,), i32), _sds((), i32),
             _sds((t, k), i32), _sds((t, k), i32), _sds((c,), i32), _sds((), i32),
             _sds((), i32)),
            x, topk_idx, topk_weights)
        handle = Handle(dest_rank=dest_rank, dest_row=dest_row, row_src=row_src,
                        num_recv=num_recv)
        # The layout pass counts the invalid ids as it reads them: no extra kernel for them.
        return rows, row_w, group_sizes, num_dropped, handle, num_invalid

    def redispatch(self, x, slot_values, handle: Handle, sizes: Sizes):
        c = sizes.capacity
        x_in = x if x is not None else jnp.zeros((0, 0), jnp.float32)
        v_in = slot_values if slot_values is not None else jnp.zeros((0, 0), jnp.float32)
        rows, values, _ = self._call(
            "jax_ep_redispatch",
            (_sds((c, x.shape[1]) if x is not None else (0, 0), x_in.dtype),
             _sds((c,) if slot_values is not None else (0,), jnp.float32),
             _sds((0,), jnp.int32)),  # row_src: the handle has it
            x_in, v_in, handle.dest_rank, handle.dest_row, handle.num_recv)
        return (rows if x is not None else None), (values if slot_values is not None else None)

    def combine(self, rows, row_scale, row_values, handle: Handle, sizes: Sizes):
        t, k = sizes.num_tokens, sizes.top_k
        f32 = jnp.float32
        rows_in = rows if rows is not None else jnp.zeros((0, 0), f32)
        out, slot_values = self._call(
            "jax_ep_combine",
            (_sds((t, rows.shape[1]) if rows is not None else (0, 0), rows_in.dtype),
             _sds((t, k) if row_values is not None else (0,), f32)),
            rows_in,
            row_scale if row_scale is not None else jnp.zeros((0,), f32),
            row_values if row_values is not None else jnp.zeros((0,), f32),
            handle.dest_rank, handle.dest_row, handle.row_src, handle.num_recv)
        return (out if rows is not None else None), (
            slot_values if row_values is not None else None)
