"""The hierarchical backend on one process (8 CPU devices split into emulated hosts by an
explicit `hosts=`): dispatch equals the numpy oracle bit for bit, combine matches it (and the
reference backend) to float32 rounding, and gradients are right to second order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_ep
from jax_ep import topology
from tests import harness, oracle

HOSTS = {
    "2x4": [0, 0, 0, 0, 1, 1, 1, 1],
    "4x2": [0, 0, 1, 1, 2, 2, 3, 3],
    "interleaved": ["a", "b", "a", "b", "a", "b", "a", "b"],
    "8x1": list(range(8)),
    "1x8": [0] * 8,
}


def _group(hosts, n=8, data=1, **cfg):
    config = jax_ep.EPConfig(num_experts=cfg.pop("num_experts", 16), top_k=cfg.pop("top_k", 3),
                             **cfg)
    return jax_ep.EPGroup(harness.make_mesh(n, data), "expert", config, backend="hierarchical",
                          hosts=hosts)


@pytest.mark.parametrize("hosts", list(HOSTS))
@pytest.mark.parametrize("dtype,capacity", [("float32", None), ("bfloat16", 9)])
def test_matches_oracle(hosts, dtype, capacity):
    n, t, k, e, h = 8, 5, 3, 16, 8
    rng = np.random.default_rng(len(hosts) + (capacity or 0))
    idx, w = harness.random_routing(rng, n, t, k, e, unrouted=0.15, invalid=0.05)
    x = harness.random_tokens(rng, n, t, h, jnp.dtype(dtype))
    group = _group(HOSTS[hosts], capacity=capacity, max_tokens=t, hidden_size=h, dtype=dtype)
    assert group.backend_name == "hierarchical"
    d, y, yw = harness.dispatch_combine_all(group, x, idx, w)
    want = oracle.dispatch(x, idx, w, e, group.config.capacity_rows(n, t))
    harness.assert_dispatch_matches(d, want)
    harness.assert_combine_close(y, oracle.combine(want.rows, want.dest_rank, want.dest_row),
                                 dtype)
    harness.assert_combine_close(
        yw, oracle.combine(want.rows, want.dest_rank, want.dest_row, want.row_weights), dtype)
    # The same numbers as the flat reference backend, up to float32 summation order.
    ref = jax_ep.EPGroup(group.mesh, "expert", group.config, backend="reference")
    _, y_ref, yw_ref = harness.dispatch_combine_all(ref, x, idx, w)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == "float32" else dict(rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(y.astype(np.float32), y_ref.astype(np.float32), **tol)
    np.testing.assert_allclose(yw.astype(np.float32), yw_ref.astype(np.float32), **tol)


def test_ep_axis_of_2d_mesh():
    """EP over 'expert' of ('data', 'expert'): one hierarchical group per data slice."""
    n, data, t, k, e, h = 4, 2, 4, 2, 8, 8
    rng = np.random.default_rng(3)
    idx, w = harness.random_routing(rng, n * data, t, k, e)
    x = harness.random_tokens(rng, n * data, t, h, np.float32)
    group = _group([0, 0, 1, 1], n=n, data=data, num_experts=e, top_k=k, max_tokens=t,
                   hidden_size=h, dtype="float32")
    d, _, yw = harness.dispatch_combine_all(group, x, idx, w)
    for s in range(data):
        sl = slice(s * n, (s + 1) * n)
        want = oracle.dispatch(x[sl], idx[sl], w[sl], e, n * t * k)
        harness.assert_dispatch_matches(jax.tree.map(lambda a: a[sl], d), want)
        harness.assert_combine_close(yw[sl], oracle.dense_moe_identity(x[sl], idx[sl], w[sl], e),
                                     np.float32)


N, T, K, E, H = 4, 3, 2, 8, 4


@pytest.fixture(scope="module")
def grad_setup():
    rng = np.random.default_rng(21)
    idx, w = harness.random_routing(rng, N, T, K, E, unrouted=0.2)
    x = harness.random_tokens(rng, N, T, H, np.float64).astype(np.float32)
    groups = {b: jax_ep.EPGroup(harness.make_mesh(N), "expert",
                                jax_ep.EPConfig(num_experts=E, top_k=K, max_tokens=T,
                                                hidden_size=H, dtype="float32"), backend=b,
                                hosts=[0, 0, 1, 1])
              for b in ("hierarchical", "reference")}
    return groups, x, idx, w, rng


def _moe_fn(group, idx):
    """(x, w, rows, scale) -> (dispatched rows, row weights, weighted combine of rows*scale)."""
    def per(xr, ir, wr, rows, scale):
        d = jax_ep.dispatch(group, xr, ir, wr)
        return d.x, d.weights, jax_ep.combine(group, rows * d.weights[:, None], d.handle,
                                              weights=scale)
    run = harness.per_rank(group.mesh, per)
    return lambda x, w, rows, scale: run(x, idx, w, rows, scale)


def test_grads_second_order(grad_setup):
    groups, x, idx, w, rng = grad_setup
    c = N * T * K
    rows = rng.normal(size=(N, c, H)).astype(np.float32)
    scale = rng.random((N, c)).astype(np.float32)
    check_grads(_moe_fn(groups["hierarchical"], idx), (x, w, rows, scale), order=2,
                modes=["rev"], atol=1e-2, rtol=1e-2)


def test_vjp_equals_reference(grad_setup):
    groups, x, idx, w, rng = grad_setup
    c = N * T * K
    args = (x, w, rng.normal(size=(N, c, H)).astype(np.float32),
            rng.random((N, c)).astype(np.float32))
    cts = (rng.normal(size=(N, c, H)).astype(np.float32),
           rng.normal(size=(N, c)).astype(np.float32),
           rng.normal(size=(N, T, H)).astype(np.float32))
    got, want = ([np.asarray(g) for g in jax.vjp(_moe_fn(groups[b], idx), *args)[1](cts)]
                 for b in ("hierarchical", "reference"))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_backend_selection_and_errors():
    mesh = harness.make_mesh(8)
    cfg = jax_ep.EPConfig(num_experts=16, top_k=2, max_tokens=8, hidden_size=64)
    assert jax_ep.EPGroup(mesh, "expert", cfg, hosts=HOSTS["2x4"]).backend_name == "hierarchical"
    assert jax_ep.EPGroup(mesh, "expert", cfg, hosts=HOSTS["1x8"]).backend_name == "reference"
    assert jax_ep.EPGroup(mesh, "expert", cfg).topology.num_hosts == 1
    with pytest.raises(ValueError, match="host of each of the 8 ranks"):
        jax_ep.EPGroup(mesh, "expert", cfg, hosts=[0, 1])
    with pytest.raises(ValueError, match="same number of EP ranks on every host"):
        jax_ep.EPGroup(mesh, "expert", cfg, backend="hierarchical", hosts=[0, 0, 0, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="spans 2 hosts; use backend='hierarchical'"):
        jax_ep.EPGroup(mesh, "expert", cfg, backend="cuda", hosts=HOSTS["2x4"])
    group = jax_ep.EPGroup(mesh, "expert", cfg, hosts=HOSTS["2x4"])
    assert group.intra_host == "xla"  # CPU devices: the pure-JAX intra-host leg
    with pytest.raises(ValueError, match="intra_host must be one of"):
        jax_ep.EPGroup(mesh, "expert", cfg, hosts=HOSTS["2x4"], intra_host="nvlink")
    with pytest.raises(ValueError, match="intra_host='cuda' needs a mesh of GPU devices"):
        jax_ep.EPGroup(mesh, "expert", cfg, hosts=HOSTS["2x4"], intra_host="cuda")


def test_topology_groups():
    topo = topology.from_labels(["x", "y", "x", "y"], 4)
    assert topo.host_of == (0, 1, 0, 1) and topo.local_of == (0, 0, 1, 1)
    assert topo.intra_groups() == [[0, 2], [1, 3]]
    assert topo.inter_groups() == [[0, 1], [2, 3]]
