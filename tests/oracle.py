"""An independent numpy oracle of DESIGN.md's contract, written from the text, not the code:
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


def ranks(want: OracleDispatch, sl: slice) -> OracleDispatch:
    """The oracle's results for ranks `sl` only."""
    return OracleDispatch(**{f.name: getattr(want, f.name)[sl]
                             for f in dataclasses.fields(OracleDispatch)})


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
