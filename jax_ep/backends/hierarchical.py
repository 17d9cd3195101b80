"""The hierarchical backend: EP over several hosts in two legs, with the flat contract's output.

Rank r = (host h, local index l). Dispatch:
  1. layout: the [N, E] count matrix is all-gathered (small) and every rank computes where each
     of its slots lands, exactly as the flat backends do (routing.route), so d.x, d.weights,
     d.group_sizes and the handle are the flat contract's, bit for bit.
  2. inter-host leg, over the ranks of local index l (one per host): a token crosses to host g
     only if one of its delivered slots lands there, once, to the rank of the same local index
     (its *forwarder*), with its source token id and the (dest_rank, dest_row) of its slots.
     Each rank compacts, per host, the tokens it sends there in token order (HostRoute); the
     engine (InterHostEngine) is XLA's ragged_all_to_all after a count exchange (GPUs with
     RAGGED_XLA_FLAG: only the routed tokens move) or a static all_to_all of T entries per host. The
     forwarder expands what arrived into its *pool*: entry g * T + t = token t of rank (g, l).
  3. intra-host leg (IntraHostLeg): the forwarder hands each rank of its host the pool tokens
     with slots there, and that rank places each slot's row at its dest_row.
Combine runs the legs backwards: each rank sums its rows per (source rank, token) in float32,
the forwarder sums those of its host, and the partial of each pool token that came in goes
back along the same compacted route, in the rows' dtype (EPConfig.f32_partials: float32).

The intra-host leg is an object with two methods (deliver, collect): the pure-JAX one here, or
the cuda kernels' (jax_ep/backends/cuda/intra_host.py), which write rows straight into the
receivers' rows over NVLink (docs/multihost.md). The padded layout
(jax_ep/backends/hierarchical_padded.py) shares the inter-host leg (forward_records,
partials_home) and has an intra-host leg of its own.
"""

from __future__ import annotations

import os

from typing import NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_ep import routing
from jax_ep.backends import NoDeviceState
from jax_ep.config import CallShape
from jax_ep.topology import Topology
from jax_ep.types import Handle, PaddedHandle

_f32 = jnp.float32
_i32 = jnp.int32

INTER_HOST = ("auto", "ragged", "all_to_all")
# Platforms whose XLA implements ragged-all-to-all (XLA:CPU: "UNIMPLEMENTED: ragged-all-to-all").
RAGGED_PLATFORMS = ("gpu",)
# XLA's GPU ragged-all-to-all between processes of different hosts runs as NCCL send/recv only
# when this flag allows it (else: "INVALID_ARGUMENT: RaggedAllToAll fallback to NCCL is not
# allowed"; seen on jax 0.11.2). It must be in XLA_FLAGS before JAX starts its GPU backend,
# which a library cannot do for its user, so "auto" takes the ragged engine only when it is set.
RAGGED_XLA_FLAG = "--xla_gpu_allow_ragged_all_to_all_nccl_send_recv_fallback=true"


def ragged_flag_set(xla_flags: str | None = None) -> bool:
    """Whether XLA_FLAGS (or `xla_flags`) allows ragged_all_to_all across hosts over NCCL."""
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    return RAGGED_XLA_FLAG in flags.split()


def resolve_inter_host(inter_host: str, platforms: Sequence[str],
                       xla_flags: str | None = None) -> str:
    """The inter-host engine for a group on devices of `platforms`: "ragged" on GPUs when
    XLA_FLAGS holds RAGGED_XLA_FLAG, else "all_to_all"; a forced "ragged" where it cannot run
    is a ValueError saying what is missing."""
    if inter_host not in INTER_HOST:
        raise ValueError(f"EPGroup: inter_host must be one of {INTER_HOST}, got {inter_host!r}")
    ragged_platform = set(platforms) <= set(RAGGED_PLATFORMS)
    flag = ragged_flag_set(xla_flags)
    if inter_host == "auto":
        return "ragged" if ragged_platform and flag else "all_to_all"
    if inter_host == "ragged" and not ragged_platform:
        raise ValueError(f"EPGroup: inter_host='ragged' needs devices whose XLA implements "
                         f"ragged_all_to_all ({', '.join(RAGGED_PLATFORMS)}), got "
                         f"{sorted(set(platforms))}; use inter_host='all_to_all' (or 'auto')")
    if inter_host == "ragged" and not flag:
        raise ValueError(f"EPGroup: inter_host='ragged' needs XLA_FLAGS to hold "
                         f"{RAGGED_XLA_FLAG} before JAX starts (XLA refuses ragged_all_to_all "
                         f"between hosts over NCCL without it); or use inter_host='all_to_all'")
    return inter_host


