"""The hierarchical backend: EP over several hosts in two legs, with the flat contract's output.

Rank r = (host h, local index l). Dispatch:
  1. layout: the [N, E] count matrix is all-gathered (small) and every rank computes where each
     of its slots lands, exactly as the flat backends do (layout.route), so d.x, d.weights,
     d.group_sizes and the handle are the flat contract's, bit for bit.
  2. inter-host leg (XLA all_to_all over the ranks of local index l, one per host): each token
     crosses to a remote host once, to the rank of the same local index there (its
     *forwarder*), with the (dest_rank, dest_row) of its slots that land on that host. The
     forwarder's *pool* holds T tokens from each host: entry (g, t) = token t of rank (g, l).
  3. intra-host leg (IntraHostLeg): the forwarder hands each rank of its host the pool tokens
     with slots there, and that rank places each slot's row at its dest_row.
Combine runs the legs backwards: each rank sums its rows per (source rank, token) in float32,
the forwarder sums those of its host, and one float32 partial per (token, host) crosses back.

The intra-host leg is an object with two methods (deliver, collect): the pure-JAX one here, or
the cuda kernels' (jax_ep/backends/cuda/intra_host.py), which write rows straight into the
receivers' rows over NVLink (docs/multihost.md).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_ep import routing
from jax_ep.backends import NoDeviceState
from jax_ep.config import CallShape
from jax_ep.topology import Topology
from jax_ep.types import Handle

_f32 = jnp.float32


class Pool(NamedTuple):
    """What a forwarder holds after the inter-host leg; P = num_hosts * T entries, entry
    g * T + t = token t of the rank of this local index on host g.

      x:         [P, H] tokens, or None when only values move.
      values:    [P, k] float32 per-slot values (routing weights, cotangents), or None.
      dest_rank: [P, k] int32 global rank of each slot if it lands on this host, else -1.
      dest_row:  [P, k] int32 its row there, else -1.
    """

    x: jax.Array | None
    values: jax.Array | None
    dest_rank: jax.Array
    dest_row: jax.Array


class IntraHostLeg(Protocol):
    """Moves rows between a host's forwarders and its ranks (both directions)."""

    collect_needs_pool: bool  # collect wants the pool's routing (Pool with x, values None)

    def deliver(self, pool: Pool, num_recv: jax.Array, sizes: CallShape):
        """Forwarder pools -> per receiving rank (rows [C, H] | None, row_values [C] | None,
        row_src [C]) in the flat contract's layout (rows past num_recv, the receiver's row
        count, are zero, row_src -1)."""

    def collect(self, rows, row_scale, row_values, handle: Handle, pool: Pool | None,
                sizes: CallShape):
        """Receivers' rows -> per forwarder (pool_sum [P, H] f32 | None: the sum over this
        host's rows of each pool token's slots, in a fixed order, of f32(row_scale) *
        f32(rows); pool_values [P, k] f32 | None: each slot's row value; slots not on this
        host are ignored by the caller)."""

    def check_row_width(self, op: str, hidden: int, dtype) -> None: ...

    def check(self) -> None: ...

    def close(self) -> None: ...


def _all_to_all(x: jax.Array, axis_name: str, groups: list[list[int]]) -> jax.Array:
    """x [G, ...] with entry i for the i-th rank of this rank's group -> [G, ...] with entry i
    from that rank. Groups of one rank are a no-op; one group spanning the axis needs none."""
    if len(groups[0]) == 1:
        return x
    return lax.all_to_all(x, axis_name, 0, 0,
                          axis_index_groups=None if len(groups) == 1 else groups)


