"""The routing math of docs/contract.md, in JAX: where each routed slot lands.

Per source rank s, with the count matrix M[s', e] (slots of rank s' routed to global expert e,
gathered from every rank), a slot (t, j) of rank s routed to expert e = d * E_local + l lands on
rank d at row

    row = start[d, l] + src_offset[s, e] + rank_in_expert[t, j]

    start[d, l]        = sum over l' < l of total[d, l']          (expert-major blocks)
    total[d, l]        = sum over s' of M[s', d * E_local + l]
    src_offset[s, e]   = sum over s' < s of M[s', e]               (source-rank order in a block)
    rank_in_expert     = slots of rank s before (t, j) in flat order t * k + j with the same e

which is the row order (local expert, source rank, source token, slot). Rows at or past C are
dropped: counted on the receiving rank, not delivered. The CUDA kernels compute the same
quantities (cuda/routing.cu); tests check both against an independent numpy oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep.config import CallShape


def valid_slots(topk_idx: jax.Array, num_experts: int) -> jax.Array:
    """[T, k] bool: slots routed to a real expert (ids outside [0, E) count as unrouted)."""
    return (topk_idx >= 0) & (topk_idx < num_experts)


def count_invalid(topk_idx: jax.Array, num_experts: int) -> jax.Array:
    """[] int32: slots whose id is outside [-1, E)."""
    return jnp.sum((topk_idx < -1) | (topk_idx >= num_experts), dtype=jnp.int32)


def expert_counts(flat_expert: jax.Array, num_experts: int) -> jax.Array:
    """[E] int32 slots per expert; flat_expert uses E as the 'unrouted' sentinel."""
    return jnp.zeros(num_experts + 1, jnp.int32).at[flat_expert].add(1)[:num_experts]


def rank_in_expert(flat_expert: jax.Array, num_experts: int) -> jax.Array:
    """[T*k] int32: how many earlier slots (in flat order) share the slot's expert."""
    n = flat_expert.shape[0]
    order = jnp.argsort(flat_expert, stable=True)
    sorted_expert = flat_expert[order]
    counts = jnp.zeros(num_experts + 1, jnp.int32).at[flat_expert].add(1)
    first = jnp.cumsum(counts) - counts
    ranks_sorted = jnp.arange(n, dtype=jnp.int32) - first[sorted_expert]
    return jnp.zeros(n, jnp.int32).at[order].set(ranks_sorted)


def row_bases(count_matrix: jax.Array, sizes: CallShape) -> tuple[jax.Array, jax.Array]:
    """From M [N, E]: base [N, E] (first row on rank e // E_local of source s's slots for e) and
    total [N, E_local] (rows sent to each local expert of each rank, before capacity)."""
    n, el = sizes.num_ranks, sizes.experts_per_rank
    m = count_matrix.reshape(n, n, el)  # [src, dst, local expert]
    total = m.sum(axis=0)  # [dst, local expert]
    start = jnp.cumsum(total, axis=1) - total
    src_offset = jnp.cumsum(m, axis=0) - m
    base = start[None, :, :] + src_offset
    return base.reshape(n, n * el), total


