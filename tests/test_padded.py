"""The padded (low-latency) layout on the reference backend, against the numpy oracle
(tests/oracle.py: padded_dispatch / padded_combine), its layout math, gradients and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_ep
from jax_ep import routing
from jax_ep.config import shape_for
from tests import harness, oracle


def make_group(num_ranks, num_experts, top_k, max_tokens, data=1, hidden=8, dtype="float32",
               **extra):
    cfg = jax_ep.EPConfig(num_experts=num_experts, top_k=top_k, max_tokens=max_tokens,
                          hidden_size=hidden, dtype=dtype, padded_layout=True, **extra)
    return jax_ep.EPGroup(harness.make_mesh(num_ranks, data), "expert", cfg, backend="reference")


def run_padded(group, x, idx, w):
    def fn(a, b, c):
        d = jax_ep.dispatch(group, a, b, c, layout="padded")
        return (d, jax_ep.combine(group, d.x, d.handle),
                jax_ep.combine(group, d.x, d.handle, weights=d.weights))

    return jax.tree.map(np.asarray, harness.per_rank(group.mesh, fn)(x, idx, w))


def check_against_oracle(num_ranks, tokens, top_k, num_experts, max_tokens, dtype=np.float32,
                         hidden=8, idx=None, weights=None, data=1, seed=0):
    rng = np.random.default_rng(seed)
    r = num_ranks * data
    if idx is None:
        idx, weights = harness.random_routing(rng, r, tokens, top_k, num_experts, invalid=0.1)
    elif weights is None:
        weights = rng.random(idx.shape).astype(np.float32)
    x = harness.random_tokens(rng, r, tokens, hidden, dtype)
    group = make_group(num_ranks, num_experts, top_k, max_tokens, data, hidden, dtype)
    d, plain, weighted = run_padded(group, x, idx, weights)
    for s in range(data):
        sl = slice(s * num_ranks, (s + 1) * num_ranks)
        want = oracle.padded_dispatch(x[sl], idx[sl], weights[sl], num_experts, max_tokens)
        harness.assert_padded_matches(jax.tree.map(lambda a: a[sl], d), want)
        harness.assert_combine_close(
            plain[sl], oracle.padded_combine(want.rows, want.slot_expert, want.slot_pos), dtype)
        harness.assert_combine_close(
            weighted[sl], oracle.padded_combine(want.rows, want.slot_expert, want.slot_pos,
                                                want.row_weights), dtype)
    return d, weighted, x, idx, weights


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("num_ranks,num_experts,top_k,tokens,max_tokens",
                         [(4, 8, 2, 5, 7), (8, 16, 4, 6, 6), (2, 6, 3, 4, 9)])
def test_random_routing_matches_oracle(dtype, num_ranks, num_experts, top_k, tokens,
                                       max_tokens):
    d, *_ = check_against_oracle(num_ranks, tokens, top_k, num_experts, max_tokens, dtype=dtype,
                                 seed=num_ranks + top_k)
    el = num_experts // num_ranks
    assert d.x.shape == (num_ranks, el, num_ranks * max_tokens, 8)
    assert d.weights.shape == (num_ranks, el, num_ranks * max_tokens)


def test_layout_math_matches_oracle_per_rank():
    """layout.padded_slots on one rank against the oracle's walk, repeats and invalid ids
    included."""
    rng = np.random.default_rng(3)
    n, t, k, e, m = 4, 9, 4, 8, 9
    idx, w = harness.random_routing(rng, n, t, k, e, invalid=0.15)
    idx[:, ::3, 1] = idx[:, ::3, 0]  # repeats
    want = oracle.padded_dispatch(np.zeros((n, t, 1), np.float32), idx, w, e, m)
    sizes = shape_for(jax_ep.EPConfig(num_experts=e, top_k=k, max_tokens=m), n, t, 1)
    for s in range(n):
        slot_expert, slot_pos, counts, repeats = jax.jit(
            lambda i: routing.padded_slots(i, sizes))(idx[s])
        np.testing.assert_array_equal(slot_expert, want.slot_expert[s])
        np.testing.assert_array_equal(slot_pos, want.slot_pos[s])
        np.testing.assert_array_equal(counts.reshape(n, e // n), want.recv_counts[:, :, s])
    total_repeats = sum(int(np.asarray(jax.jit(lambda i: routing.padded_slots(i, sizes))(
        idx[s])[3]).sum()) for s in range(n))
    assert total_repeats == want.num_dropped.sum() > 0


def test_repeated_expert_in_one_token_is_dropped_and_counted():
    # Token 0 of every rank routes to expert 3 three times, token 1 to expert 0 twice.
    idx = np.tile(np.array([[3, 3, 3], [0, 3, 0]], np.int32), (4, 1, 1))
    d, weighted, x, _, w = check_against_oracle(4, 2, 3, 8, 2, idx=idx)
    assert d.group_sizes[1, 1] == 4 * 2  # one row per token per source for expert 3
    assert d.group_sizes[0, 0] == 4 * 1
    assert d.num_dropped[1] == 4 * 2 and d.num_dropped[0] == 4 * 1
    # The first slot of each (token, expert) keeps its own weight.
    np.testing.assert_array_equal(d.weights[1, 1, :2], [w[0, 0, 0], w[0, 1, 1]])


def test_rows_past_counts_are_zero():
    d, *_ = check_against_oracle(4, 6, 2, 8, 8, dtype=jnp.bfloat16, seed=4)
    n, m = 4, 8
    for r in range(n):
        for l in range(2):
            for s in range(n):
                c = d.recv_counts[r, l, s]
                assert not np.any(d.x[r, l, s * m + c:(s + 1) * m].astype(np.float32))
                assert not np.any(d.weights[r, l, s * m + c:(s + 1) * m])


def test_dropless_without_repeats_is_the_weighted_sum_identity():
    rng = np.random.default_rng(8)
    n, t, k, e = 4, 7, 3, 16
    idx = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
                    for _ in range(n)]).astype(np.int32)
    d, weighted, x, idx, w = check_against_oracle(n, t, k, e, t, idx=idx)
    assert d.num_dropped.sum() == 0
    harness.assert_combine_close(weighted, oracle.dense_moe_identity(x, idx, w, e), np.float32)


def test_all_unrouted_and_one_token():
    d, weighted, *_ = check_against_oracle(4, 3, 2, 8, 4, idx=np.full((4, 3, 2), -1, np.int32))
    assert d.group_sizes.sum() == 0 and not np.any(d.x) and not np.any(weighted)
    check_against_oracle(4, 1, 2, 8, 1, seed=2)


def test_padded_over_one_axis_of_a_2d_mesh():
    check_against_oracle(4, 5, 2, 8, 5, data=2, seed=7)


def test_combine_ignores_rows_past_the_counts():
    """Expert outputs at the padding (e.g. a bias) must not reach the tokens."""
    rng = np.random.default_rng(5)
    n, t, k, e, m = 4, 5, 2, 8, 6
    idx, w = harness.random_routing(rng, n, t, k, e)
    x = harness.random_tokens(rng, n, t, 8, np.float32)
    group = make_group(n, e, k, m)

    def fn(a, b, c):
        d = jax_ep.dispatch(group, a, b, c, layout="padded")
        return jax_ep.combine(group, d.x + 1.0, d.handle, weights=d.weights)

    got = np.asarray(harness.per_rank(group.mesh, fn)(x, idx, w))
    want = oracle.padded_dispatch(x, idx, w, e, m)
    harness.assert_combine_close(
        got, oracle.padded_combine(want.rows + 1.0, want.slot_expert, want.slot_pos,
                                   want.row_weights), np.float32)


# --- gradients ---------------------------------------------------------------------------------

N, T, K, E, H, M = 4, 3, 2, 8, 4, 4


@pytest.fixture(scope="module")
def grad_setup():
    x, idx, w, rng = harness.padded_grad_inputs(N, T, K, E, H)
    return make_group(N, E, K, M, hidden=H), x, idx, w, rng


def test_dispatch_grads_second_order(grad_setup):
    group, x, idx, w, _ = grad_setup
    run = harness.per_rank(group.mesh, lambda a, i, b: (lambda d: (d.x, d.weights))(
        jax_ep.dispatch(group, a, i, b, layout="padded")))
    check_grads(lambda a, b: run(a, idx, b), (x, w), order=2, modes=["rev"], atol=1e-2,
                rtol=1e-2)


@pytest.mark.parametrize("weighted", [False, True])
def test_combine_grads_second_order(grad_setup, weighted):
    group, x, idx, w, rng = grad_setup
    rows = rng.normal(size=(N, E // N, N * M, H)).astype(np.float32)
    scale = rng.random((N, E // N, N * M)).astype(np.float32)

    def per(xr, ir, wr, r, s):
        d = jax_ep.dispatch(group, xr, ir, wr, layout="padded")
        return jax_ep.combine(group, r, d.handle, weights=s if weighted else None)

    run = harness.per_rank(group.mesh, per)
    check_grads(lambda r, s: run(x, idx, w, r, s), (rows, scale), order=2, modes=["rev"],
                atol=1e-2, rtol=1e-2)


def test_end_to_end_grad_equals_dense(grad_setup):
    group, x, idx, w, _ = grad_setup
    want = oracle.padded_dispatch(x, idx, w, E, M)
    delivered = jnp.asarray(want.slot_expert >= 0)

    def ep_loss(x, w):
        def per(xr, ir, wr):
            d = jax_ep.dispatch(group, xr, ir, wr, layout="padded")
            return jax_ep.combine(group, d.x * 2, d.handle, weights=d.weights)
        return jnp.sum(harness.per_rank(group.mesh, per)(x, idx, w) ** 2)

    def dense_loss(x, w):
        return jnp.sum((jnp.where(delivered, w, 0)[..., None] * 2 * x[..., None, :]).sum(-2) ** 2)

    got = jax.grad(ep_loss, argnums=(0, 1))(x, w)
    wanted = jax.grad(dense_loss, argnums=(0, 1))(x, w)
    for a, b in zip(got, wanted):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


# --- errors ------------------------------------------------------------------------------------


def _dispatch(group, layout_name, t=T, h=H):
    x, idx, w = (jnp.zeros((N, t, h)), jnp.zeros((N, t, K), jnp.int32), jnp.zeros((N, t, K)))
    return harness.per_rank(group.mesh, lambda a, b, c: jax_ep.dispatch(
        group, a, b, c, layout=layout_name).x)(x, idx, w)


def test_padded_needs_padded_layout_config():
    group = jax_ep.EPGroup(harness.make_mesh(N), "expert",
                           jax_ep.EPConfig(num_experts=E, top_k=K, max_tokens=M, hidden_size=H,
                                           dtype="float32"),
                           backend="reference")
    with pytest.raises(ValueError, match="padded_layout=True"):
        _dispatch(group, "padded")
    with pytest.raises(ValueError, match="layout must be one of"):
        _dispatch(group, "ragged")
    with pytest.raises(ValueError, match="needs max_tokens"):
        jax_ep.EPConfig(num_experts=E, top_k=K, padded_layout=True)


def test_padded_too_many_tokens(grad_setup):
    with pytest.raises(ValueError, match="exceeds EPConfig.max_tokens"):
        _dispatch(grad_setup[0], "padded", t=M + 1)


def test_padded_combine_bad_shapes(grad_setup):
    group, x, idx, w, _ = grad_setup

    def run(rows_shape, weights_shape=None):
        def per(xr, ir, wr):
            d = jax_ep.dispatch(group, xr, ir, wr, layout="padded")
            wts = None if weights_shape is None else jnp.zeros(weights_shape)
            return jax_ep.combine(group, jnp.zeros(rows_shape), d.handle, weights=wts)
        return harness.per_rank(group.mesh, per)(x, idx, w)

    with pytest.raises(ValueError, match=r"\[E_local, N \* M, H\]"):
        run((N * T * K, H))
    with pytest.raises(ValueError, match="weights must be float32"):
        run((E // N, N * M, H), (N * M,))