class XlaIntraHostLeg(NoDeviceState):
    """The intra-host leg in pure JAX: a grouped all_to_all over the ranks of each host.

    Each forwarder sends a rank of its host the pool tokens with a slot there, compacted in pool
    order into a chunk of min(P, C) tokens (a rank receives at most C rows, so at most C tokens
    from one forwarder), with each token's source id and the dest_row of its slots there."""

    collect_needs_pool = False

    def __init__(self, axis_name: str, topo: Topology):
        self.axis_name = axis_name
        self.topo = topo
        self.groups = topo.intra_groups()
        self.rank_at = topo.rank_at()

    def check_row_width(self, op: str, hidden: int, dtype) -> None:
        """Any hidden size and supported dtype works."""

    def _a2a(self, x):
        return _all_to_all(x, self.axis_name, self.groups)

    def _me(self):
        me = lax.axis_index(self.axis_name)
        return (jnp.asarray(self.topo.host_of, jnp.int32)[me],
                jnp.asarray(self.topo.local_of, jnp.int32)[me])

    def deliver(self, pool: Pool, num_recv, sizes: CallShape):
        t, k, c = sizes.num_tokens, sizes.top_k, sizes.capacity
        num_local = self.topo.ranks_per_host
        p = self.topo.num_hosts * t
        chunk = min(p, c)
        my_host, my_local = self._me()
        peers = jnp.asarray(self.rank_at)[my_host]  # [L]
        for_peer = pool.dest_rank[None] == peers[:, None, None]  # [L, P, k]
        has = jnp.any(for_peer, axis=-1)  # [L, P]
        order = jnp.argsort(~has, axis=1, stable=True)[:, :chunk]  # pool entries, in pool order
        valid = jnp.arange(chunk)[None] < jnp.sum(has, axis=1, dtype=jnp.int32)[:, None]
        src_rank = jnp.asarray(self.rank_at)[order // t, my_local]
        src_token = jnp.where(valid, src_rank * t + order % t, -1)  # s * T + t
        slot_row = jnp.where(jnp.take_along_axis(for_peer, order[..., None], axis=1)
                             & valid[..., None], pool.dest_row[order], -1)  # [L, chunk, k]

        src_token = self._a2a(src_token).reshape(-1)  # [L * chunk]
        slot_row = self._a2a(slot_row).reshape(-1)  # [L * chunk * k]
        # Row r of this rank holds received slot slot_of_row[r] (entry // k, slot % k).
        slot_of_row = jnp.full(c, -1, jnp.int32).at[jnp.where(slot_row >= 0, slot_row, c)].set(
            jnp.arange(slot_row.shape[0], dtype=jnp.int32), mode="drop")
        has_row = slot_of_row >= 0
        slot = jnp.maximum(slot_of_row, 0)
        row_src = jnp.where(has_row, src_token[slot // k] * k + slot % k, -1)
        rows = values = None
        if pool.x is not None:
            got = self._a2a(pool.x[order]).reshape(num_local * chunk, -1)
            rows = jnp.where(has_row[:, None], got[slot // k], jnp.zeros((), got.dtype))
        if pool.values is not None:
            got = self._a2a(pool.values[order]).reshape(-1)
            values = jnp.where(has_row, got[slot], jnp.zeros((), got.dtype))
        return rows, values, row_src

    def collect(self, rows, row_scale, row_values, handle: Handle, pool, sizes: CallShape):
        n, t, k, c = sizes.num_ranks, sizes.num_tokens, sizes.top_k, sizes.capacity
        num_local = self.topo.ranks_per_host
        p = self.topo.num_hosts * t
        chunk = min(p, c)
        host_of = jnp.asarray(self.topo.host_of, jnp.int32)
        local_of = jnp.asarray(self.topo.local_of, jnp.int32)
        # The pool tokens this rank holds slots of, per forwarder, in pool order: the same set
        # the forwarder sent in deliver (the tokens with a slot delivered here).
        rs = handle.row_src
        held = rs >= 0
        src = jnp.where(held, rs // (t * k), 0)
        wanted = jnp.zeros((num_local, p), bool).at[
            jnp.where(held, local_of[src], num_local), host_of[src] * t + (rs // k) % t].set(
                True, mode="drop")
        order = jnp.argsort(~wanted, axis=1, stable=True)[:, :chunk]  # [L, chunk]
        valid = jnp.arange(chunk)[None] < jnp.sum(wanted, axis=1, dtype=jnp.int32)[:, None]
        src_rank = jnp.asarray(self.rank_at)[order // t, jnp.arange(num_local)[:, None]]
        slot_code = (src_rank * t + order % t)[..., None] * k + jnp.arange(k)  # [L, chunk, k]
        row_of_slot = jnp.full(n * t * k, -1, jnp.int32).at[jnp.where(held, rs, n * t * k)].set(
            jnp.arange(c, dtype=jnp.int32), mode="drop")
        row = jnp.where(valid[..., None], row_of_slot[slot_code], -1)  # [L, chunk, k]
        has = row >= 0
        row = jnp.maximum(row, 0)

        pool_index = self._a2a(jnp.where(valid, order, p))  # [L, chunk]; p = nothing
        pool_sum = pool_values = None
        if rows is not None:
            contrib = rows.astype(_f32)
            if row_scale is not None:
                contrib = row_scale.astype(_f32)[:, None] * contrib
            part = jnp.zeros((num_local, chunk, rows.shape[1]), _f32)
            for j in range(k):  # fixed order: slot 0, 1, ..., k - 1
                part = jnp.where(has[..., j, None], part + contrib[row[..., j]], part)
            part = self._a2a(part)
            pool_sum = jnp.zeros((p, rows.shape[1]), _f32)
            for l in range(num_local):  # fixed order over the host's ranks
                pool_sum = pool_sum.at[pool_index[l]].add(part[l], mode="drop")
        if row_values is not None:
            # -0.0 is the exact identity of float addition (x + -0.0 == x, even for x = -0.0),
            # so summing over the host's ranks returns the one holder's value bit for bit.
            vals = self._a2a(jnp.where(has, row_values[row], -0.0).astype(_f32))
            pool_values = jnp.full((p, k), -0.0, _f32)
            for l in range(num_local):
                pool_values = pool_values.at[pool_index[l]].add(vals[l], mode="drop")
        return pool_sum, pool_values


class HierarchicalBackend:
    """Two-leg dispatch/combine over `topo`'s hosts; see the module docstring."""

    def __init__(self, axis_name: str, topo: Topology, intra: IntraHostLeg | None = None):
        topo.check_uniform("EPGroup(backend='hierarchical')")
        self.axis_name = axis_name
        self.topo = topo
        self.inter_groups = topo.inter_groups()
        self.intra = intra if intra is not None else XlaIntraHostLeg(axis_name, topo)

    def check_row_width(self, op: str, hidden: int, dtype) -> None:
        self.intra.check_row_width(op, hidden, dtype)

    def check(self) -> None:
        self.intra.check()

    def close(self) -> None:
        self.intra.close()

    def _inter(self, x):
        """[num_hosts, ...] entry g for host g -> [num_hosts, ...] entry g from host g."""
        return _all_to_all(x, self.axis_name, self.inter_groups)

    def _inter_packed(self, parts: list) -> list:
        """_inter of several [num_hosts, T, ...] arrays as one collective: their bytes side by
        side per (host, token). Between hosts each collective pays the network's latency, so a
        dispatch moves its routing, weights and tokens in one."""
        if len(parts) == 1 or len(self.inter_groups[0]) == 1:  # one host: nothing to move
            return [self._inter(a) for a in parts]
        nh, t = parts[0].shape[:2]
        packed = jnp.concatenate(
            [lax.bitcast_convert_type(a, jnp.uint8).reshape(nh, t, -1) for a in parts], axis=-1)
        got = self._inter(packed)
        out, at = [], 0
        for a in parts:
            size = a.dtype.itemsize
            n = size * int(np.prod(a.shape[2:], dtype=np.int64))
            piece = got[..., at:at + n].reshape(a.shape + ((size,) if size > 1 else ()))
            out.append(lax.bitcast_convert_type(piece, a.dtype))
            at += n
        return out

    def _dest_host(self, dest_rank):
        host_of = jnp.asarray(self.topo.host_of, jnp.int32)
        return jnp.where(dest_rank >= 0, host_of[jnp.maximum(dest_rank, 0)], -1)

    # --- forward: source -> forwarder -> receiver ------------------------------------------------

    def _routing_out(self, dest_rank, dest_row):
        """[num_hosts, T, k, 2] int32: for each host, (dest_rank, dest_row) of the slots landing
        there, -1 elsewhere; 2k int32 per token cross each remote host."""
        nh = self.topo.num_hosts
        on_host = self._dest_host(dest_rank)[None] == jnp.arange(nh)[:, None, None]  # [nh, T, k]
        return jnp.stack([jnp.where(on_host, dest_rank[None], -1),
                          jnp.where(on_host, dest_row[None], -1)], axis=-1)

    def _pool_routing(self, dest_rank, dest_row, sizes: CallShape) -> Pool:
        """The forwarder's pool routing alone (combine's, for a leg that collects by it)."""
        meta = self._inter(self._routing_out(dest_rank, dest_row))
        meta = meta.reshape(self.topo.num_hosts * sizes.num_tokens, sizes.top_k, 2)
        return Pool(None, None, meta[..., 0], meta[..., 1])

    def _forward(self, x, slot_values, dest_rank, dest_row, num_recv, sizes: CallShape):
        nh, t, k = self.topo.num_hosts, sizes.num_tokens, sizes.top_k
        p = nh * t
        parts = [self._routing_out(dest_rank, dest_row)]
        if x is not None:
            parts.append(jnp.broadcast_to(x, (nh,) + x.shape))
        if slot_values is not None:
            parts.append(jnp.broadcast_to(slot_values, (nh, t, k)))
        got = self._inter_packed(parts)
        meta = got[0].reshape(p, k, 2)
        pool = Pool(got[1].reshape(p, x.shape[1]) if x is not None else None,
                    got[-1].reshape(p, k) if slot_values is not None else None,
                    meta[..., 0], meta[..., 1])
        return self.intra.deliver(pool, num_recv, sizes)

    def dispatch(self, x, topk_idx, topk_weights, sizes: CallShape):
        dest_rank, dest_row, group_sizes, num_recv, num_dropped = routing.route(
            topk_idx, self.axis_name, sizes)
        rows, row_weights, row_src = self._forward(x, topk_weights, dest_rank, dest_row, num_recv,
                                                   sizes)
        handle = Handle(dest_rank=dest_rank, dest_row=dest_row, row_src=row_src,
                        num_recv=num_recv)
        num_invalid = routing.count_invalid(topk_idx, sizes.num_experts)
        return rows, row_weights, group_sizes, num_dropped, handle, num_invalid

    def redispatch(self, x, slot_values, handle: Handle, sizes: CallShape):
        rows, values, _ = self._forward(x, slot_values, handle.dest_rank, handle.dest_row,
                                        handle.num_recv, sizes)
        return rows, values

    # --- backward: receiver -> forwarder -> source -----------------------------------------------

    def combine(self, rows, row_scale, row_values, handle: Handle, sizes: CallShape):
        nh, t = self.topo.num_hosts, sizes.num_tokens
        pool = (self._pool_routing(handle.dest_rank, handle.dest_row, sizes)
                if self.intra.collect_needs_pool else None)
        pool_sum, pool_values = self.intra.collect(rows, row_scale, row_values, handle, pool,
                                                   sizes)
        out = slot_values = None
        parts = [a.reshape((nh, t, -1)) for a in (pool_sum, pool_values) if a is not None]
        back_parts = self._inter_packed(parts)
        if pool_sum is not None:
            back = back_parts[0]  # [host, T, H] partial sums
            acc = back[0]
            for g in range(1, nh):  # fixed order over hosts
                acc = acc + back[g]
            out = acc.astype(rows.dtype)
        if pool_values is not None:
            back = back_parts[-1]  # [host, T, k]
            dest_host = self._dest_host(handle.dest_rank)
            picked = jnp.take_along_axis(back, jnp.maximum(dest_host, 0)[None], axis=0)[0]
            slot_values = jnp.where(dest_host >= 0, picked, jnp.zeros((), _f32))
        return out, slot_values
