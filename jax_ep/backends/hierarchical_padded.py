"""The padded (low-latency) layout on the hierarchical backend: the normal layout's inter-host
leg, then an intra-host leg that writes the flat padded layout (docs/padded_layout.md).

Rank r = (host h, local index l). Dispatch:
  1. the source computes its PaddedHandle's slot_expert and slot_pos on its own
     (routing.padded_slots): the layout is static, so no count exchange is needed for it.
  2. inter-host leg (HierarchicalBackend.forward_records, the same engines): a token crosses to
     host g only if one of its delivered slots' experts lives there, once, to its forwarder
     (the rank of local index l on g), with its token id and the expert id of each slot (valid
     ids, repeats kept: the expert's rank counts them in num_dropped, as in the flat layout).
     The forwarder expands what arrived into its PaddedPool: num_hosts segments of T tokens,
     segment g the tokens of rank (g, l) in token order, ids of other hosts' experts -1.
  3. intra-host leg (IntraHostPaddedLeg): the forwarders write the rows of their pools to the
     host's expert ranks at the flat layout's slots [l][s][p], s the global source rank and p
     numbered per (expert, segment) in token order. That is the flat numbering: a segment keeps
     its source's token order, and every token with a slot on this host came. So each rank's
     outputs (rows, weights, recv_counts, group_sizes, num_dropped) are the flat contract's.
Combine: the source sends its tokens' routing (slot_expert, slot_pos) along the same route again
(the handle is the flat contract's, so the forwarder kept none), the intra-host leg brings each
forwarder the rows of its pool's slots and sums them per pool token in slot order in float32,
and HierarchicalBackend.partials_home takes each host's partial home as in the normal layout
(rounded to the rows' dtype unless EPConfig.f32_partials, then added over hosts in float32).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import routing
from jax_ep.backends import NoDeviceState
from jax_ep.backends.hierarchical import (HierarchicalBackend, HostRoute, _all_to_all,
                                          host_route, slot_hosts)
from jax_ep.backends.reference import sum_slots
from jax_ep.config import CallShape
from jax_ep.topology import Topology
from jax_ep.types import PaddedHandle

_f32 = jnp.float32
_i32 = jnp.int32


class PaddedPool(NamedTuple):
    """What a forwarder holds for the padded layout after the inter-host leg; P = num_hosts * T
    entries, entry g * T + t = token t of the rank of this local index on host g (-1 and zeros
    for tokens that did not come: those with no slot on this host).

      ids:    [P, k] int32 global expert of each slot whose expert lives on this host, else -1.
      pos:    [P, k] int32 the slot's position in its (expert, source) block, -1 likewise; only
              for a combine (dispatch's leg numbers the positions itself), else None.
      x:      [P, H] tokens, or None.
      scales: [P, S] float32 fp8 scales, or None.
      values: [P, k] float32 per-slot values (routing weights, cotangents), or None.
    """

    ids: jax.Array
    pos: jax.Array | None
    x: jax.Array | None
    scales: jax.Array | None
    values: jax.Array | None


class IntraHostPaddedLeg(Protocol):
    """Moves the padded layout's rows between a host's forwarders and its expert ranks."""

    def deliver(self, pool: PaddedPool, sizes: CallShape):
        """Forwarder pools -> per expert rank (rows [E_local, N * M, H] | None, row_values
        [E_local, N * M] | None, scales [E_local, N * M, S] | None, recv_counts [E_local, N],
        group_sizes [E_local], num_dropped []): the flat padded layout, N the global ranks."""

    def collect(self, rows, row_scale, row_values, recv_counts, pool: PaddedPool,
                sizes: CallShape):
        """Expert ranks' rows -> per forwarder (pool_sum [P, H] f32 | None: each pool token's
        delivered slots on this host, times row_scale, summed in slot order in float32;
        pool_values [P, k] f32 | None: each slot's row value; held [P] bool: the pool tokens
        with a slot on this host). `pool` carries ids and pos."""


def pool_slots(topo: Topology) -> np.ndarray:
    """[N] int32: where each global source rank s sits in the forwarders' pools, g * L + l for
    s = (host g, local index l): segment g of the forwarder of local index l."""
    return (np.asarray(topo.host_of, np.int32) * topo.ranks_per_host
            + np.asarray(topo.local_of, np.int32))


class XlaIntraHostPaddedLeg(NoDeviceState):
    """The padded intra-host leg in pure JAX: each forwarder scatters its pool's slots into a
    dense block [L, E_local, num_hosts, M, ...] (entry d for the host's rank d) and one grouped
    all_to_all over the host's ranks delivers them, as ReferencePaddedOps does over the whole
    axis; the receiver orders the blocks by global source rank."""

    def __init__(self, axis_name: str, topo: Topology):
        self.axis_name = axis_name
        self.topo = topo
        self.groups = topo.intra_groups()
        self._rank_at = topo.rank_at()  # [num_hosts, L]: pool block g * L + l -> source rank
        self._pool_slot = pool_slots(topo)  # its inverse
        self._local_of = np.asarray(topo.local_of, np.int32)

    def _a2a(self, x):
        return _all_to_all(x, self.axis_name, self.groups)

    def _blocks(self, sizes: CallShape) -> int:
        """Rows of a forwarder's dense block [L, E_local, num_hosts, M]."""
        return self.topo.num_ranks * sizes.experts_per_rank * sizes.slots_per_source

    def _targets(self, ids, pos, sizes: CallShape) -> jax.Array:
        """[P * k]: each pool slot's row in the dense block, _blocks(sizes) where it has none."""
        nh, t, k = self.topo.num_hosts, sizes.num_tokens, sizes.top_k
        el, m = sizes.experts_per_rank, sizes.slots_per_source
        e = ids.reshape(-1)
        d = jnp.asarray(self._local_of)[jnp.maximum(e, 0) // el]  # the expert's rank here
        segment = jnp.arange(nh * t * k, dtype=_i32) // (t * k)
        row = ((d * el + e % el) * nh + segment) * m + pos.reshape(-1)
        return jnp.where(e >= 0, row, self._blocks(sizes))

    def _by_source(self, arrived, sizes: CallShape):
        """[L (forwarder l), E_local, num_hosts (segment g), ...] -> [E_local, N, ...]: block s =
        the segment of source s."""
        el, rest = sizes.experts_per_rank, arrived.shape[3:]
        by_pool = jnp.moveaxis(arrived, 0, 2).reshape((el, self.topo.num_ranks) + rest)
        return jnp.take(by_pool, jnp.asarray(self._pool_slot), axis=1)

    def _to_blocks(self, per_slot, target, sizes: CallShape):
        """[P * k, ...] per pool slot -> [E_local, N * M, ...] on the experts' ranks."""
        nl, nh = self.topo.ranks_per_host, self.topo.num_hosts
        el, m, rest = sizes.experts_per_rank, sizes.slots_per_source, per_slot.shape[1:]
        blocks = jnp.zeros((self._blocks(sizes),) + rest, per_slot.dtype).at[target].set(
            per_slot, mode="drop")
        arrived = self._a2a(blocks.reshape((nl, el, nh, m) + rest))
        return self._by_source(arrived, sizes).reshape((el, self.topo.num_ranks * m) + rest)

    def deliver(self, pool: PaddedPool, sizes: CallShape):
        nh, t, k = self.topo.num_hosts, sizes.num_tokens, sizes.top_k
        n, el = self.topo.num_ranks, sizes.experts_per_rank
        # Each segment is its source's tokens in order: the flat positions, per segment.
        slot_expert, slot_pos, counts, repeats = jax.vmap(
            lambda ids: routing.padded_slots(ids, sizes))(pool.ids.reshape(nh, t, k))
        my_host = jnp.asarray(self.topo.host_of, _i32)[jax.lax.axis_index(self.axis_name)]
        peers = jnp.asarray(self._rank_at)[my_host]  # [L] the ranks of this host

        def per_peer(a):  # [nh, E] per segment and expert -> [L, nh, E_local] per local rank
            return jnp.moveaxis(jnp.take(a.reshape(nh, n, el), peers, axis=1), 1, 0)

        meta = self._a2a(jnp.stack([per_peer(counts), per_peer(repeats)], axis=1))  # [L, 2, nh, El]
        recv_counts = self._by_source(jnp.moveaxis(meta[:, 0], 2, 1), sizes).astype(_i32)
        num_dropped = jnp.sum(meta[:, 1], dtype=_i32)
        target = self._targets(slot_expert, slot_pos, sizes)
        rows = values = scales = None
        if pool.x is not None:
            rows = self._to_blocks(jnp.repeat(pool.x, k, axis=0), target, sizes)
        if pool.values is not None:
            values = self._to_blocks(pool.values.reshape(-1), target, sizes)
        if pool.scales is not None:
            scales = self._to_blocks(jnp.repeat(pool.scales, k, axis=0), target, sizes)
        return (rows, values, scales, recv_counts, jnp.sum(recv_counts, axis=1, dtype=_i32),
                num_dropped)

    def collect(self, rows, row_scale, row_values, recv_counts, pool: PaddedPool,
                sizes: CallShape):
        del recv_counts  # the slots read below are the delivered ones, all below their counts
        nl, nh = self.topo.ranks_per_host, self.topo.num_hosts
        el, m = sizes.experts_per_rank, sizes.slots_per_source
        target = self._targets(pool.ids, pool.pos, sizes)
        size = self._blocks(sizes)

        def to_slots(v):  # [E_local, N * M, ...] on the expert ranks -> [P * k, ...] per slot
            rest = v.shape[2:]
            by_pool = jnp.take(v.reshape((el, self.topo.num_ranks, m) + rest),
                               jnp.asarray(self._rank_at.reshape(-1)), axis=1)  # g * L + l
            per_forwarder = jnp.moveaxis(by_pool.reshape((el, nh, nl, m) + rest), 2, 0)
            arrived = self._a2a(per_forwarder).reshape((size,) + rest)  # [L (expert d), El, nh, M]
            picked = arrived[jnp.minimum(target, size - 1)]
            has = (target < size).reshape((-1,) + (1,) * len(rest))
            return jnp.where(has, picked, jnp.zeros((), picked.dtype))

        delivered = pool.ids >= 0
        pool_sizes = dataclasses.replace(sizes, num_tokens=nh * sizes.num_tokens)
        pool_sum, pool_values = sum_slots(to_slots, delivered, rows, row_scale, row_values,
                                          pool_sizes, out_dtype=_f32)
        return pool_sum, pool_values, jnp.any(delivered, axis=-1)


class HierarchicalPaddedOps:
    """The padded layout's three operations (jax_ep/backends/__init__.py) on a hierarchical
    group: `backend`'s inter-host leg and `intra`, the padded intra-host leg of its kind."""

    def __init__(self, backend: HierarchicalBackend, intra: IntraHostPaddedLeg):
        self.backend = backend
        self.topo = backend.topo
        self.intra = intra

    @staticmethod
    def _expert_rank(ids, sizes: CallShape):
        """[..., k]: the global rank of each slot's expert, -1 where it has none."""
        return jnp.where(ids >= 0, ids // sizes.experts_per_rank, -1)

    def _route(self, slot_expert, sizes: CallShape) -> HostRoute:
        """The inter-host route of a source's tokens: to the hosts of their delivered slots."""
        return host_route(self._expert_rank(slot_expert, sizes), self.topo)

    def _pool(self, route: HostRoute, ids, pos, x, scales, values, sizes: CallShape) -> PaddedPool:
        """Sends each token, with its slots' expert ids [T, k] (and pos, x, scales, values where
        given), along `route` (_route) to the forwarders of the hosts of its delivered slots, and
        returns this forwarder's pool."""
        named = [("token", jnp.arange(sizes.num_tokens, dtype=_i32)), ("ids", ids),
                 ("pos", pos), ("x", x), ("scales", scales), ("values", values)]
        named = [(name, a) for name, a in named if a is not None]
        got, expand = self.backend.forward_records(
            [a for _, a in named], [(a.shape[1:], a.dtype) for _, a in named], route, sizes)
        got = {name: a for (name, _), a in zip(named, got)}
        here = slot_hosts(self._expert_rank(got["ids"], sizes), self.topo) == \
            self.backend.my_host()  # padding: id -1, never here

        def per_slot(name):  # this host's slots, -1 elsewhere
            return expand(jnp.where(here, got[name], -1), -1) if name in got else None

        def payload(name):
            return expand(got[name], 0) if name in got else None

        return PaddedPool(per_slot("ids"), per_slot("pos"), payload("x"), payload("scales"),
                          payload("values"))

    def dispatch(self, x, topk_idx, topk_weights, sizes: CallShape, x_scales=None):
        """-> (rows, row_weights, group_sizes, num_dropped, handle, scales | None)."""
        slot_expert, slot_pos, _, _ = routing.padded_slots(topk_idx, sizes)
        ids = jnp.where(routing.valid_slots(topk_idx, sizes.num_experts), topk_idx, -1)
        pool = self._pool(self._route(slot_expert, sizes), ids.astype(_i32), None, x, x_scales,
                          topk_weights, sizes)
        rows, row_weights, scales, recv_counts, group_sizes, num_dropped = self.intra.deliver(
            pool, sizes)
        handle = PaddedHandle(slot_expert=slot_expert, slot_pos=slot_pos, recv_counts=recv_counts)
        return rows, row_weights, group_sizes, num_dropped, handle, scales

    def redispatch(self, x, slot_values, handle: PaddedHandle, sizes: CallShape):
        pool = self._pool(self._route(handle.slot_expert, sizes), handle.slot_expert, None, x,
                          None, slot_values, sizes)
        rows, row_values = self.intra.deliver(pool, sizes)[:2]
        return rows, row_values

    def combine(self, rows, row_scale, row_values, handle: PaddedHandle, sizes: CallShape):
        expert_rank = self._expert_rank(handle.slot_expert, sizes)
        route = host_route(expert_rank, self.topo)
        pool = self._pool(route, handle.slot_expert, handle.slot_pos, None, None, None, sizes)
        pool_sum, pool_values, held = self.intra.collect(rows, row_scale, row_values,
                                                         handle.recv_counts, pool, sizes)
        return self.backend.partials_home(pool_sum, pool_values, held, route,
                                          slot_hosts(expert_rank, self.topo), rows, sizes)
