"""The pytrees that dispatch returns and combine takes."""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Handle:
    """What combine needs to route rows back; the same for every backend.

    Per rank, with T tokens, k slots and C receive rows:
      dest_rank: [T, k] int32, the rank that received slot (t, j), -1 if not delivered
        (unrouted, invalid id, or dropped for capacity).
      dest_row:  [T, k] int32, the row on dest_rank that holds slot (t, j), -1 if not delivered.
      row_src:   [C] int32, for each row of this rank: src_rank * T * k + t * k + j of the slot
        it holds, -1 for rows past num_recv.
      num_recv:  [] int32, rows in use on this rank (= sum(group_sizes)).
    """

    dest_rank: jax.Array
    dest_row: jax.Array
    row_src: jax.Array
    num_recv: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PaddedHandle:
    """What combine needs to route rows of the padded layout back (`layout="padded"`).

    Per rank, with T tokens, k slots, E_local local experts and N ranks:
      slot_expert: [T, k] int32, the global expert that received slot (t, j), -1 if not
        delivered (unrouted, invalid id, or a repeat of an expert earlier in the token's top-k).
      slot_pos:    [T, k] int32, the slot's position in its (expert, source rank) block on the
        expert's rank, -1 if not delivered.
      recv_counts: [E_local, N] int32, rows received per (local expert, source rank).
    """

    slot_expert: jax.Array
    slot_pos: jax.Array
    recv_counts: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Dispatched:
    """The result of `jax_ep.dispatch` on one rank.

      x:           [C, H] rows for this rank's experts, expert-major, ordered by
                   (local expert, source rank, source token, slot); rows past sum(group_sizes)
                   are zero.
      weights:     [C] float32, the routing weight of each row (0 past sum(group_sizes)).
      group_sizes: [E_local] int32, rows per local expert; feeds jax.lax.ragged_dot directly.
      num_dropped: [] int32, rows sent to this rank that did not fit in C.
      num_invalid: [] int32, slots of this rank's topk_idx outside [-1, E), treated as -1.
      handle:      the routing, for combine (a Handle, or a PaddedHandle for layout="padded").
      scales:      with an fp8 dispatch, the rows' float32 scales ([C, H/128], padded:
                   [E_local, N * M, H/128]); else None.
      recv_counts: layout="padded" only: [E_local, N] int32 rows per (local expert, source).

    With layout="padded" (M = EPConfig.max_tokens), x is [E_local, N * M, H]: the rows from
    source rank s for local expert l sit at x[l, s * M + p], p = 0, 1, ... in (source token,
    slot) order, zero past recv_counts[l, s]; weights is [E_local, N * M]; group_sizes[l] =
    sum_s recv_counts[l, s]; num_dropped counts the slots that repeat an expert already in the
    same token's top-k (they are not delivered, see docs/padded_layout.md).
    """

    x: jax.Array
    weights: jax.Array
    group_sizes: jax.Array
    num_dropped: jax.Array
    num_invalid: jax.Array
    handle: Handle | PaddedHandle
    scales: jax.Array | None = None
    recv_counts: jax.Array | None = None