def receive_sizes(total: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """From one rank's total [E_local]: (group_sizes [E_local], num_recv [], num_dropped [])
    after the capacity cut: the rows last in row order are the ones dropped."""
    end = jnp.cumsum(total)
    start = end - total
    kept = jnp.clip(capacity - start, 0, total).astype(jnp.int32)
    arrived = jnp.sum(total)
    num_recv = jnp.minimum(arrived, capacity).astype(jnp.int32)
    return kept, num_recv, (arrived - num_recv).astype(jnp.int32)


def slot_destinations(
    topk_idx: jax.Array, my_base: jax.Array, sizes: CallShape
) -> tuple[jax.Array, jax.Array]:
    """(dest_rank, dest_row), each [T, k] int32, -1 where the slot is not delivered.

    my_base: [E], this rank's row of `row_bases(...)[0]`.
    """
    e_all = sizes.num_experts
    valid = valid_slots(topk_idx, e_all)
    flat_expert = jnp.where(valid, topk_idx, e_all).reshape(-1)
    padded_base = jnp.concatenate([my_base, jnp.zeros((1,), my_base.dtype)])
    row = padded_base[flat_expert] + rank_in_expert(flat_expert, e_all)
    row = row.reshape(topk_idx.shape)
    delivered = valid & (row < sizes.capacity)
    dest_rank = jnp.where(delivered, topk_idx // sizes.experts_per_rank, -1)
    return dest_rank.astype(jnp.int32), jnp.where(delivered, row, -1).astype(jnp.int32)


def route(topk_idx: jax.Array, axis_name: str, sizes: CallShape):
    """The routing of one dispatch on this rank, inside shard_map over `axis_name`: gathers the
    count matrix M [N, E] (N * E int32 per rank: the only exchange the routing needs) and returns
    (dest_rank [T, k], dest_row [T, k], group_sizes [E_local], num_recv [], num_dropped [])."""
    me = jax.lax.axis_index(axis_name)
    flat_expert = jnp.where(
        valid_slots(topk_idx, sizes.num_experts), topk_idx, sizes.num_experts).reshape(-1)
    count_matrix = jax.lax.all_gather(expert_counts(flat_expert, sizes.num_experts), axis_name)
    base, total = row_bases(count_matrix, sizes)
    dest_rank, dest_row = slot_destinations(topk_idx, base[me], sizes)
    group_sizes, num_recv, num_dropped = receive_sizes(total[me], sizes.capacity)
    return dest_rank, dest_row, group_sizes, num_recv, num_dropped


# --- the padded (low-latency) layout ----------------------------------------------------------
#
# Rows land at a static place, so no count exchange precedes the data: on the rank of expert
# e = d * E_local + l, slot (t, j) of source rank s sits at [l, s * M + p], where p is the number
# of earlier delivered slots (in t * k + j order) of rank s with the same expert. A token sends at
# most one row per expert: a slot whose expert already appeared earlier in the same token's top-k
# is not delivered (counted as dropped on the expert's rank), so p < T <= M always holds and the
# layout can never overflow.


def repeated_slots(topk_idx: jax.Array, num_experts: int) -> jax.Array:
    """[T, k] bool: valid slots whose expert appears at an earlier slot of the same token."""
    valid = valid_slots(topk_idx, num_experts)
    k = topk_idx.shape[1]
    same = topk_idx[:, :, None] == topk_idx[:, None, :]  # [T, j, j']
    earlier = jnp.arange(k)[None, :] < jnp.arange(k)[:, None]  # [j, j']: j' < j
    return valid & jnp.any(same & earlier[None], axis=-1)


def padded_slots(topk_idx: jax.Array, sizes: CallShape):
    """The padded layout of one source rank.

    Returns (slot_expert [T, k], slot_pos [T, k], counts [E], repeats [E]), int32: the expert and
    position of each delivered slot (-1 where not delivered), the rows sent to each expert, and
    the repeated slots each expert did not get.
    """
    e_all = sizes.num_experts
    valid = valid_slots(topk_idx, e_all)
    repeated = repeated_slots(topk_idx, e_all)
    delivered = valid & ~repeated
    flat = jnp.where(delivered, topk_idx, e_all).reshape(-1)
    pos = rank_in_expert(flat, e_all).reshape(topk_idx.shape)
    slot_expert = jnp.where(delivered, topk_idx, -1).astype(jnp.int32)
    slot_pos = jnp.where(delivered, pos, -1).astype(jnp.int32)
    counts = expert_counts(flat, e_all)
    repeats = expert_counts(jnp.where(repeated, topk_idx, e_all).reshape(-1), e_all)
    return slot_expert, slot_pos, counts, repeats