class Pool(NamedTuple):
    """What a forwarder holds after the inter-host leg; P = num_hosts * T entries, entry
    g * T + t = token t of the rank of this local index on host g (zeros and -1 for tokens
    that did not come: those with no slot on this host).

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
        host are ignored by the caller; held [P] bool: the pool tokens with a slot on this
        host, i.e. those the inter-host leg brought, which go back)."""

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


# --- the inter-host route: which tokens cross to which host ------------------------------------


class HostRoute(NamedTuple):
    """One rank's tokens per destination host, compacted in token order.

      order: [num_hosts, T] int32, order[g, i] = the i-th token with a slot landing on host g,
             for i < count[g]; T (out of range) past it.
      count: [num_hosts] int32 tokens per host (this rank's own host included).
    """

    order: jax.Array
    count: jax.Array


def compact(has: jax.Array) -> HostRoute:
    """has [G, T] bool -> the HostRoute of the True entries of each row, in index order."""
    t = has.shape[1]
    count = jnp.sum(has, axis=1, dtype=_i32)
    order = jnp.argsort(~has, axis=1, stable=True).astype(_i32)
    return HostRoute(jnp.where(jnp.arange(t)[None] < count[:, None], order, t), count)


def slot_hosts(dest_rank: jax.Array, topo: Topology) -> jax.Array:
    """[T, k] int32: the host of each delivered slot, -1 where not delivered."""
    host_of = jnp.asarray(topo.host_of, _i32)
    return jnp.where(dest_rank >= 0, host_of[jnp.maximum(dest_rank, 0)], -1)


def host_route(dest_rank: jax.Array, topo: Topology) -> HostRoute:
    """The inter-host route of one rank's tokens from its handle's dest_rank [T, k]: a token goes
    to host g once if at least one of its delivered slots lands there."""
    hosts = jnp.arange(topo.num_hosts, dtype=_i32)
    return compact(jnp.any(slot_hosts(dest_rank, topo)[None] == hosts[:, None, None], axis=-1))


def slot_ranks(handle: Handle | PaddedHandle) -> jax.Array:
    """[T, k] int32: the rank holding each delivered slot, -1 where not delivered: a Handle's
    dest_rank, or the rank of a PaddedHandle's slot_expert (E_local = recv_counts' rows)."""
    if isinstance(handle, PaddedHandle):
        experts_local = handle.recv_counts.shape[0]
        return jnp.where(handle.slot_expert >= 0, handle.slot_expert // experts_local, -1)
    return handle.dest_rank


def inter_host_tokens(handle: Handle | PaddedHandle, topo: Topology) -> jax.Array:
    """[num_hosts] int32, per rank inside shard_map: the tokens this rank's dispatch sends to
    each host (its own host's entry stays on the host), and the partials its combine gets back
    from each, in either layout. What the inter-host leg moves (docs/multihost.md); see
    entry_bytes."""
    return host_route(slot_ranks(handle), topo).count


def _dispatch_fields(top_k: int, hidden: int | None, dtype, with_values: bool):
    """The per-token record of the forward leg: [(trailing shape, dtype)], in packing order."""
    fields = [((), _i32), ((top_k,), _i32), ((top_k,), _i32)]  # token id, dest rank, dest row
    if hidden is not None:
        fields.append(((hidden,), jnp.dtype(dtype)))
    if with_values:
        fields.append(((top_k,), jnp.dtype(_f32)))
    return fields


def _combine_fields(top_k: int, hidden: int | None, dtype, with_values: bool):
    """The per-token record of the backward leg: partial sum, slot values."""
    fields = [((hidden,), jnp.dtype(dtype))] if hidden is not None else []
    return fields + ([((top_k,), jnp.dtype(_f32))] if with_values else [])


def _record_bytes(fields) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) * jnp.dtype(dt).itemsize
               for shape, dt in fields)


