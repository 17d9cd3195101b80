"""The hierarchical backend on one process (8 CPU devices split into emulated hosts by an
explicit `hosts=`): dispatch equals the numpy oracle bit for bit, combine matches it (and the
reference backend) to float32 rounding, and gradients are right to second order, over both
inter-host engines (ragged_all_to_all through tests/ragged_emulation.py on CPUs); the tokens
that cross hosts are those of the bound, and combine's partials rounding stays in its bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_ep
from jax_ep import coordination, topology
from jax_ep.backends import hierarchical
from tests import harness, oracle, ragged_emulation

HOSTS = {
    "2x4": [0, 0, 0, 0, 1, 1, 1, 1],
    "4x2": [0, 0, 1, 1, 2, 2, 3, 3],
    "interleaved": ["a", "b", "a", "b", "a", "b", "a", "b"],
    "8x1": list(range(8)),
    "1x8": [0] * 8,
}


ENGINES = ["all_to_all", "ragged"]


def _group(hosts, n=8, data=1, inter_host="auto", **cfg):
    config = jax_ep.EPConfig(num_experts=cfg.pop("num_experts", 16), top_k=cfg.pop("top_k", 3),
                             **cfg)
    return jax_ep.EPGroup(harness.make_mesh(n, data), "expert", config, backend="hierarchical",
                          hosts=hosts, inter_host=inter_host)


@pytest.fixture
def emulated_ragged(monkeypatch):
    ragged_emulation.install(monkeypatch)


@pytest.fixture(params=ENGINES)
def engine(request):
    """Each inter-host engine; the ragged one on CPUs through the emulated collective."""
    if request.param == "ragged":
        request.getfixturevalue("emulated_ragged")
    return request.param


# The ragged engine's offsets differ with the host layout; a host of one rank or a single host
# adds nothing to them that 2x4, 4x2 and interleaved do not.
@pytest.mark.parametrize("hosts,inter_host", [
    (hosts, engine) for hosts in HOSTS for engine in ENGINES
    if engine == "all_to_all" or hosts in ("2x4", "4x2", "interleaved")])
@pytest.mark.parametrize("dtype,capacity", [("float32", None), ("bfloat16", 9)])
def test_matches_oracle(hosts, inter_host, dtype, capacity, request):
    engine = inter_host
    if engine == "ragged":
        request.getfixturevalue("emulated_ragged")
    n, t, k, e, h = 8, 5, 3, 16, 8
    rng = np.random.default_rng(len(hosts) + (capacity or 0))
    idx, w = harness.random_routing(rng, n, t, k, e, unrouted=0.15, invalid=0.05)
    x = harness.random_tokens(rng, n, t, h, jnp.dtype(dtype))
    group = _group(HOSTS[hosts], capacity=capacity, max_tokens=t, hidden_size=h, dtype=dtype,
                   inter_host=engine, f32_partials=True)
    assert group.backend_name == "hierarchical" and group.inter_host == engine
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
def grad_data():
    rng = np.random.default_rng(21)
    idx, w = harness.random_routing(rng, N, T, K, E, unrouted=0.2)
    x = harness.random_tokens(rng, N, T, H, np.float64).astype(np.float32)
    return x, idx, w, rng


def _grad_group(backend, engine="auto"):
    return jax_ep.EPGroup(harness.make_mesh(N), "expert",
                          jax_ep.EPConfig(num_experts=E, top_k=K, max_tokens=T, hidden_size=H,
                                          dtype="float32"), backend=backend, hosts=[0, 0, 1, 1],
                          inter_host=engine)


def _moe_fn(group, idx):
    """(x, w, rows, scale) -> (dispatched rows, row weights, weighted combine of rows*scale)."""
    def per(xr, ir, wr, rows, scale):
        d = jax_ep.dispatch(group, xr, ir, wr)
        return d.x, d.weights, jax_ep.combine(group, rows * d.weights[:, None], d.handle,
                                              weights=scale)
    run = harness.per_rank(group.mesh, per)
    return lambda x, w, rows, scale: run(x, idx, w, rows, scale)


def test_grads_second_order(grad_data):
    x, idx, w, rng = grad_data
    c = N * T * K
    rows = rng.normal(size=(N, c, H)).astype(np.float32)
    scale = rng.random((N, c)).astype(np.float32)
    check_grads(_moe_fn(_grad_group("hierarchical"), idx), (x, w, rows, scale), order=2,
                modes=["rev"], atol=1e-2, rtol=1e-2)


def test_vjp_equals_reference(grad_data, engine):
    x, idx, w, rng = grad_data
    c = N * T * K
    args = (x, w, rng.normal(size=(N, c, H)).astype(np.float32),
            rng.random((N, c)).astype(np.float32))
    cts = (rng.normal(size=(N, c, H)).astype(np.float32),
           rng.normal(size=(N, c)).astype(np.float32),
           rng.normal(size=(N, T, H)).astype(np.float32))
    got, want = ([np.asarray(g) for g in jax.vjp(_moe_fn(group, idx), *args)[1](cts)]
                 for group in (_grad_group("hierarchical", engine), _grad_group("reference")))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _hosts_per_token(dest_rank, host_of, num_hosts):
    """[N, num_hosts] tokens of each rank with at least one delivered slot on each host
    (numpy, from the oracle's dest_rank)."""
    out = np.zeros((dest_rank.shape[0], num_hosts), np.int64)
    for s, tokens in enumerate(dest_rank):
        for slots in tokens:
            for g in {host_of[d] for d in slots if d >= 0}:
                out[s, g] += 1
    return out


@pytest.mark.parametrize("hosts", ["2x4", "4x2", "8x1"])
def test_tokens_crossing_hosts_are_the_routed_ones(hosts, engine):
    """inter_host_tokens (the ragged engine's send sizes) counts each token once per host
    holding one of its delivered slots, for a skewed routing (most slots on host 0's experts)
    and with a capacity that drops rows; dispatch and combine stay exact there."""
    n, t, k, e, h = 8, 6, 3, 16, 8
    rng = np.random.default_rng(9)
    idx = np.where(rng.random((n, t, k)) < 0.7, rng.integers(0, 4, (n, t, k)),
                   rng.integers(0, e, (n, t, k))).astype(np.int32)
    w = rng.random((n, t, k)).astype(np.float32)
    x = harness.random_tokens(rng, n, t, h, np.float32)
    group = _group(HOSTS[hosts], num_experts=e, top_k=k, capacity=10, max_tokens=t,
                   hidden_size=h, dtype="float32", inter_host=engine)
    topo = group.topology

    def per(a, i, b):
        d = jax_ep.dispatch(group, a, i, b)
        return (hierarchical.inter_host_tokens(d.handle, topo),
                jax_ep.combine(group, d.x, d.handle, weights=d.weights))

    counts, yw = jax.tree.map(np.asarray, harness.per_rank(group.mesh, per)(x, idx, w))
    want = oracle.dispatch(x, idx, w, e, 10)
    assert want.num_dropped.sum() > 0  # the capacity cut is exercised
    np.testing.assert_array_equal(counts, _hosts_per_token(want.dest_rank, topo.host_of,
                                                           topo.num_hosts))
    harness.assert_combine_close(
        yw, oracle.combine(want.rows, want.dest_rank, want.dest_row, want.row_weights),
        np.float32)


def test_partials_rounding():
    """bf16 rows, 8 hosts (the most partials per token): with f32_partials the result is the
    exact sum rounded once (2 ulps); by default each host's partial is rounded to bf16 before it
    crosses, which stays within u * (sum of |terms| + |sum|) (u = 2**-8, bf16's unit roundoff)
    and differs from the unrounded result somewhere. float32 rows: both settings agree bitwise."""
    n, t, k, e, h = 8, 16, 4, 16, 32
    rng = np.random.default_rng(4)
    idx, w = harness.random_routing(rng, n, t, k, e, unrouted=0.0)
    x = harness.random_tokens(rng, n, t, h, jnp.bfloat16)
    out = {}
    for f32 in (True, False):
        group = _group(HOSTS["8x1"], num_experts=e, top_k=k, max_tokens=t, hidden_size=h,
                       f32_partials=f32)
        _, _, out[f32] = harness.dispatch_combine_all(group, x, idx, w)
    want = oracle.dispatch(x, idx, w, e, n * t * k)
    exact = oracle.combine(want.rows, want.dest_rank, want.dest_row, want.row_weights)
    abs_terms = oracle.combine(np.abs(want.rows.astype(np.float32)), want.dest_rank,
                               want.dest_row, np.abs(want.row_weights))
    harness.assert_partials_rounding(out[True], out[False], exact, abs_terms)

    xf = x.astype(np.float32)
    got = [harness.dispatch_combine_all(
        _group(HOSTS["4x2"], num_experts=e, top_k=k, max_tokens=t, hidden_size=h,
               dtype="float32", f32_partials=f32), xf, idx, w)[2]
        for f32 in (True, False)]
    harness.assert_same_bytes(got[0], got[1])


def test_engine_and_partials_options():
    mesh = harness.make_mesh(8)
    cfg = jax_ep.EPConfig(num_experts=16, top_k=2, max_tokens=8, hidden_size=64)
    assert jax_ep.EPGroup(mesh, "expert", cfg, hosts=HOSTS["2x4"]).inter_host == "all_to_all"
    assert jax_ep.EPGroup(mesh, "expert", cfg, backend="reference").inter_host is None
    with pytest.raises(ValueError, match="inter_host must be one of"):
        jax_ep.EPGroup(mesh, "expert", cfg, hosts=HOSTS["2x4"], inter_host="nccl")
    with pytest.raises(ValueError, match="inter_host='ragged' needs devices whose XLA"):
        jax_ep.EPGroup(mesh, "expert", cfg, hosts=HOSTS["2x4"], inter_host="ragged")
    flag = hierarchical.RAGGED_XLA_FLAG
    assert hierarchical.resolve_inter_host("auto", ["gpu", "gpu"], f"--a=1 {flag}") == "ragged"
    assert hierarchical.resolve_inter_host("auto", ["gpu", "gpu"], "--a=1") == "all_to_all"
    assert hierarchical.resolve_inter_host("auto", ["cpu"], flag) == "all_to_all"
    with pytest.raises(ValueError, match="XLA_FLAGS"):
        hierarchical.resolve_inter_host("ragged", ["gpu"], "")
    assert cfg.f32_partials is False
    assert jax_ep.EPConfig(num_experts=16, top_k=2, f32_partials=np.bool_(True)) == \
        jax_ep.EPConfig(num_experts=16, top_k=2, f32_partials=True)
    with pytest.raises(ValueError, match="EPConfig.f32_partials must be True or False"):
        jax_ep.EPConfig(num_experts=16, top_k=2, f32_partials="false")
    # Processes compare both when they create a group together.
    fields = coordination.describe(cfg, mesh, "expert", 0, "auto", None, "auto", "ragged")
    assert fields["config.f32_partials"] == "False" and fields["inter_host"] == "'ragged'"


def test_entry_bytes():
    """The records per token and host: what the byte count of docs/multihost.md multiplies."""
    assert hierarchical.entry_bytes("dispatch", 8, 7168, jnp.bfloat16, True) == \
        7168 * 2 + 4 + 8 * 4 * 3
    assert hierarchical.entry_bytes("dispatch", 8, None, None, False) == 4 + 8 * 8
    assert hierarchical.entry_bytes("combine", 8, 7168, jnp.bfloat16, False) == 7168 * 2
    assert hierarchical.entry_bytes("combine", 8, 7168, jnp.float32, True) == 7168 * 4 + 32


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
