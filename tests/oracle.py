"""An independent numpy oracle of docs/contract.md's contract, written from the text, not the code:
it lists every routed slot as a tuple, sorts the tuples into row order and cuts at capacity."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class OracleDispatch:
    rows: np.ndarray  # [N, C, H]
    row_weights: np.ndarray  # [N, C]
    group_sizes: np.ndarray  # [N, E_local]
    num_dropped: np.ndarray  # [N]
    num_invalid: np.ndarray  # [N]
    dest_rank: np.ndarray  # [N, T, k]
    dest_row: np.ndarray  # [N, T, k]
    row_src: np.ndarray  # [N, C]


def dispatch(x, topk_idx, topk_weights, num_experts: int, capacity: int) -> OracleDispatch:
    """x [N, T, H], topk_idx [N, T, k], topk_weights [N, T, k], per source rank."""
    n, t, k = topk_idx.shape
    h = x.shape[-1]
    el = num_experts // n
    rows = np.zeros((n, capacity, h), x.dtype)
    row_weights = np.zeros((n, capacity), np.float32)
    group_sizes = np.zeros((n, el), np.int32)
    num_dropped = np.zeros(n, np.int32)
    dest_rank = np.full((n, t, k), -1, np.int32)
    dest_row = np.full((n, t, k), -1, np.int32)
    row_src = np.full((n, capacity), -1, np.int32)
    num_invalid = ((topk_idx < -1) | (topk_idx >= num_experts)).sum(axis=(1, 2)).astype(np.int32)
    for d in range(n):
        arrivals = sorted(
            (int(topk_idx[s, tt, j]) % el, s, tt, j)
            for s in range(n) for tt in range(t) for j in range(k)
            if 0 <= topk_idx[s, tt, j] < num_experts and topk_idx[s, tt, j] // el == d)
        num_dropped[d] = max(0, len(arrivals) - capacity)
        for r, (local, s, tt, j) in enumerate(arrivals[:capacity]):
            rows[d, r] = x[s, tt]
            row_weights[d, r] = topk_weights[s, tt, j]
            group_sizes[d, local] += 1
            dest_rank[s, tt, j] = d
            dest_row[s, tt, j] = r
            row_src[d, r] = s * t * k + tt * k + j
    return OracleDispatch(rows, row_weights, group_sizes, num_dropped, num_invalid, dest_rank,
                          dest_row, row_src)


def ranks(want, sl: slice):
    """The oracle's results (OracleDispatch or OraclePadded) for ranks `sl` only."""
    fields = {f.name: getattr(want, f.name) for f in dataclasses.fields(want)}
    return type(want)(**{name: None if a is None else a[sl] for name, a in fields.items()})


def combine(rows, dest_rank, dest_row, row_weights=None) -> np.ndarray:
    """rows [N, C, H] on the expert ranks -> [N, T, H] float64 sums at the source ranks."""
    n, t, k = dest_rank.shape
    out = np.zeros((n, t, rows.shape[-1]), np.float64)
    for s in range(n):
        for tt in range(t):
            for j in range(k):
                d, r = dest_rank[s, tt, j], dest_row[s, tt, j]
                if r >= 0:
                    w = 1.0 if row_weights is None else float(row_weights[d, r])
                    out[s, tt] += w * rows[d, r].astype(np.float64)
    return out


def dense_moe_identity(x, topk_idx, topk_weights, num_experts: int) -> np.ndarray:
    """sum_j w[t, j] * x[t] over routed slots: combine(dispatch(x)) with fused weights, dropless."""
    routed = (topk_idx >= 0) & (topk_idx < num_experts)
    w = np.where(routed, topk_weights, 0.0).astype(np.float64)
    return (w[..., None] * x[..., None, :].astype(np.float64)).sum(axis=-2)


# --- the padded (low-latency) layout, from docs/padded_layout.md --------------------------------


@dataclasses.dataclass
class OraclePadded:
    rows: np.ndarray  # [N, E_local, N * M, H]
    row_weights: np.ndarray  # [N, E_local, N * M]
    recv_counts: np.ndarray  # [N, E_local, N]
    group_sizes: np.ndarray  # [N, E_local]
    num_dropped: np.ndarray  # [N]
    num_invalid: np.ndarray  # [N]
    slot_expert: np.ndarray  # [N, T, k]
    slot_pos: np.ndarray  # [N, T, k]
    scales: np.ndarray | None  # [N, E_local, N * M, S]


def padded_dispatch(x, topk_idx, topk_weights, num_experts: int, slots_per_source: int,
                    scales=None) -> OraclePadded:
    """Walks every source token's slots in order; a token's second slot for an expert is not
    delivered and counts as dropped on the expert's rank."""
    n, t, k = topk_idx.shape
    el, m = num_experts // n, slots_per_source
    rows = np.zeros((n, el, n * m) + x.shape[2:], x.dtype)
    row_weights = np.zeros((n, el, n * m), np.float32)
    out_scales = None if scales is None else np.zeros((n, el, n * m, scales.shape[-1]),
                                                      np.float32)
    recv_counts = np.zeros((n, el, n), np.int32)
    num_dropped = np.zeros(n, np.int32)
    slot_expert = np.full((n, t, k), -1, np.int32)
    slot_pos = np.full((n, t, k), -1, np.int32)
    num_invalid = ((topk_idx < -1) | (topk_idx >= num_experts)).sum(axis=(1, 2)).astype(np.int32)
    for s in range(n):
        for tt in range(t):
            seen = set()
            for j in range(k):
                e = int(topk_idx[s, tt, j])
                if not 0 <= e < num_experts:
                    continue
                d, l = divmod(e, el)
                if e in seen:
                    num_dropped[d] += 1
                    continue
                seen.add(e)
                p = recv_counts[d, l, s]
                recv_counts[d, l, s] += 1
                rows[d, l, s * m + p] = x[s, tt]
                row_weights[d, l, s * m + p] = topk_weights[s, tt, j]
                if scales is not None:
                    out_scales[d, l, s * m + p] = scales[s, tt]
                slot_expert[s, tt, j] = e
                slot_pos[s, tt, j] = p
    return OraclePadded(rows, row_weights, recv_counts, recv_counts.sum(axis=2).astype(np.int32),
                        num_dropped, num_invalid, slot_expert, slot_pos, out_scales)


def padded_combine(rows, slot_expert, slot_pos, row_weights=None) -> np.ndarray:
    """rows [N, E_local, N * M, H] on the expert ranks -> [N, T, H] float64 at the sources."""
    n, t, k = slot_expert.shape
    el = rows.shape[1]
    m = rows.shape[2] // n
    out = np.zeros((n, t, rows.shape[-1]), np.float64)
    for s in range(n):
        for tt in range(t):
            for j in range(k):
                e = slot_expert[s, tt, j]
                if e < 0:
                    continue
                d, l = divmod(int(e), el)
                r = s * m + slot_pos[s, tt, j]
                w = 1.0 if row_weights is None else float(row_weights[d, l, r])
                out[s, tt] += w * rows[d, l, r].astype(np.float64)
    return out
