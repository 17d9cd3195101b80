"""Checks of the padded (low-latency) layout and fp8 dispatch against the numpy oracle, written
to run the same way in one process (tests/test_cuda_padded.py) and in N processes sharing one
GPU (tests/mp_worker.py --mode padded); tests/test_cuda_padded.py also runs them on the
reference backend on CPU, so a GPU failure points at the kernels. group_kwargs (EPGroup keywords:
hosts=, intra_host=) run them on the hierarchical backend (tests/test_hierarchical_padded.py on
CPU, tests/test_hierarchical_cuda.py and mp_worker.py --mode hierarchical_padded on GPUs).

As in tests/cuda_checks.py: every input is generated for all ranks from a seed in every process,
each process checks the ranks it holds, and no XLA collective is used besides the hierarchical
backend's own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import jax_ep
from tests import harness, oracle
from tests.cuda_checks import Case, local_parts, per_rank_program, routing_for, to_global

# max_tokens is the case's tokens + 3, so the padding past T is exercised too.
CASES = [
    Case("f32_random", 24, 4, 2, 64, "float32"),
    Case("bf16_random", 33, 8, 4, 128, "bfloat16"),
    Case("f16_random", 17, 2, 1, 32, "float16"),
    Case("bf16_wide_hidden", 16, 8, 8, 7168, "bfloat16"),
    Case("hot_expert", 20, 2, 2, 64, "bfloat16", routing="hot"),
    Case("all_unrouted", 9, 3, 2, 64, "float32", routing="unrouted"),
    Case("repeated_experts", 10, 4, 2, 64, "float32", routing="duplicates"),
    Case("invalid_ids", 12, 2, 2, 64, "float32", routing="invalid"),
    Case("top1_one_token", 1, 1, 1, 64, "float32"),
    Case("top16", 8, 16, 4, 64, "bfloat16"),
]


def max_tokens_of(case: Case) -> int:
    return case.tokens + 3


def make_group(mesh: Mesh, case: Case, backend: str = "cuda", group_kwargs: dict | None = None,
               **extra) -> jax_ep.EPGroup:
    n = mesh.shape["expert"]
    cfg = jax_ep.EPConfig(num_experts=case.experts_per_rank * n, top_k=case.top_k,
                          max_tokens=max_tokens_of(case), hidden_size=case.hidden,
                          dtype=case.dtype, padded_layout=True, num_sms=extra.pop("num_sms", 8),
                          timeout_s=extra.pop("timeout_s", 60.0), **extra)
    return jax_ep.EPGroup(mesh, "expert", cfg, backend=backend, **(group_kwargs or {}))


def check_case(mesh: Mesh, case: Case, seed: int = 0, backend: str = "cuda",
               group_kwargs: dict | None = None) -> int:
    """Runs `case` in the padded layout on `backend`; checks every rank this process holds
    against the oracle (dispatch bit for bit, combines and VJPs to float32 rounding, two runs
    byte-identical). Returns how many ranks it checked."""
    n = mesh.shape["expert"]
    m = max_tokens_of(case)
    el = case.experts_per_rank
    rng = np.random.default_rng(seed)
    idx, w = routing_for(case, n, rng)
    dtype = jnp.dtype(case.dtype)
    x = harness.random_tokens(rng, n, case.tokens, case.hidden, dtype)
    ct_rows = rng.normal(size=(n, el, n * m, case.hidden)).astype(dtype)
    ct_row_w = rng.normal(size=(n, el, n * m)).astype(np.float32)
    ct_out = rng.normal(size=(n, case.tokens, case.hidden)).astype(dtype)
    want = oracle.padded_dispatch(x, idx, w, el * n, m)
    group = make_group(mesh, case, backend=backend, group_kwargs=group_kwargs)
    try:
        program = per_rank_program(group, layout="padded")
        args = [to_global(a, mesh) for a in (x, idx, w, ct_rows, ct_row_w, ct_out)]
        parts = local_parts(program(*args))
        parts_again = local_parts(program(*args))
        group.check()
    finally:
        group.close()
    plain_want = oracle.padded_combine(want.rows, want.slot_expert, want.slot_pos)
    weighted_want = oracle.padded_combine(want.rows, want.slot_expert, want.slot_pos,
                                          want.row_weights)
    ct_x_want = oracle.padded_combine(ct_rows, want.slot_expert, want.slot_pos)
    for r, (d, plain, weighted, ct_x, ct_w, ct_comb_rows, ct_comb_w) in parts.items():
        np.testing.assert_array_equal(d.x.view(np.uint8), want.rows[r].view(np.uint8))
        np.testing.assert_array_equal(d.weights, want.row_weights[r])
        np.testing.assert_array_equal(d.recv_counts, want.recv_counts[r])
        np.testing.assert_array_equal(d.group_sizes, want.group_sizes[r])
        np.testing.assert_array_equal(d.num_dropped, want.num_dropped[r])
        np.testing.assert_array_equal(d.num_invalid, want.num_invalid[r])
        np.testing.assert_array_equal(d.handle.slot_expert, want.slot_expert[r])
        np.testing.assert_array_equal(d.handle.slot_pos, want.slot_pos[r])
        harness.assert_combine_close(plain, plain_want[r], case.dtype)
        harness.assert_combine_close(weighted, weighted_want[r], case.dtype)
        harness.assert_combine_close(ct_x, ct_x_want[r], case.dtype)
        np.testing.assert_array_equal(ct_w, _gather_row_values(ct_row_w, want, r))
        rows_ct_want, w_ct_want = _combine_vjp_oracle(want, ct_out, r)
        harness.assert_combine_close(ct_comb_rows, rows_ct_want, case.dtype)
        np.testing.assert_allclose(ct_comb_w, w_ct_want, rtol=2e-5, atol=2e-5 * max(
            1.0, np.abs(w_ct_want).max(initial=0)))
        harness.assert_same_bytes(parts[r], parts_again[r])
    return len(parts)


def _slots(want: oracle.OraclePadded, s: int):
    """(t, j, expert rank, local expert, padded row) of source s's delivered slots."""
    n, t, k = want.slot_expert.shape
    el = want.rows.shape[1]
    m = want.rows.shape[2] // n
    for tt in range(t):
        for j in range(k):
            e = int(want.slot_expert[s, tt, j])
            if e >= 0:
                yield tt, j, e // el, e % el, s * m + int(want.slot_pos[s, tt, j])