def entry_bytes(direction: str, top_k: int, hidden: int | None, dtype,
                with_values: bool) -> int:
    """Bytes of one token's record crossing to one host: direction "dispatch" (token id,
    (dest_rank, dest_row) per slot, the row of `hidden` elements of `dtype` if any, the slot
    values if with_values) or "combine" (the partial in `dtype`, the slot values). Times
    inter_host_tokens, the bytes an engine that moves only routed tokens (ragged) sends."""
    fields = {"dispatch": _dispatch_fields, "combine": _combine_fields}[direction]
    return _record_bytes(fields(top_k, hidden, dtype, with_values))


def _pack(parts: list[jax.Array], lead: int) -> jax.Array:
    """Arrays sharing their first `lead` dims -> uint8 [*lead dims, bytes], their bytes side by
    side: one collective moves them all (between hosts each collective pays the latency)."""
    shape = parts[0].shape[:lead]
    return jnp.concatenate([lax.bitcast_convert_type(a, jnp.uint8).reshape(shape + (-1,))
                            for a in parts], axis=-1)


def _unpack(packed: jax.Array, fields) -> list[jax.Array]:
    """Inverse of _pack: uint8 [..., bytes] -> one array per (trailing shape, dtype) field."""
    lead, out, at = packed.shape[:-1], [], 0
    for shape, dt in fields:
        size = jnp.dtype(dt).itemsize
        n = size * int(np.prod(shape, dtype=np.int64))
        piece = packed[..., at:at + n].reshape(lead + tuple(shape) + ((size,) if size > 1 else ()))
        out.append(lax.bitcast_convert_type(piece, dt))
        at += n
    return out


class InterHostEngine:
    """Moves each rank's compacted per-host chunks to the rank of its local index on each host.

    send [num_hosts, T, B] uint8: chunk g (its first send_count[g] entries valid) for host g.
    Returns [num_hosts, T, B]: chunk g from host g in the same place, its first recv_count[g]
    entries valid, the rest `fill` bytes (ragged) or whatever the sender's padding held
    (all_to_all: callers pad with `fill` too). "all_to_all" moves every chunk whole (T entries
    per host: static shapes, no count needed); "ragged" moves only the valid entries, and needs
    recv_count (a count exchange before a dispatch; combine knows it from its own route)."""

    def __init__(self, kind: str, axis_name: str, topo: Topology):
        self.kind = kind
        self.axis_name = axis_name
        self.topo = topo
        self.groups = topo.inter_groups()

    @property
    def needs_counts(self) -> bool:
        return self.kind == "ragged" and len(self.groups[0]) > 1

    def exchange_counts(self, send_count: jax.Array) -> jax.Array:
        """[num_hosts] int32 sent to each host -> [num_hosts] received from each host."""
        return _all_to_all(send_count[:, None], self.axis_name, self.groups)[:, 0]

    def exchange(self, send: jax.Array, send_count: jax.Array, recv_count: jax.Array | None,
                 fill: int) -> jax.Array:
        nh, t, width = send.shape
        if len(self.groups[0]) == 1:
            return send
        if self.kind == "all_to_all":
            return _all_to_all(send, self.axis_name, self.groups)
        my_host = jnp.asarray(self.topo.host_of, _i32)[lax.axis_index(self.axis_name)]
        starts = jnp.arange(nh, dtype=_i32) * t  # chunk g at g * T, on both sides
        got = lax.ragged_all_to_all(
            send.reshape(nh * t, width), jnp.full((nh * t, width), fill, jnp.uint8),
            starts, send_count, jnp.full((nh,), my_host * t, _i32), recv_count,
            axis_name=self.axis_name,
            axis_index_groups=None if len(self.groups) == 1 else self.groups)
        return got.reshape(nh, t, width)


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
        held = jnp.zeros(p, bool).at[pool_index.reshape(-1)].set(True, mode="drop")
        return pool_sum, pool_values, held


