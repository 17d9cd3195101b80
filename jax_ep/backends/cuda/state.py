"""The device state behind the cuda kernels: one communication buffer per (rank group, local
device), mapped by every rank of its group.

A rank group is a list of devices in rank order: a whole EP slice for the cuda backend, the
ranks of one host for the hierarchical backend's intra-host leg. Every rank maps its group's
buffers: by pointer with peer access inside this process, by CUDA IPC handle (exchanged through
the jax.distributed key-value store) across processes. The custom calls (calls.py) find that
state by group id and device ordinal; all per-call progress lives on the device.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import _ext, row_rules
from jax_ep.config import CallShape, EPConfig, fp8_scale_cols
from jax_ep.coordination import GroupCoordinator
from jax_ep.errors import EPRuntimeError

_group_ids = itertools.count(1)


def require_buffer_sizes(config: EPConfig, who: str) -> None:
    if config.max_tokens is None or config.hidden_size is None:
        raise ValueError(f"{who} sizes its buffers from EPConfig.max_tokens and "
                         f"EPConfig.hidden_size; set both")


@dataclasses.dataclass(frozen=True)
class BufferLimits:
    """What every rank's buffer of a state is sized for (cuda/buffer_map.h's BufferLimits)."""

    num_experts: int
    top_k: int
    max_tokens: int      # tokens a rank sends per call
    max_capacity: int    # rows a rank receives per call (C)
    max_row_bytes: int   # EPConfig.hidden_size * itemsize(EPConfig.dtype)
    timeout_s: float
    padded: dict = dataclasses.field(default_factory=dict)  # padded-layout sizes (EPConfig.padded_layout)

    @staticmethod
    def of(config: EPConfig, max_tokens: int, max_capacity: int,
           padded_segments: int = 1) -> "BufferLimits":
        """padded_segments: the sources each rank sends for in the padded layout (1; the
        hierarchical backend's host groups: one per host), whose regions come with
        EPConfig.padded_layout."""
        padded = {}
        if config.padded_layout:
            padded = dict(padded_max_tokens=config.max_tokens,
                          padded_scale_cols=fp8_scale_cols(config.hidden_size),
                          padded_zero_fill=config.padded_zero_fill,
                          padded_segments=padded_segments)
        return BufferLimits(
            num_experts=config.num_experts, top_k=config.top_k, max_tokens=max_tokens,
            max_capacity=max_capacity,
            max_row_bytes=config.hidden_size * np.dtype(jnp.dtype(config.dtype)).itemsize,
            timeout_s=float(config.timeout_s), padded=padded)


class CudaGroupState:
    """Buffers of `groups` (each a list of devices in rank order) on this process's devices."""

    def __init__(self, groups: Sequence[Sequence[jax.Device]], limits: BufferLimits,
                 coordinator: GroupCoordinator):
        self.group_id = next(_group_ids)
        self._ext = _ext.module()
        self._local: list[int] = []
        self._closed = False
        me = jax.process_index()
        for devices in groups:
            for rank, dev in enumerate(devices):
                if dev.process_index == me:
                    self._ext.create_context(
                        self.group_id, dev.local_hardware_id, rank, len(devices),
                        limits.num_experts, limits.top_k, limits.max_tokens, limits.max_capacity,
                        limits.max_row_bytes, limits.timeout_s, **limits.padded)
                    self._local.append(dev.local_hardware_id)
        try:
            self._connect(groups, coordinator)
        except BaseException:
            self.close()
            raise

    def _connect(self, groups: Sequence[Sequence[jax.Device]], coord: GroupCoordinator) -> None:
        # The coordinator already checked that every process created this same EPGroup, so IPC
        # handles are published under its namespace and waits are bounded. A device is in one
        # group of a state, so its id names its buffer.
        me = jax.process_index()
        if coord.spans_processes:
            for devs in groups:
                for d in devs:
                    if d.process_index == me:
                        handle = self._ext.ipc_handle(self.group_id, d.local_hardware_id)
                        coord.publish(f"ipc/{d.id}", base64.b64encode(handle).decode())
        for devs in groups:
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

    def check(self) -> None:
        """Raises EPRuntimeError if a kernel on these buffers reported a timeout."""
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


class StateOwner:
    """What the cuda backend and the hierarchical backend's cuda leg have in common: one
    CudaGroupState (`state`) sized from `config`, which these methods only reach."""

    config: EPConfig
    state: CudaGroupState

    def check_row_width(self, op: str, hidden: int, dtype: np.dtype) -> None:
        """The rows the kernels can move (the rule is stated in jax_ep/row_rules.py)."""
        row_rules.check_row_width(self.config, op, hidden, dtype, on_cuda=True)

    def check(self) -> None:
        """Raises EPRuntimeError if a kernel of this group reported a timeout."""
        self.state.check()

    def buffer_bytes(self) -> int:
        """Bytes of one local device's communication buffer."""
        return self.state.buffer_bytes()

    def close(self) -> None:
        self.state.close()

    def call_attrs(self, shape: CallShape) -> dict[str, int]:
        """The attributes of one custom call on this state (calls.py's group_id, num_sms): the
        SM budget is the call's own (CallShape.num_sms), so a dispatch and a combine of one
        group may run with different budgets."""
        return dict(group_id=self.state.group_id, num_sms=shape.num_sms)