def _gather_row_values(row_values, want: oracle.OraclePadded, s: int) -> np.ndarray:
    out = np.zeros(want.slot_expert.shape[1:], np.float32)
    for tt, j, d, l, row in _slots(want, s):
        out[tt, j] = row_values[d, l, row]
    return out


def _combine_vjp_oracle(want: oracle.OraclePadded, ct_out, r: int):
    """Rank r's cotangents of weighted combine (float64): rows -> w[row] * ct_out[src token],
    weights -> <ct_out[src token], rows[row]>, zero at the padding."""
    n = want.slot_expert.shape[0]
    ct_rows = np.zeros(want.rows.shape[1:], np.float64)
    ct_w = np.zeros(want.rows.shape[1:3], np.float64)
    for s in range(n):
        for tt, _, d, l, row in _slots(want, s):
            if d != r:
                continue
            g = ct_out[s, tt].astype(np.float64)
            ct_rows[l, row] = want.row_weights[r, l, row] * g
            ct_w[l, row] = g @ want.rows[r, l, row].astype(np.float64)
    return ct_rows, ct_w


def check_fp8(mesh: Mesh, seed: int = 0, backend: str = "cuda",
              group_kwargs: dict | None = None) -> int:
    """fp8 dispatch in both layouts: rows byte for byte and scales equal to the oracle's."""
    n = mesh.shape["expert"]
    case = Case("fp8", 12, 4, 2, 256, "bfloat16")
    m = max_tokens_of(case)
    rng = np.random.default_rng(seed)
    idx, w = routing_for(case, n, rng)
    x = harness.random_tokens(rng, n, case.tokens, case.hidden, np.float32) * 4
    q, s = (np.asarray(a) for a in jax.jit(jax_ep.quantize_fp8)(x))
    group = make_group(mesh, case, backend=backend, group_kwargs=group_kwargs)
    try:
        outs = {}
        for layout in ("normal", "padded"):
            run = harness.per_rank(mesh, lambda a, b, c, sc, layout=layout: (
                lambda d: (d.x, d.scales, d.weights))(
                    jax_ep.dispatch(group, a, b, c, layout=layout, x_scales=sc)))
            outs[layout] = local_parts(run(*(to_global(a, mesh) for a in (q, idx, w, s))))
        group.check()
    finally:
        group.close()
    e = case.experts_per_rank * n
    capacity = n * case.tokens * case.top_k
    normal_rows = oracle.dispatch(q, idx, w, e, capacity)
    normal_scales = oracle.dispatch(s, idx, w, e, capacity).rows
    padded = oracle.padded_dispatch(q, idx, w, e, m, scales=s)
    for r in outs["normal"]:
        rows, scales, weights = outs["normal"][r]
        np.testing.assert_array_equal(rows.view(np.uint8), normal_rows.rows[r].view(np.uint8))
        np.testing.assert_array_equal(scales, normal_scales[r])
        np.testing.assert_array_equal(weights, normal_rows.row_weights[r])
        rows, scales, weights = outs["padded"][r]
        np.testing.assert_array_equal(rows.view(np.uint8), padded.rows[r].view(np.uint8))
        np.testing.assert_array_equal(scales, padded.scales[r])
        np.testing.assert_array_equal(weights, padded.row_weights[r])
    return len(outs["normal"])


