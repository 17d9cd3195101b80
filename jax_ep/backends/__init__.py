"""Backends: each computes the same contract (DESIGN.md) with its own data movement.

A backend implements three per-rank operations, called inside shard_map over the group's axis:

  dispatch(x, topk_idx, topk_weights, sizes)
      -> (rows [C, H], row_weights [C], group_sizes [E_local], num_dropped [], handle)
  redispatch(x | None, slot_values | None, handle, sizes)
      -> (rows [C, H] | None, row_values [C] | None)         # move along an existing routing
  combine(rows | None, row_scale | None, row_values | None, handle, sizes)
      -> (out [T, H] | None, slot_values [T, k] | None)
         out[t] = sum over delivered slots j, in order, of f32(row_scale[r]) * f32(rows[r])
         slot_values[t, j] = row_values[r], with r = handle.dest_row[t, j]

Ids outside [0, E) are treated as unrouted by every backend.
"""
