"""Checks of the cuda backend against the numpy oracle, written to run the same way in one
process (pytest, tests/test_cuda.py) and in N processes sharing one GPU (tests/mp_worker.py).

Every input is generated for all ranks from a seed in every process; each process checks the
ranks it holds. The flat cuda backend uses no XLA collective (only jax_ep's custom calls cross
devices) and cotangents are fed per rank with jax.vjp inside shard_map; the hierarchical
backend's checks (group_kwargs=dict(hosts=..., intra_host=...)) add its XLA collectives, which
across processes sharing one GPU need each process to be its own NCCL host
(local_world.launch(nccl_host_per_process=True)).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import jax_ep
from jax_ep.per_rank import local_parts, to_global
from tests import harness, oracle


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    top_k: int
    experts_per_rank: int
    hidden: int
    dtype: str
    routing: str = "random"  # random | hot | unrouted | duplicates | invalid
    capacity_factor: float | None = None


CASES = [
    Case("f32_random", 24, 4, 2, 64, "float32"),
    Case("bf16_random", 33, 8, 4, 128, "bfloat16"),
    Case("f16_random", 17, 2, 1, 32, "float16"),
    Case("bf16_wide_hidden", 16, 8, 8, 7168, "bfloat16"),
    Case("hot_expert_overflow", 20, 2, 2, 64, "bfloat16", routing="hot", capacity_factor=0.5),
    Case("all_unrouted", 9, 3, 2, 64, "float32", routing="unrouted"),
    Case("duplicate_experts", 10, 4, 2, 64, "float32", routing="duplicates"),
    Case("invalid_ids", 12, 2, 2, 64, "float32", routing="invalid"),
    Case("top1_one_token", 1, 1, 1, 64, "float32"),
    Case("top16", 8, 16, 4, 64, "bfloat16"),
]


def routing_for(case: Case, num_ranks: int, rng) -> tuple[np.ndarray, np.ndarray]:
    experts = case.experts_per_rank * num_ranks
    shape = (num_ranks, case.tokens, case.top_k)
    if case.routing == "unrouted":
        idx = np.full(shape, -1, np.int32)
    elif case.routing == "hot":
        idx = np.where(rng.random(shape) < 0.7, 0, rng.integers(0, experts, shape))
    elif case.routing == "duplicates":
        idx = np.repeat(rng.integers(0, experts, shape[:2] + (1,)), case.top_k, axis=2)
        idx[..., -1] = rng.integers(-1, experts, shape[:2])
    else:
        idx, _ = harness.random_routing(rng, num_ranks, case.tokens, case.top_k, experts,
                                        invalid=0.15 if case.routing == "invalid" else 0.0)
    return idx.astype(np.int32), rng.random(shape).astype(np.float32)


def make_group(mesh: Mesh, case: Case, backend: str = "cuda", group_kwargs: dict | None = None,
               **extra) -> jax_ep.EPGroup:
    n = mesh.shape["expert"]
    cfg = jax_ep.EPConfig(num_experts=case.experts_per_rank * n, top_k=case.top_k,
                          max_tokens=max(case.tokens, 1), hidden_size=case.hidden,
                          dtype=case.dtype, capacity_factor=case.capacity_factor,
                          num_sms=extra.pop("num_sms", 8), timeout_s=extra.pop("timeout_s", 60.0),
                          **extra)
    return jax_ep.EPGroup(mesh, "expert", cfg, backend=backend, **(group_kwargs or {}))


def per_rank_program(group: jax_ep.EPGroup, layout: str = "normal"):
    """dispatch in `layout`, both combines, and the VJPs of dispatch and weighted combine, per
    rank."""

    def body(x, idx, w, ct_rows, ct_row_w, ct_out):
        d = jax_ep.dispatch(group, x, idx, w, layout=layout)
        plain = jax_ep.combine(group, d.x, d.handle)
        weighted = jax_ep.combine(group, d.x, d.handle, weights=d.weights)
        _, vjp_dispatch = jax.vjp(lambda a, b: (lambda o: (o.x, o.weights))(
            jax_ep.dispatch(group, a, idx, b, layout=layout)), x, w)
        ct_x, ct_w = vjp_dispatch((ct_rows, ct_row_w))
        _, vjp_combine = jax.vjp(
            lambda rows, s: jax_ep.combine(group, rows, d.handle, weights=s), d.x, d.weights)
        ct_comb_rows, ct_comb_w = vjp_combine(ct_out)
        return d, plain, weighted, ct_x, ct_w, ct_comb_rows, ct_comb_w

    return harness.per_rank(group.mesh, body)


def inputs_for(case: Case, num_ranks: int, seed: int):
    rng = np.random.default_rng(seed)
    idx, w = routing_for(case, num_ranks, rng)
    dtype = jnp.dtype(case.dtype)
    x = harness.random_tokens(rng, num_ranks, case.tokens, case.hidden, dtype)
    cfg_capacity = jax_ep.EPConfig(num_experts=case.experts_per_rank * num_ranks,
                                   top_k=case.top_k,
                                   capacity_factor=case.capacity_factor).capacity_rows(
                                       num_ranks, case.tokens)
    ct_rows = rng.normal(size=(num_ranks, cfg_capacity, case.hidden)).astype(dtype)
    ct_row_w = rng.normal(size=(num_ranks, cfg_capacity)).astype(np.float32)
    ct_out = rng.normal(size=(num_ranks, case.tokens, case.hidden)).astype(dtype)
    return x, idx, w, ct_rows, ct_row_w, ct_out, cfg_capacity


def check_same_results(mesh: Mesh, case: Case, setups, seed: int) -> list:
    """Runs dispatch and both combines of `case` on each (backend, group_kwargs) of `setups`
    and checks the later ones against the first: dispatch byte for byte, combine to rounding
    (the summation order may differ). Returns the groups' repr, for the caller's checks."""
    x, idx, w, *_ = inputs_for(case, mesh.shape["expert"], seed=seed)
    results, names = [], []
    for backend, group_kwargs in setups:
        group = make_group(mesh, case, backend=backend, group_kwargs=group_kwargs)
        names.append(repr(group))
        results.append(harness.dispatch_combine_all(group, x, idx, w))
        group.close()
    (d, plain, weighted), rest = results[0], results[1:]
    for d_other, plain_other, weighted_other in rest:
        harness.assert_same_bytes(d, d_other)
        for a, b in ((plain, plain_other), (weighted, weighted_other)):
            harness.assert_combine_close(a, np.asarray(b, np.float64), case.dtype)
    return names


def check_case(mesh: Mesh, case: Case, seed: int = 0, backend: str = "cuda",
               group_kwargs: dict | None = None) -> int:
    """Runs `case` on `backend` (EPGroup keywords group_kwargs) and checks every rank this
    process holds against the oracle; returns how many ranks it checked."""
    n = mesh.shape["expert"]
    x, idx, w, ct_rows, ct_row_w, ct_out, capacity = inputs_for(case, n, seed)
    want = oracle.dispatch(x, idx, w, case.experts_per_rank * n, capacity)
    group = make_group(mesh, case, backend=backend, group_kwargs=group_kwargs)
    try:
        program = per_rank_program(group)
        args = [to_global(a, mesh) for a in (x, idx, w, ct_rows, ct_row_w, ct_out)]
        out = program(*args)
        again = program(*args)
        group.check()
        parts, parts_again = local_parts(out), local_parts(again)
    finally:
        group.close()
    plain_want = oracle.combine(want.rows, want.dest_rank, want.dest_row)
    weighted_want = oracle.combine(want.rows, want.dest_rank, want.dest_row, want.row_weights)
    # Dispatch's VJP is the unweighted combine of the cotangent rows and the gather of the
    # cotangent weights; combine's is w * (ct_out dispatched) and <ct_out dispatched, rows>.
    ct_x_want = oracle.combine(ct_rows, want.dest_rank, want.dest_row)
    for r, (d, plain, weighted, ct_x, ct_w, ct_comb_rows, ct_comb_w) in parts.items():
        sl = slice(r, r + 1)
        harness.assert_dispatch_matches(jax.tree.map(lambda a: a[None], d),
                                        oracle.ranks(want, sl))
        harness.assert_combine_close(plain, plain_want[r], case.dtype)
        harness.assert_combine_close(weighted, weighted_want[r], case.dtype)
        harness.assert_combine_close(ct_x, ct_x_want[r], case.dtype)
        ct_w_want = np.zeros_like(w[r])
        src_of = want.row_src
        for d_rank in range(n):
            for row in range(capacity):
                s_id = src_of[d_rank, row]
                if s_id >= 0 and s_id // (case.tokens * case.top_k) == r:
                    f = s_id % (case.tokens * case.top_k)
                    ct_w_want.reshape(-1)[f] = ct_row_w[d_rank, row]
        np.testing.assert_array_equal(ct_w, ct_w_want)
        rows_ct_want, w_ct_want = _combine_vjp_oracle(want, ct_out, r, case)
        harness.assert_combine_close(ct_comb_rows, rows_ct_want, case.dtype)
        np.testing.assert_allclose(ct_comb_w, w_ct_want, rtol=2e-5, atol=2e-5 * max(
            1.0, np.abs(w_ct_want).max(initial=0)))
        # Bitwise determinism: the same inputs give the same bytes.
        harness.assert_same_bytes(parts[r], parts_again[r])
    return len(parts)


def _combine_vjp_oracle(want: oracle.OracleDispatch, ct_out, r: int, case: Case):
    """Rank r's cotangents of weighted combine: rows -> w[row] * ct_out[src], weights ->
    <ct_out[src], rows[row]> (float64)."""
    slots = case.tokens * case.top_k
    capacity = want.rows.shape[1]
    ct_rows = np.zeros((capacity, case.hidden))
    ct_w = np.zeros(capacity)
    for row in range(capacity):
        s_id = want.row_src[r, row]
        if s_id < 0:
            continue
        src, t = s_id // slots, (s_id % slots) // case.top_k
        g = ct_out[src, t].astype(np.float64)
        ct_rows[row] = want.row_weights[r, row] * g
        ct_w[row] = g @ want.rows[r, row].astype(np.float64)
    return ct_rows, ct_w


def check_scan_rounds(mesh: Mesh, rounds: int = 20, seed: int = 1, backend: str = "cuda",
                      group_kwargs: dict | None = None) -> int:
    """lax.scan of `rounds` dispatch/combine rounds, a new routing each round: sequence numbers
    and buffer reuse across calls inside one jitted loop."""
    n = mesh.shape["expert"]
    case = Case("scan", 16, 4, 2, 64, "bfloat16")
    rng = np.random.default_rng(seed)
    routed = [routing_for(case, n, rng) for _ in range(rounds)]
    idx = np.stack([a for a, _ in routed], axis=1)  # [N, rounds, T, k]
    w = np.stack([b for _, b in routed], axis=1)
    x = harness.random_tokens(rng, n, case.tokens, case.hidden, jnp.bfloat16)
    group = make_group(mesh, case, backend=backend, group_kwargs=group_kwargs)

    def body(x0, idx_r, w_r):
        def step(carry, inputs):
            i, wt = inputs
            d = jax_ep.dispatch(group, x0, i, wt)
            y = jax_ep.combine(group, d.x, d.handle, weights=d.weights)
            return carry, (y, d.group_sizes)
        return jax.lax.scan(step, 0, (idx_r, w_r))[1]

    try:
        out = harness.per_rank(mesh, body)(*(to_global(a, mesh) for a in (x, idx, w)))
        group.check()
        parts = local_parts(out)
    finally:
        group.close()
    capacity = n * case.tokens * case.top_k
    for i in range(rounds):
        want = oracle.dispatch(x, idx[:, i], w[:, i], case.experts_per_rank * n, capacity)
        y_want = oracle.combine(want.rows, want.dest_rank, want.dest_row, want.row_weights)
        for r, (y, gs) in parts.items():
            np.testing.assert_array_equal(gs[i], want.group_sizes[r])
            harness.assert_combine_close(y[i], y_want[r], "bfloat16")
    return len(parts)


def check_2d_mesh(mesh: Mesh, backend: str = "cuda", group_kwargs: dict | None = None,
                  seed: int = 3) -> int:
    """EP over 'expert' of a ('data', 'expert') mesh: one EP group per data slice, each equal to
    the oracle run on that slice alone (dispatch bit for bit, weighted combine to rounding).
    Returns how many ranks this process checked."""
    data, n = mesh.shape["data"], mesh.shape["expert"]
    case = Case("mesh2d", 12, 4, 2, 64, "bfloat16")
    e = case.experts_per_rank * n
    rng = np.random.default_rng(seed)
    idx, w = routing_for(case, data * n, rng)  # rank r = (r // n, r % n), data-major
    x = harness.random_tokens(rng, data * n, case.tokens, case.hidden, jnp.bfloat16)
    group = make_group(mesh, case, backend=backend, group_kwargs=group_kwargs)
    try:
        run = harness.per_rank(mesh, lambda a, i, b: (lambda d: (d, jax_ep.combine(
            group, d.x, d.handle, weights=d.weights)))(jax_ep.dispatch(group, a, i, b)))
        parts = local_parts(run(*(to_global(a, mesh) for a in (x, idx, w))))
        group.check()
    finally:
        group.close()
    capacity = n * case.tokens * case.top_k
    for r, (d, y) in parts.items():
        sl = slice(r - r % n, r - r % n + n)  # r's data slice
        want = oracle.dispatch(x[sl], idx[sl], w[sl], e, capacity)
        harness.assert_dispatch_matches(jax.tree.map(lambda a: a[None], d),
                                        oracle.ranks(want, slice(r % n, r % n + 1)))
        y_want = oracle.combine(want.rows, want.dest_rank, want.dest_row, want.row_weights)
        harness.assert_combine_close(y, y_want[r % n], case.dtype)
    return len(parts)
