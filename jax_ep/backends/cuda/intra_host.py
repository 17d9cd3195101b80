"""The hierarchical backend's intra-host leg on the cuda kernels (over NVLink or CUDA IPC).

The ranks of each host form one cuda rank group; a forwarder's pool of P = num_hosts * T tokens
plays the part of its tokens. The pool already carries the destination (rank, row) of every slot
landing on this host, so deliver is the cuda backend's redispatch: each forwarder writes every
token once per receiving rank, straight to its final rows there, with no compaction and no
padding (the pure-JAX leg sends each peer a static chunk of min(P, C) tokens). collect is its
combine: each receiver pushes rows back to the forwarder's slots, and the forwarder sums a pool
token's slots in slot order, in float32 (the backend rounds it to the rows' dtype before it
crosses hosts unless EPConfig.f32_partials). The pool holds only the tokens the inter-host leg
brought (the others have no slot here), at their fixed entries, so its size and the buffers'
do not depend on the routing.

Row ids inside a host group are the group's own (local index l of the forwarder, pool entry p):
l * P * k + p * k + j. They convert to and from the flat contract's s * T * k + t * k + j by the
topology alone (pool entry p = g * T + t holds token t of rank (host g, local index l)).

The padded layout (CudaIntraHostPaddedLeg) runs the padded kernels on the same buffers, each
rank sending for the num_hosts sources of its pool's segments (cuda/padded.cu, "Sources").
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jax_ep.backends.cuda import calls
from jax_ep.backends.cuda.state import (BufferLimits, CudaGroupState, StateOwner,
                                        require_buffer_sizes)
from jax_ep.config import EPConfig, CallShape
from jax_ep.coordination import GroupCoordinator
from jax_ep.topology import Topology, ep_slices
from jax_ep.types import Handle


class CudaIntraHostLeg(StateOwner):
    """IntraHostLeg (jax_ep/backends/hierarchical.py) over the cuda kernels."""

    collect_needs_pool = True  # combine's routing is the pool's (dest_rank, dest_row)

    def __init__(self, mesh: Mesh, axis_name: str, topo: Topology, config: EPConfig,
                 coordinator: GroupCoordinator):
        require_buffer_sizes(config, "EPGroup(backend='hierarchical') with intra_host='cuda' (the "
                                     "default on GPUs; intra_host='xla' needs no sizes)")
        self.config = config
        self.topo = topo
        n, t_max = topo.num_ranks, config.max_tokens
        if n * t_max * config.top_k >= 2**31:
            raise ValueError("EPGroup(backend='hierarchical'): N * max_tokens * top_k must be "
                             "< 2**31")
        rank_at = topo.rank_at()
        groups = [[devs[r] for r in host_ranks] for devs in ep_slices(mesh, axis_name).values()
                  for host_ranks in rank_at]
        limits = BufferLimits.of(config, topo.num_hosts * t_max, config.capacity_rows(n, t_max),
                                 padded_segments=topo.num_hosts)
        self.state = CudaGroupState(groups, limits, coordinator)
        self._host_of = np.asarray(topo.host_of, np.int32)
        self._local_of = np.asarray(topo.local_of, np.int32)
        self._rank_at = rank_at

    def _local(self, dest_rank):
        """Global rank -> local index on its host (-1 stays -1)."""
        return jnp.where(dest_rank >= 0, jnp.asarray(self._local_of)[jnp.maximum(dest_rank, 0)],
                         -1)

    def deliver(self, pool, num_recv, sizes: CallShape):
        t, k = sizes.num_tokens, sizes.top_k
        p = self.topo.num_hosts * t
        rows, values, group_src = calls.redispatch(
            pool.x, pool.values, self._local(pool.dest_rank), pool.dest_row, num_recv,
            capacity=sizes.capacity, with_row_src=True, **self.call_attrs(sizes))
        # l * P * k + p * k + j  ->  s * T * k + t * k + j, s = the rank (p // T, l).
        held = group_src >= 0
        code = jnp.maximum(group_src, 0)
        entry = (code // k) % p
        src = jnp.asarray(self._rank_at)[entry // t, code // (p * k)]
        row_src = jnp.where(held, (src * t + entry % t) * k + code % k, -1)
        return rows, values, row_src

    def collect(self, rows, row_scale, row_values, handle: Handle, pool, sizes: CallShape):
        t, k = sizes.num_tokens, sizes.top_k
        p = self.topo.num_hosts * t
        # s * T * k + t * k + j  ->  l * P * k + p * k + j with (host g, local l) = rank s.
        rs = handle.row_src
        held = rs >= 0
        code = jnp.maximum(rs, 0)
        src = code // (t * k)
        entry = jnp.asarray(self._host_of)[src] * t + (code // k) % t
        group_src = jnp.where(held, (jnp.asarray(self._local_of)[src] * p + entry) * k + code % k,
                              -1)
        pool_sum, pool_values = calls.combine(
            rows, row_scale, row_values, self._local(pool.dest_rank), pool.dest_row, group_src,
            handle.num_recv, out_f32=True, **self.call_attrs(sizes))
        return pool_sum, pool_values, jnp.any(pool.dest_rank >= 0, axis=-1)


class CudaIntraHostPaddedLeg:
    """IntraHostPaddedLeg (jax_ep/backends/hierarchical_padded.py) over the padded kernels, on
    the buffers of the group's CudaIntraHostLeg (their padded regions, EPConfig.padded_layout).

    Each forwarder's pool is num_hosts segments of T tokens, segment g those of the global source
    rank_at[g][l]: the kernels number positions per (expert, segment) and write block (l, s) of
    the global source s, so the outputs are the flat layout of all N ranks. The kernels name the
    experts of the host group (rank d's local expert l is d * E_local + l), so the pool's global
    ids are converted, and the table `sources` ([2, N]: the source of each (segment, forwarder),
    and where each source sits in the pools) tells them the topology."""

    def __init__(self, leg: CudaIntraHostLeg):
        from jax_ep.backends.hierarchical_padded import pool_slots

        self.leg = leg
        self._local_of = leg._local_of
        self._sources = np.stack([leg._rank_at.reshape(-1), pool_slots(leg.topo)]).astype(
            np.int32)

    def _group_experts(self, ids, sizes: CallShape):
        """Global expert ids (on this host, else -1) -> the host group's."""
        el = sizes.experts_per_rank
        e = jnp.maximum(ids, 0)
        return jnp.where(ids >= 0, jnp.asarray(self._local_of)[e // el] * el + e % el, -1)

    def deliver(self, pool, sizes: CallShape):
        out = calls.padded_dispatch(
            pool.x, pool.scales, self._group_experts(pool.ids, sizes), pool.values,
            jnp.asarray(self._sources), experts_local=sizes.experts_per_rank,
            num_ranks=sizes.num_ranks, max_tokens=sizes.slots_per_source,
            **self.leg.call_attrs(sizes))
        return (out.rows, out.row_values, out.scales, out.recv_counts, out.group_sizes,
                out.num_dropped)

    def collect(self, rows, row_scale, row_values, recv_counts, pool, sizes: CallShape):
        pool_sum, pool_values = calls.padded_combine(
            rows, row_scale, row_values, recv_counts, self._group_experts(pool.ids, sizes),
            pool.pos, jnp.asarray(self._sources), out_f32=True, **self.leg.call_attrs(sizes))
        return pool_sum, pool_values, jnp.any(pool.ids >= 0, axis=-1)
