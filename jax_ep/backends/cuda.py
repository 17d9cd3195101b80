"""The cuda backend: XLA FFI custom calls over the CUDA kernels of cuda/.

At group creation each local device of the mesh gets one communication buffer (cudaMalloc,
sized from EPConfig), and every rank maps the buffers of its EP slice: by pointer with peer
access inside this process, by CUDA IPC handle (exchanged through the jax.distributed key-value
store) across processes. The custom calls find that state by group id and device ordinal; all
per-call progress lives on the device.
"""

from __future__ import annotations

import base64
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jax_ep import _ext
from jax_ep._vma import make_varying, varying_axes
from jax_ep.config import EPConfig, Sizes, fp8_scale_cols
from jax_ep.coordination import GroupCoordinator
from jax_ep.errors import EPRuntimeError
from jax_ep.types import Handle

_group_ids = itertools.count(1)


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def _slices(mesh: Mesh, axis_name: str) -> dict[Any, list[jax.Device]]:
    """Devices of each EP group (one per index of the other mesh axes), in rank order."""
    axis = mesh.axis_names.index(axis_name)
    devices = np.moveaxis(mesh.devices, axis, -1)
    return {idx: list(devices[idx]) for idx in np.ndindex(devices.shape[:-1])}


class CudaBackend:
    name = "cuda"

    def __init__(self, mesh: Mesh, axis_name: str, config: EPConfig,
                 coordinator: GroupCoordinator):
        if config.max_tokens is None or config.hidden_size is None:
            raise ValueError("EPGroup(backend='cuda') sizes its buffers from EPConfig.max_tokens "
                             "and EPConfig.hidden_size; set both")
        self.config = config
        self.num_ranks = mesh.shape[axis_name]
        self.itemsize_max = np.dtype(jnp.dtype(config.dtype)).itemsize
        self.max_row_bytes = config.hidden_size * self.itemsize_max
        if self.num_ranks * config.max_tokens * config.top_k >= 2**31:
            raise ValueError("EPGroup(backend='cuda'): N * max_tokens * top_k must be < 2**31")
        self.group_id = next(_group_ids)
        self._ext = _ext.module()
        self._local: list[int] = []
        self._closed = False
        me = jax.process_index()
        slices = _slices(mesh, axis_name)
        max_capacity = config.capacity_rows(self.num_ranks, config.max_tokens)
        for devices in slices.values():
            for rank, dev in enumerate(devices):
                if dev.process_index == me:
                    self._ext.create_context(
                        self.group_id, dev.local_hardware_id, rank, self.num_ranks,
                        config.num_experts, config.top_k, config.max_tokens, max_capacity,
                        self.max_row_bytes, config.num_sms, float(config.timeout_s),
                        **self._padded_limits(config))
                    self._local.append(dev.local_hardware_id)
        try:
            self._connect(slices, coordinator)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _padded_limits(config: EPConfig) -> dict:
        """Sizes of the padded-layout buffers (none without EPConfig.low_latency)."""
        if not config.low_latency:
            return {}
        return dict(ll_max_tokens=config.max_tokens,
                    ll_scale_cols=fp8_scale_cols(config.hidden_size),
                    ll_zero_fill=config.padded_zero_fill)

    def _connect(self, slices: dict[Any, list[jax.Device]], coord: GroupCoordinator) -> None:
        # The coordinator already checked that every process created this same group (in
        # EPGroup), so IPC handles are published under its namespace and waits are bounded.
        me = jax.process_index()
        if coord.spans_processes:
            for devs in slices.values():
                for d in devs:
                    if d.process_index == me:
                        handle = self._ext.ipc_handle(self.group_id, d.local_hardware_id)
                        coord.publish(f"ipc/{d.id}", base64.b64encode(handle).decode())
        for devs in slices.values():
            for dev in devs:
                if dev.process_index != me:
                    continue
                for peer_rank, peer in enumerate(devs):
                    if peer == dev:
                        continue
                    if peer.process_index == me:
                        self._ext.connect_local_peer(self.group_id, dev.local_hardware_id,
                                                     peer_rank, peer.local_hardware_id)
                    else:
                        value = coord.fetch(peer.process_index, f"ipc/{peer.id}",
                                            f"publish its EP buffer for device {peer.id}")
                        self._ext.connect_remote_peer(self.group_id, dev.local_hardware_id,
                                                      peer_rank, base64.b64decode(value))
                self._ext.finish_connect(self.group_id, dev.local_hardware_id)

    # --- checks and lifetime ---------------------------------------------------------------------

    def check_row_layout(self, op: str, hidden: int, dtype: np.dtype) -> None:
        row_bytes = hidden * dtype.itemsize
        if row_bytes % 16:
            step = 16 // np.gcd(16, dtype.itemsize)
            raise ValueError(
                f"jax_ep.{op}: the cuda backend moves rows in 16-byte vectors; H={hidden} in "
                f"{dtype.name} is {row_bytes} bytes. Use a hidden size that is a multiple of "
                f"{step} for {dtype.name} (or backend='reference')")
        if row_bytes > self.max_row_bytes:
            raise ValueError(
                f"jax_ep.{op}: rows of {row_bytes} bytes ({hidden} x {dtype.name}) are wider than "
                f"the buffers (EPConfig.hidden_size={self.config.hidden_size} x "
                f"{jnp.dtype(self.config.dtype).name}); set EPConfig.dtype to the widest dtype "
                f"you move")

    def check(self) -> None:
        """Raises EPRuntimeError if a kernel of this group reported a timeout."""
        if not self._closed:
            msg = self._ext.group_error(self.group_id)
            if msg:
                raise EPRuntimeError(msg)

    def buffer_bytes(self) -> int:
        """Bytes of one local device's communication buffer."""
        return self._ext.buffer_bytes(self.group_id, self._local[0]) if self._local else 0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._ext.destroy_group(self.group_id)

    # --- the three operations --------------------------------------------------------------------

    def _call(self, target: str, out_types, *args):
        axes = varying_axes(*args)
        args = [make_varying(a, axes) for a in args]
        # Not marked side-effecting (that would take JAX off its fast dispatch path): every rank
        # runs the same compiled program, so whatever XLA drops, merges or reorders, it does the
        # same on all ranks and the device-side sequence numbers stay in step.
        outs = jax.ffi.ffi_call(target, out_types)(*args, group_id=np.int64(self.group_id))
        return [make_varying(o, axes) for o in outs]

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
        rows, values = self._call(
            "jax_ep_redispatch",
            (_sds((c, x.shape[1]) if x is not None else (0, 0), x_in.dtype),
             _sds((c,) if slot_values is not None else (0,), jnp.float32)),
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
