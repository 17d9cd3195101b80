"""Runs per-rank functions on a mesh and turns the results into numpy arrays indexed by rank."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

import jax_ep
from jax_ep.per_rank import program as per_rank
from tests import oracle


def make_mesh(num_ranks: int, data: int = 1, devices=None) -> Mesh:
    """('expert',) of num_ranks devices, or ('data', 'expert') when data > 1."""
    devices = list(devices if devices is not None else jax.devices())[: data * num_ranks]
    if len(devices) < data * num_ranks:
        raise ValueError(f"need {data * num_ranks} devices, have {len(devices)}")
    if data == 1:
        return Mesh(np.array(devices), ("expert",))
    return Mesh(np.array(devices).reshape(data, num_ranks), ("data", "expert"))


def random_routing(rng, num_ranks, tokens, top_k, num_experts, unrouted=0.1, invalid=0.0):
    idx = rng.integers(0, num_experts, size=(num_ranks, tokens, top_k))
    u = rng.random(idx.shape)
    idx = np.where(u < unrouted, -1, idx)
    bad = rng.choice(np.array([-7, -2, num_experts, num_experts + 5]), size=idx.shape)
    idx = np.where(u > 1 - invalid, bad, idx)
    weights = rng.random((num_ranks, tokens, top_k)).astype(np.float32)
    return idx.astype(np.int32), weights


def random_tokens(rng, num_ranks, tokens, hidden, dtype):
    return rng.normal(size=(num_ranks, tokens, hidden)).astype(np.float32).astype(dtype)


def dispatch_all(group: jax_ep.EPGroup, x, idx, w):
    """Runs dispatch on every rank; returns the Dispatched fields as numpy arrays [R, ...]."""
    out = per_rank(group.mesh, lambda a, b, c: jax_ep.dispatch(group, a, b, c))(x, idx, w)
    return jax.tree.map(np.asarray, out)


def dispatch_combine_all(group: jax_ep.EPGroup, x, idx, w):
    """dispatch, then combine with and without the fused weights."""

    def fn(a, b, c):
        d = jax_ep.dispatch(group, a, b, c)
        return (d, jax_ep.combine(group, d.x, d.handle),
                jax_ep.combine(group, d.x, d.handle, weights=d.weights))

    return jax.tree.map(np.asarray, per_rank(group.mesh, fn)(x, idx, w))


def assert_same_bytes(got, want) -> None:
    """Every leaf of two pytrees of arrays holds the same bytes (bitwise equality: -0.0 and NaN
    payloads included)."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.atleast_1d(np.asarray(a)).view(np.uint8),
                                      np.atleast_1d(np.asarray(b)).view(np.uint8))


def assert_dispatch_matches(d, want: oracle.OracleDispatch) -> None:
    """Every dispatch output equal to the oracle, bit for bit."""
    np.testing.assert_array_equal(d.x.view(np.uint8), want.rows.view(np.uint8))
    np.testing.assert_array_equal(d.weights, want.row_weights)
    np.testing.assert_array_equal(d.group_sizes, want.group_sizes)
    np.testing.assert_array_equal(d.num_dropped, want.num_dropped)
    np.testing.assert_array_equal(d.num_invalid, want.num_invalid)
    np.testing.assert_array_equal(d.handle.dest_rank, want.dest_rank)
    np.testing.assert_array_equal(d.handle.dest_row, want.dest_row)
    np.testing.assert_array_equal(d.handle.row_src, want.row_src)
    np.testing.assert_array_equal(d.handle.num_recv, want.group_sizes.sum(axis=1))


def assert_padded_matches(d, want: oracle.OraclePadded) -> None:
    """Every padded dispatch output equal to the oracle, bit for bit."""
    np.testing.assert_array_equal(d.x.view(np.uint8), want.rows.view(np.uint8))
    np.testing.assert_array_equal(d.weights, want.row_weights)
    np.testing.assert_array_equal(d.recv_counts, want.recv_counts)
    np.testing.assert_array_equal(d.handle.recv_counts, want.recv_counts)
    np.testing.assert_array_equal(d.group_sizes, want.group_sizes)
    np.testing.assert_array_equal(d.num_dropped, want.num_dropped)
    np.testing.assert_array_equal(d.num_invalid, want.num_invalid)
    np.testing.assert_array_equal(d.handle.slot_expert, want.slot_expert)
    np.testing.assert_array_equal(d.handle.slot_pos, want.slot_pos)


def padded_grad_inputs(n, t, k, e, h, seed=21):
    """(x, idx, w, rng) for the padded layout's gradient tests: f32 tokens, some slots unrouted,
    and slot 1 of each rank's token 0 repeating slot 0's expert (not delivered, so no gradient
    flows through it)."""
    rng = np.random.default_rng(seed)
    idx, w = random_routing(rng, n, t, k, e, unrouted=0.2)
    idx[:, 0, 1] = idx[:, 0, 0]
    return random_tokens(rng, n, t, h, np.float32), idx, w, rng


def assert_combine_close(got, want_f64, dtype) -> None:
    """float32 accumulation, then one rounding to dtype: within 2 ulps of dtype of the exact
    float64 sum (absolute slack scaled by the largest output, for sums that cancel)."""
    eps = float(jax.numpy.finfo(dtype).eps)
    scale = max(1.0, float(np.abs(want_f64).max(initial=0.0)))
    np.testing.assert_allclose(np.asarray(got, np.float64), want_f64, rtol=2 * eps,
                               atol=2 * eps * scale)


def assert_partials_rounding(f32_partials, rounded, exact, abs_terms) -> None:
    """The hierarchical combine of bf16 rows: with f32 partials the exact float64 sum `exact`
    rounded once (2 ulps); with partials rounded to bf16 before they cross hosts, within
    u * (abs_terms + |exact|) (u = 2**-8, bf16's unit roundoff; abs_terms: the same combine of
    |rows| and |weights|), and different from the unrounded result somewhere."""
    assert_combine_close(f32_partials, exact, jax.numpy.bfloat16)
    err = np.abs(np.asarray(rounded).astype(np.float64) - exact)
    assert np.all(err <= 2.0**-8 * (abs_terms + np.abs(exact)) + 1e-30), err.max()
    assert np.any(np.asarray(rounded) != np.asarray(f32_partials))
