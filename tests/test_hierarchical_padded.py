"""The padded (low-latency) layout on the hierarchical backend, on CPUs (8 emulated devices split
into hosts by `hosts=`; the intra-host leg is XlaIntraHostPaddedLeg there): dispatch equals the
numpy oracle (tests/oracle.py) and the reference backend's padded operations bit for bit over
both inter-host engines, combine matches the oracle to float32 rounding (within the bound of
bf16 partials by default), gradients to second order; the forwarder's pool holds exactly the
routed tokens in each source's token order; the pure-JAX parts of the cuda leg
(CudaIntraHostPaddedLeg: the sources table, expert ids of the host group) against the topology.
The cuda leg itself is tests/test_hierarchical_cuda.py's (marker gpu)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_ep
from jax_ep import topology
from jax_ep.backends import hierarchical
from jax_ep.backends.hierarchical_padded import (HierarchicalPaddedOps, XlaIntraHostPaddedLeg,
                                                 pool_slots)
from jax_ep.config import shape_for
from tests import cuda_padded_checks as checks
from tests import harness, oracle, ragged_emulation
from tests.test_hierarchical import HOSTS

ENGINES = ["all_to_all", "ragged"]


def _group(hosts, n=8, inter_host="all_to_all", **cfg):
    config = jax_ep.EPConfig(num_experts=cfg.pop("num_experts", 16), top_k=cfg.pop("top_k", 3),
                             padded_layout=True, **cfg)
    return jax_ep.EPGroup(harness.make_mesh(n), "expert", config, backend="hierarchical",
                          hosts=hosts, inter_host=inter_host)


def _run(group, x, idx, w):
    """Padded dispatch, then combine without and with the fused weights, per rank (numpy)."""
    def fn(a, b, c):
        d = jax_ep.dispatch(group, a, b, c, layout="padded")
        return (d, jax_ep.combine(group, d.x, d.handle),
                jax_ep.combine(group, d.x, d.handle, weights=d.weights))

    return jax.tree.map(np.asarray, harness.per_rank(group.mesh, fn)(x, idx, w))


def _routing(rng, n, t, k, e):
    """Random routing with unrouted and invalid ids, and repeated experts in some tokens."""
    idx, w = harness.random_routing(rng, n, t, k, e, unrouted=0.15, invalid=0.05)
    idx[:, ::3, 1] = idx[:, ::3, 0]
    return idx, w


@pytest.mark.parametrize("hosts,inter_host", [
    (hosts, engine) for hosts in HOSTS for engine in ENGINES
    if engine == "all_to_all" or hosts in ("2x4", "4x2", "interleaved")])
@pytest.mark.parametrize("dtype,f32_partials", [("float32", False), ("bfloat16", True)])
def test_matches_oracle_and_reference(hosts, inter_host, dtype, f32_partials, monkeypatch):
    if inter_host == "ragged":
        ragged_emulation.install(monkeypatch)
    n, t, k, e, m, h = 8, 5, 3, 16, 7, 8
    rng = np.random.default_rng(len(hosts) + len(dtype))
    idx, w = _routing(rng, n, t, k, e)
    x = harness.random_tokens(rng, n, t, h, jnp.dtype(dtype))
    group = _group(HOSTS[hosts], max_tokens=m, hidden_size=h, dtype=dtype, inter_host=inter_host,
                   f32_partials=f32_partials)
    ops = group.ops["padded"]
    assert isinstance(ops, HierarchicalPaddedOps) and isinstance(ops.intra, XlaIntraHostPaddedLeg)
    d, y, yw = _run(group, x, idx, w)
    want = oracle.padded_dispatch(x, idx, w, e, m)
    assert want.num_dropped.sum() > 0 and want.num_invalid.sum() > 0  # both are exercised
    harness.assert_padded_matches(d, want)
    harness.assert_combine_close(y, oracle.padded_combine(want.rows, want.slot_expert,
                                                          want.slot_pos), dtype)
    harness.assert_combine_close(yw, oracle.padded_combine(want.rows, want.slot_expert,
                                                           want.slot_pos, want.row_weights),
                                 dtype)
    # The flat reference backend's padded operations: the same bytes.
    ref = jax_ep.EPGroup(group.mesh, "expert", group.config, backend="reference")
    harness.assert_same_bytes(d, _run(ref, x, idx, w)[0])


@pytest.mark.parametrize("case", [checks.CASES[i] for i in (0, 1, 2, 4, 6, 7, 8)],
                         ids=lambda c: c.name)
def test_gpu_checks_pass_on_the_xla_leg(case):
    """tests/cuda_padded_checks.py (both combines, both VJPs, two runs byte-identical) on 2 hosts
    of 2 ranks, and on interleaved hosts: a GPU failure of the same checks points at the cuda
    leg."""
    for hosts in ([0, 0, 1, 1], ["a", "b", "a", "b"]):
        assert checks.check_case(harness.make_mesh(4), case, backend="hierarchical",
                                 group_kwargs=dict(hosts=hosts)) == 4


def test_fp8_and_scan_checks_pass_on_the_xla_leg():
    assert checks.check_fp8(harness.make_mesh(4), backend="hierarchical",
                            group_kwargs=dict(hosts=[0, 1, 0, 1])) == 4
    assert checks.check_scan_rounds(harness.make_mesh(4), rounds=4, backend="hierarchical",
                                    group_kwargs=dict(hosts=[0, 1, 2, 3])) == 4


# --- gradients ---------------------------------------------------------------------------------

N, T, K, E, H, M = 4, 3, 2, 8, 4, 4


@pytest.fixture(scope="module")
def grad_data():
    return harness.padded_grad_inputs(N, T, K, E, H)


def _grad_group(backend):
    return jax_ep.EPGroup(harness.make_mesh(N), "expert",
                          jax_ep.EPConfig(num_experts=E, top_k=K, max_tokens=M, hidden_size=H,
                                          dtype="float32", padded_layout=True),
                          backend=backend, hosts=[0, 1, 0, 1])


def _moe_fn(group, idx):
    """(x, w, rows, scale) -> (dispatched rows, row weights, weighted combine of rows*weights)."""
    def per(xr, ir, wr, rows, scale):
        d = jax_ep.dispatch(group, xr, ir, wr, layout="padded")
        return d.x, d.weights, jax_ep.combine(group, rows * d.weights[..., None], d.handle,
                                              weights=scale)
    run = harness.per_rank(group.mesh, per)
    return lambda x, w, rows, scale: run(x, idx, w, rows, scale)


def test_grads_second_order(grad_data):
    x, idx, w, rng = grad_data
    rows = rng.normal(size=(N, E // N, N * M, H)).astype(np.float32)
    scale = rng.random((N, E // N, N * M)).astype(np.float32)
    check_grads(_moe_fn(_grad_group("hierarchical"), idx), (x, w, rows, scale), order=2,
                modes=["rev"], atol=1e-2, rtol=1e-2)


def test_vjp_equals_reference(grad_data):
    x, idx, w, rng = grad_data
    shape = (N, E // N, N * M)
    args = (x, w, rng.normal(size=shape + (H,)).astype(np.float32),
            rng.random(shape).astype(np.float32))
    cts = (rng.normal(size=shape + (H,)).astype(np.float32),
           rng.normal(size=shape).astype(np.float32),
           rng.normal(size=(N, T, H)).astype(np.float32))
    got, want = ([np.asarray(g) for g in jax.vjp(_moe_fn(group, idx), *args)[1](cts)]
                 for group in (_grad_group("hierarchical"), _grad_group("reference")))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# --- combine's partial sums ------------------------------------------------------------------


def test_partials_rounding():
    """As the normal layout's: bf16 rows on 8 hosts; with f32_partials the exact sum rounded once
    (2 ulps); by default each host's partial is rounded to bf16 before it crosses, within
    u * (sum of |terms| + |sum|) (u = 2**-8), and differs from the unrounded result somewhere."""
    n, t, k, e, h = 8, 16, 4, 16, 32
    rng = np.random.default_rng(4)
    idx, w = harness.random_routing(rng, n, t, k, e, unrouted=0.0)
    x = harness.random_tokens(rng, n, t, h, jnp.bfloat16)
    out = {}
    for f32 in (True, False):
        group = _group(HOSTS["8x1"], num_experts=e, top_k=k, max_tokens=t, hidden_size=h,
                       f32_partials=f32)
        out[f32] = _run(group, x, idx, w)[2]
    want = oracle.padded_dispatch(x, idx, w, e, t)
    exact = oracle.padded_combine(want.rows, want.slot_expert, want.slot_pos, want.row_weights)
    abs_terms = oracle.padded_combine(np.abs(want.rows.astype(np.float32)), want.slot_expert,
                                      want.slot_pos, np.abs(want.row_weights))
    harness.assert_partials_rounding(out[True], out[False], exact, abs_terms)


# --- the pool and the cuda leg's tables --------------------------------------------------------


@pytest.mark.parametrize("hosts", ["2x4", "4x2", "interleaved", "8x1"])
def test_pool_holds_the_routed_tokens_in_source_order(hosts, monkeypatch):
    """Forwarder (host g, local l), pool entry s * T + t (segment s): token t of the rank
    (s, l) when one of its delivered slots' experts lives on host g, with the ids of those slots
    (repeats kept, other hosts' experts -1); -1 everywhere for the tokens that stayed home. The
    ragged engine moves only those tokens."""
    ragged_emulation.install(monkeypatch)
    n, t, k, e, m = 8, 6, 3, 16, 6
    rng = np.random.default_rng(11)
    idx, w = _routing(rng, n, t, k, e)
    group = _group(HOSTS[hosts], num_experts=e, top_k=k, max_tokens=m, hidden_size=8,
                   inter_host="ragged")
    ops, topo = group.ops["padded"], group.topology
    sizes = shape_for(group.config, n, t, 8)

    def per(i, b):
        from jax_ep import routing

        slot_expert = routing.padded_slots(i, sizes)[0]
        ids = jnp.where(routing.valid_slots(i, e), i, -1)
        pool = ops._pool(ops._route(slot_expert, sizes), ids, None, None, None, b, sizes)
        return pool.ids, pool.values

    pool_ids, pool_values = jax.tree.map(np.asarray, harness.per_rank(group.mesh, per)(idx, w))
    want = oracle.padded_dispatch(np.zeros((n, t, 1), np.float32), idx, w, e, m)
    el, rank_at = e // n, topo.rank_at()
    for r in range(n):
        g, l = topo.host_of[r], topo.local_of[r]
        for seg in range(topo.num_hosts):
            s = rank_at[seg, l]
            for tt in range(t):
                on_g = [topo.host_of[x // el] == g for x in want.slot_expert[s, tt] if x >= 0]
                here = np.array([0 <= x < e and topo.host_of[x // el] == g for x in idx[s, tt]])
                entry = seg * t + tt
                np.testing.assert_array_equal(pool_ids[r, entry],
                                              np.where(here, idx[s, tt], -1) if any(on_g)
                                              else -1)
                if any(on_g):
                    np.testing.assert_array_equal(pool_values[r, entry], w[s, tt])


@pytest.mark.parametrize("hosts", ["2x4", "4x2", "8x1"])
def test_tokens_crossing_hosts_are_the_routed_ones(hosts, monkeypatch):
    """inter_host_tokens of a PaddedHandle (the ragged engine's send sizes) counts each token
    once per host holding one of its delivered slots, for a skewed routing (most slots on host
    0's experts, repeats included); combine stays exact there."""
    ragged_emulation.install(monkeypatch)
    n, t, k, e, h = 8, 6, 3, 16, 8
    rng = np.random.default_rng(9)
    idx = np.where(rng.random((n, t, k)) < 0.7, rng.integers(0, 4, (n, t, k)),
                   rng.integers(0, e, (n, t, k))).astype(np.int32)
    w = rng.random((n, t, k)).astype(np.float32)
    x = harness.random_tokens(rng, n, t, h, np.float32)
    group = _group(HOSTS[hosts], num_experts=e, top_k=k, max_tokens=t, hidden_size=h,
                   dtype="float32", inter_host="ragged")
    topo = group.topology

    def per(a, i, b):
        d = jax_ep.dispatch(group, a, i, b, layout="padded")
        return (hierarchical.inter_host_tokens(d.handle, topo),
                jax_ep.combine(group, d.x, d.handle, weights=d.weights))

    counts, yw = jax.tree.map(np.asarray, harness.per_rank(group.mesh, per)(x, idx, w))
    want = oracle.padded_dispatch(x, idx, w, e, t)
    assert want.num_dropped.sum() > 0  # repeated experts: not delivered, not counted twice
    el = e // n
    for s in range(n):
        for g in range(topo.num_hosts):
            assert counts[s, g] == sum(
                any(x >= 0 and topo.host_of[x // el] == g for x in want.slot_expert[s, tt])
                for tt in range(t))
    harness.assert_combine_close(
        yw, oracle.padded_combine(want.rows, want.slot_expert, want.slot_pos, want.row_weights),
        np.float32)


@pytest.mark.parametrize("hosts", ["2x4", "4x2", "interleaved", "8x1"])
def test_cuda_leg_tables_follow_the_topology(hosts):
    """The sources table the padded kernels get ([0][g * L + l] = the rank (g, l), [1] its
    inverse) and the pool's expert ids converted to the host group's (rank d's local expert l
    is d * E_local + l, d the local index of the expert's rank)."""
    from jax_ep.backends.cuda import CudaIntraHostPaddedLeg

    topo = topology.from_labels(HOSTS[hosts], 8)
    leg = CudaIntraHostPaddedLeg(types.SimpleNamespace(
        topo=topo, _local_of=np.asarray(topo.local_of, np.int32), _rank_at=topo.rank_at()))
    nl, el, e = topo.ranks_per_host, 3, 24
    table = leg._sources
    assert table.shape == (2, 8) and table.dtype == np.int32
    for s in range(8):
        g, l = topo.host_of[s], topo.local_of[s]
        assert table[1, s] == g * nl + l == pool_slots(topo)[s]
        assert table[0, table[1, s]] == s
    sizes = shape_for(jax_ep.EPConfig(num_experts=e, top_k=2), 8, 4, 8)
    ids = np.arange(-1, e, dtype=np.int32)
    got = np.asarray(leg._group_experts(jnp.asarray(ids), sizes))
    assert got[0] == -1
    for gid, x in zip(got[1:], ids[1:]):
        rank = x // el
        assert topo.rank_at()[topo.host_of[rank], gid // el] == rank and gid % el == x % el
        assert 0 <= gid < nl * el
