"""Hypothesis: on any routing, sizes and capacity, the reference backend equals the oracle, and
no slot is lost: every routed slot is either a row on its expert's rank or counted as dropped."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_ep
from tests import harness, oracle


@st.composite
def cases(draw):
    n = draw(st.sampled_from([1, 2, 4, 8]))
    experts = n * draw(st.integers(1, 3))
    k = draw(st.integers(1, 4))
    t = draw(st.integers(0, 6))
    capacity = draw(st.one_of(st.none(), st.integers(1, n * max(t, 1) * k + 2)))
    seed = draw(st.integers(0, 2**31 - 1))
    skew = draw(st.sampled_from(["uniform", "hot", "sparse"]))
    return n, experts, k, t, capacity, seed, skew


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_reference_equals_oracle_on_any_routing(case):
    n, experts, k, t, capacity, seed, skew = case
    rng = np.random.default_rng(seed)
    idx, w = harness.random_routing(rng, n, t, k, experts, unrouted=0.3 if skew == "sparse" else 0.05,
                                    invalid=0.05)
    if skew == "hot":
        idx = np.where(rng.random(idx.shape) < 0.7, experts - 1, idx).astype(np.int32)
    x = harness.random_tokens(rng, n, t, 16, np.float32)
    cfg = jax_ep.EPConfig(num_experts=experts, top_k=k, capacity=capacity,
                          max_tokens=max(t, 1), hidden_size=16, dtype="float32")
    group = jax_ep.EPGroup(harness.make_mesh(n), "expert", cfg, backend="reference")
    d, _, weighted = harness.dispatch_combine_all(group, x, idx, w)
    want = oracle.dispatch(x, idx, w, experts, cfg.capacity_rows(n, t))
    harness.assert_dispatch_matches(d, want)
    harness.assert_combine_close(
        weighted, oracle.combine(want.rows, want.dest_rank, want.dest_row, want.row_weights),
        np.float32)
    routed = ((idx >= 0) & (idx < experts)).sum()
    assert d.group_sizes.sum() + d.num_dropped.sum() == routed
    assert (d.handle.dest_row >= 0).sum() == d.group_sizes.sum()
