"""EPConfig(debug=True): ids outside [-1, E) raise one error naming the id, its token,
slot and rank, under jit, grad, jax.checkpoint (remat) and scan, on every rank together (no
rank is left in a collective), with one logged traceback per process."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from tests import harness

N, T, K, E, H = 4, 3, 2, 8, 16
BAD = r"outside \[-1, 8\): 2 in all, on ranks \[2, 3\] of axis 'expert'; the first: " \
      r"topk_idx\[1, 1\] = 42 on rank 2 \(token 1, slot 1\)"


@pytest.fixture(autouse=True)
def _forget_provoked_failures():
    """JAX keeps the outcome of the last run with host callbacks on each device and raises it
    again at every later effects barrier (and at exit); the failures provoked here on purpose
    must not reach later tests."""
    yield
    from jax._src import dispatch

    dispatch.runtime_tokens.clear()


def make_group(backend="reference", debug=True, **extra):
    cfg = jax_ep.EPConfig(num_experts=E, top_k=K, max_tokens=T, hidden_size=H, dtype="float32",
                          debug=debug, **extra)
    kwargs = dict(hosts=[0, 0, 1, 1]) if backend == "hierarchical" else {}
    return jax_ep.EPGroup(harness.make_mesh(N), "expert", cfg, backend=backend, **kwargs)


def inputs(bad: bool):
    rng = np.random.default_rng(0)
    idx = rng.integers(-1, E, size=(N, T, K)).astype(np.int32)
    if bad:
        idx[2, 1, 1] = 42
        idx[3, 0, 0] = -5
    return (rng.normal(size=(N, T, H)).astype(np.float32), idx,
            rng.random((N, T, K)).astype(np.float32))


def moe_loss(group, layout="normal", remat=False):
    """(x, w, idx) -> sum of squares of the weighted combine of dispatch(x) * 2."""
    def per(a, b, c):
        d = jax_ep.dispatch(group, a, b, c, layout=layout)
        return jax_ep.combine(group, d.x * 2, d.handle, weights=d.weights)

    run = harness.per_rank(group.mesh, jax.checkpoint(per) if remat else per)
    return lambda x, w, idx: jnp.sum(run(x, idx, w) ** 2)


def expect_error(fn, bad_args, good_args):
    """fn raises on bad_args, then runs on good_args: the group keeps working, and the last
    run's host-callback status (which JAX checks again at exit) is a success."""
    with pytest.raises(jax.errors.JaxRuntimeError, match=BAD):
        jax.block_until_ready(fn(*bad_args))
    jax.block_until_ready(fn(*good_args))


@pytest.mark.parametrize("backend", ["reference", "hierarchical"])
def test_jit_names_the_bad_id_token_and_rank(backend):
    group = make_group(backend)
    fn = harness.per_rank(group.mesh, lambda a, b, c: jax_ep.dispatch(group, a, b, c).x)
    expect_error(fn, inputs(bad=True), inputs(bad=False))


def test_under_remat_and_grad():
    """jax.checkpoint refused debug mode before (IOEffect in partial eval)."""
    group = make_group()
    grad = jax.jit(jax.grad(moe_loss(group, remat=True), argnums=(0, 1)))
    x, idx, w = inputs(bad=False)
    got = grad(x, w, idx)
    want = jax.grad(moe_loss(make_group(debug=False)), argnums=(0, 1))(x, w, idx)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    x_bad, idx_bad, w_bad = inputs(bad=True)
    expect_error(grad, (x_bad, w_bad, idx_bad), (x, w, idx))


def test_under_scan_over_layers():
    """Each layer of a scan dispatches; the bad ids are in the second layer only."""
    group = make_group()
    x, idx, w = inputs(bad=False)
    _, bad_idx, _ = inputs(bad=True)
    layers_idx = np.stack([idx, bad_idx, idx], axis=1)  # [N, layers, T, k] per rank

    def per(a, layer_ids, c):
        def layer(h, ids):
            d = jax_ep.dispatch(group, h, ids, c)
            return jax_ep.combine(group, d.x, d.handle, weights=d.weights), None
        return jax.lax.scan(jax.checkpoint(layer), a, layer_ids)[0]

    fn = harness.per_rank(group.mesh, per)
    grad = jax.jit(jax.grad(lambda a, ids: jnp.sum(fn(a, ids, w))))
    expect_error(grad, (x, layers_idx), (x, layers_idx[:, [0, 0, 2]]))


def test_padded_layout():
    group = make_group(padded_layout=True)
    (x, idx, w), (_, bad_idx, _) = inputs(bad=False), inputs(bad=True)
    expect_error(jax.jit(moe_loss(group, layout="padded", remat=True)), (x, w, bad_idx),
                 (x, w, idx))


def test_one_traceback_per_process(caplog):
    """JAX logs each failing callback's traceback: only one rank of this process's four."""
    group = make_group()
    fn = harness.per_rank(group.mesh, lambda a, b, c: jax_ep.dispatch(group, a, b, c).x)
    with caplog.at_level(logging.ERROR):
        expect_error(fn, inputs(bad=True), inputs(bad=False))
    failed = [r for r in caplog.records if "callback failed" in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in caplog.records]
    assert "topk_idx[1, 1] = 42 on rank 2" in str(failed[0].exc_info[1])
