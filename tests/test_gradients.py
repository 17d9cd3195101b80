"""Gradients: dispatch and combine are each other's adjoint (numerically checked to second
order), and their VJPs equal the dense formulas computed without the library."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_ep
from tests import harness

N, T, K, E, H = 4, 3, 2, 8, 4


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(21)
    idx, w = harness.random_routing(rng, N, T, K, E, unrouted=0.2)
    x = harness.random_tokens(rng, N, T, H, np.float64).astype(np.float32)
    mesh = harness.make_mesh(N)
    group = jax_ep.EPGroup(mesh, "expert", jax_ep.EPConfig(num_experts=E, top_k=K, max_tokens=T,
                                                           hidden_size=H, dtype="float32"),
                           backend="reference")
    return group, x, idx, w, rng


def _dispatch_fn(group, idx):
    run = harness.per_rank(group.mesh, lambda a, i, b: (
        lambda d: (d.x, d.weights))(jax_ep.dispatch(group, a, i, b)))
    return lambda x, w: run(x, idx, w)


def test_dispatch_grads_second_order(setup):
    group, x, idx, w, _ = setup
    check_grads(_dispatch_fn(group, idx), (x, w), order=2, modes=["rev"], atol=1e-2, rtol=1e-2)


def _combine_fn(group, idx, w, weighted):
    def per(xr, ir, wr, rows, scale):
        d = jax_ep.dispatch(group, xr, ir, wr)
        return jax_ep.combine(group, rows, d.handle, weights=scale if weighted else None)
    run = harness.per_rank(group.mesh, per)
    return lambda x, rows, scale: run(x, idx, w, rows, scale)


@pytest.mark.parametrize("weighted", [False, True])
def test_combine_grads_second_order(setup, weighted):
    group, x, idx, w, rng = setup
    c = N * T * K
    rows = rng.normal(size=(N, c, H)).astype(np.float32)
    scale = rng.random((N, c)).astype(np.float32)
    f = _combine_fn(group, idx, w, weighted)
    check_grads(lambda r, s: f(x, r, s), (rows, scale), order=2, modes=["rev"], atol=1e-2,
                rtol=1e-2)


def test_adjoint_identity(setup):
    """<dispatch(x), r> == <x, combine(r)> and <S(w), v> == <w, G(v)> for random x, r, w, v."""
    group, x, idx, w, rng = setup
    c = N * T * K
    rows = rng.normal(size=(N, c, H)).astype(np.float32)
    v = rng.normal(size=(N, c)).astype(np.float32)
    d = harness.dispatch_all(group, x, idx, w)
    # The VJP of dispatch w.r.t. (x, w) applied to (rows, v) is the adjoint map.
    _, vjp = jax.vjp(_dispatch_fn(group, idx), jnp.asarray(x), jnp.asarray(w))
    ct_x, ct_w = vjp((jnp.asarray(rows), jnp.asarray(v)))
    lhs = np.vdot(d.x.astype(np.float64), rows) + np.vdot(d.weights.astype(np.float64), v)
    rhs = np.vdot(x.astype(np.float64), np.asarray(ct_x)) + np.vdot(
        w.astype(np.float64), np.asarray(ct_w))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def test_end_to_end_grad_equals_dense(setup):
    """loss = sum(combine(dispatch(x) * 2, weights)^2): grads w.r.t. x and topk_weights equal
    those of the dense formula out[t] = sum_j w[t, j] * 2 * x[t] (dropless)."""
    group, x, idx, w, _ = setup
    routed = jnp.asarray(idx >= 0)

    def ep_loss(x, w):
        def per(xr, ir, wr):
            d = jax_ep.dispatch(group, xr, ir, wr)
            return jax_ep.combine(group, d.x * 2, d.handle, weights=d.weights)
        return jnp.sum(harness.per_rank(group.mesh, per)(x, idx, w) ** 2)

    def dense_loss(x, w):
        out = (jnp.where(routed, w, 0)[..., None] * 2 * x[..., None, :]).sum(-2)
        return jnp.sum(out ** 2)

    got = jax.grad(ep_loss, argnums=(0, 1))(x, w)
    want = jax.grad(dense_loss, argnums=(0, 1))(x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