def check_scan_rounds(mesh: Mesh, rounds: int = 20, seed: int = 1, backend: str = "cuda",
                      group_kwargs: dict | None = None) -> int:
    """lax.scan of `rounds` padded dispatch/combine rounds, a new routing each round: the
    double-buffered halves and device-side sequence numbers across calls in one program."""
    n = mesh.shape["expert"]
    case = Case("scan", 16, 4, 2, 64, "bfloat16")
    m = max_tokens_of(case)
    rng = np.random.default_rng(seed)
    routed = [routing_for(case, n, rng) for _ in range(rounds)]
    idx = np.stack([a for a, _ in routed], axis=1)  # [N, rounds, T, k]
    w = np.stack([b for _, b in routed], axis=1)
    x = harness.random_tokens(rng, n, case.tokens, case.hidden, jnp.bfloat16)
    group = make_group(mesh, case, backend=backend, group_kwargs=group_kwargs)

    def body(x0, idx_r, w_r):
        def step(carry, inputs):
            i, wt = inputs
            d = jax_ep.dispatch(group, x0, i, wt, layout="padded")
            y = jax_ep.combine(group, d.x, d.handle, weights=d.weights)
            return carry, (y, d.recv_counts)
        return jax.lax.scan(step, 0, (idx_r, w_r))[1]

    try:
        parts = local_parts(harness.per_rank(mesh, body)(*(to_global(a, mesh)
                                                           for a in (x, idx, w))))
        group.check()
    finally:
        group.close()
    for i in range(rounds):
        want = oracle.padded_dispatch(x, idx[:, i], w[:, i], case.experts_per_rank * n, m)
        y_want = oracle.padded_combine(want.rows, want.slot_expert, want.slot_pos,
                                       want.row_weights)
        for r, (y, counts) in parts.items():
            np.testing.assert_array_equal(counts[i], want.recv_counts[r])
            harness.assert_combine_close(y[i], y_want[r], "bfloat16")
    return len(parts)