class HierarchicalBackend:
    """Two-leg dispatch/combine over `topo`'s hosts; see the module docstring.

    inter_host: the engine of the inter-host leg ("ragged" or "all_to_all", InterHostEngine).
    f32_partials: combine's partial sums cross hosts in float32 instead of the rows' dtype."""

    def __init__(self, axis_name: str, topo: Topology, intra: IntraHostLeg | None = None,
                 inter_host: str = "all_to_all", f32_partials: bool = False):
        topo.check_uniform("EPGroup(backend='hierarchical')")
        self.axis_name = axis_name
        self.topo = topo
        self.engine = InterHostEngine(inter_host, axis_name, topo)
        self.f32_partials = f32_partials
        self.intra = intra if intra is not None else XlaIntraHostLeg(axis_name, topo)

    def check_row_width(self, op: str, hidden: int, dtype) -> None:
        self.intra.check_row_width(op, hidden, dtype)

    def check(self) -> None:
        self.intra.check()

    def close(self) -> None:
        self.intra.close()

    # --- forward: source -> forwarder -> receiver ------------------------------------------------

    def _send(self, parts: list[jax.Array], route: HostRoute) -> jax.Array:
        """Per-token arrays [T, ...] -> what the forwarders of every host got: uint8
        [num_hosts, T, B], chunk g = the records of host g's sender, valid where the token id
        (first field) is >= 0 (padding is all 0xff bytes: id -1)."""
        send = jnp.take(_pack(parts, 1), route.order, axis=0, mode="fill", fill_value=0xFF)
        recv_count = self.engine.exchange_counts(route.count) if self.engine.needs_counts else None
        return self.engine.exchange(send, route.count, recv_count, fill=0xFF)

    def my_host(self) -> jax.Array:
        """[] int32: the host of this rank (inside shard_map)."""
        return jnp.asarray(self.topo.host_of, _i32)[lax.axis_index(self.axis_name)]

    def forward_records(self, parts: list[jax.Array], fields, route: HostRoute,
                        sizes: CallShape):
        """Sends each token's record (parts: per-token arrays [T, ...], the token ids first;
        fields: their (trailing shape, dtype), _pack's order) to the forwarder of each host of
        `route`. Returns what this forwarder got, one [num_hosts, T, ...] array per field (chunk
        g from host g, token id -1 past its tokens), and expand(a, fill), which places such an
        array at the pool entries g * T + t: [P, ...], `fill` where no token came."""
        nh, t = self.topo.num_hosts, sizes.num_tokens
        p = nh * t
        got = _unpack(self._send(parts, route), fields)
        token = got[0]  # [nh, T]
        entry = jnp.where(token >= 0, jnp.arange(nh, dtype=_i32)[:, None] * t + token, p)

        def expand(a, fill):
            return jnp.full((p,) + a.shape[2:], fill, a.dtype).at[entry].set(a, mode="drop")

        return got, expand

    def _pool(self, x, values, dest_rank, dest_row, sizes: CallShape) -> Pool:
        """Sends each token with its routing (and x, values if given) to the hosts of its slots
        and returns this forwarder's pool, expanded to entry g * T + t."""
        k = sizes.top_k
        parts = [jnp.arange(sizes.num_tokens, dtype=_i32), dest_rank, dest_row]
        parts += [a for a in (x, values) if a is not None]
        fields = _dispatch_fields(k, x.shape[1] if x is not None else None,
                                  x.dtype if x is not None else None, values is not None)
        got, expand = self.forward_records(parts, fields, host_route(dest_rank, self.topo), sizes)
        _, ranks, rows = got[:3]  # [nh, T], [nh, T, k], [nh, T, k]
        here = slot_hosts(ranks, self.topo) == self.my_host()  # padding: rank -1, never here
        return Pool(expand(got[3], 0) if x is not None else None,
                    expand(got[-1], 0) if values is not None else None,
                    expand(jnp.where(here, ranks, -1), -1), expand(jnp.where(here, rows, -1), -1))

    def _forward(self, x, slot_values, dest_rank, dest_row, num_recv, sizes: CallShape):
        pool = self._pool(x, slot_values, dest_rank, dest_row, sizes)
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

    def _send_back(self, parts: list[jax.Array], held: jax.Array, route: HostRoute):
        """Per pool entry [num_hosts, T, ...] on the forwarder -> on the source, the records its
        tokens got back from each host, [num_hosts, T, B] compacted along its own route (the
        forwarder holds exactly the tokens the source sent it, so both sides compact the same
        set in token order, and neither needs the other's counts)."""
        back = compact(held)
        packed = _pack(parts, 2)
        send = jnp.take_along_axis(packed, jnp.minimum(back.order, packed.shape[1] - 1)[..., None],
                                   axis=1)
        return self.engine.exchange(send, back.count, route.count, fill=0)

    def combine(self, rows, row_scale, row_values, handle: Handle, sizes: CallShape):
        pool = (self._pool(None, None, handle.dest_rank, handle.dest_row, sizes)
                if self.intra.collect_needs_pool else None)
        pool_sum, pool_values, held = self.intra.collect(rows, row_scale, row_values, handle,
                                                         pool, sizes)
        return self.partials_home(pool_sum, pool_values, held,
                                  host_route(handle.dest_rank, self.topo),
                                  slot_hosts(handle.dest_rank, self.topo), rows, sizes)

    def partials_home(self, pool_sum, pool_values, held, route: HostRoute, dest_host, rows,
                      sizes: CallShape):
        """The way back of a combine, from what the intra-host leg collected on the forwarder
        (pool_sum [P, H] f32 | None, pool_values [P, k] f32 | None, held [P] bool) to the source
        along its `route`: each host's partial crosses in the rows' dtype (float32 with
        f32_partials) and the source adds them in host order in float32, rounded once to the
        rows' dtype; each slot's value is taken from its host, dest_host [T, k] (-1: none).
        -> (out [T, H] | None, slot_values [T, k] | None)."""
        nh, t, k = self.topo.num_hosts, sizes.num_tokens, sizes.top_k
        partial_dtype = _f32 if self.f32_partials else rows.dtype if rows is not None else None
        parts = []
        if pool_sum is not None:
            parts.append(pool_sum.astype(partial_dtype).reshape(nh, t, -1))
        if pool_values is not None:
            parts.append(pool_values.reshape(nh, t, k))
        fields = _combine_fields(k, rows.shape[-1] if pool_sum is not None else None,
                                 partial_dtype, pool_values is not None)
        got = _unpack(self._send_back(parts, held.reshape(nh, t), route), fields)
        out = slot_values = None
        if pool_sum is not None:
            acc = jnp.zeros((t, rows.shape[-1]), _f32)
            for g in range(nh):  # fixed order over hosts
                acc = acc.at[route.order[g]].add(got[0][g].astype(_f32), mode="drop")
            out = acc.astype(rows.dtype)
        if pool_values is not None:
            # Each slot's value comes from the one host holding it.
            by_token = jnp.zeros((nh, t, k), _f32).at[
                jnp.arange(nh)[:, None], route.order].set(got[-1], mode="drop")
            picked = jnp.take_along_axis(by_token, jnp.maximum(dest_host, 0)[None], axis=0)[0]
            slot_values = jnp.where(dest_host >= 0, picked, jnp.zeros((), _f32))
        return out, slot_values
