"""The contract of docs/contract.md on the reference backend, against the numpy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from tests import harness, oracle


def run_case(num_ranks, tokens, top_k, num_experts, dtype=np.float32, hidden=8, idx=None,
             weights=None, data=1, seed=0, **config):
    rng = np.random.default_rng(seed)
    r = num_ranks * data
    if idx is None:
        idx, weights = harness.random_routing(rng, r, tokens, top_k, num_experts)
    elif weights is None:
        weights = rng.random(idx.shape).astype(np.float32)
    x = harness.random_tokens(rng, r, tokens, hidden, dtype)
    mesh = harness.make_mesh(num_ranks, data)
    cfg = jax_ep.EPConfig(num_experts=num_experts, top_k=top_k, max_tokens=max(tokens, 1),
                          hidden_size=hidden, dtype=dtype, **config)
    group = jax_ep.EPGroup(mesh, "expert", cfg, backend="reference")
    d, plain, weighted = harness.dispatch_combine_all(group, x, idx, weights)
    capacity = cfg.capacity_rows(num_ranks, tokens)
    for s in range(data):  # each data slice is its own EP group
        sl = slice(s * num_ranks, (s + 1) * num_ranks)
        want = oracle.dispatch(x[sl], idx[sl], weights[sl], num_experts, capacity)
        harness.assert_dispatch_matches(jax.tree.map(lambda a: a[sl], d), want)
        harness.assert_combine_close(
            plain[sl], oracle.combine(want.rows, want.dest_rank, want.dest_row), dtype)
        harness.assert_combine_close(
            weighted[sl], oracle.combine(want.rows, want.dest_rank, want.dest_row,
                                         want.row_weights), dtype)
    return d, weighted, x, idx, weights


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("num_ranks,num_experts,top_k", [(8, 16, 4), (4, 8, 2), (2, 6, 3)])
def test_random_routing_matches_oracle(dtype, num_ranks, num_experts, top_k):
    run_case(num_ranks, 7, top_k, num_experts, dtype=dtype, seed=num_ranks * 31 + top_k)


def test_rows_are_zero_past_group_sizes_and_output_dtype():
    d, weighted, *_ = run_case(4, 6, 2, 8, dtype=jnp.bfloat16)
    assert d.x.dtype == jnp.bfloat16 and weighted.dtype == jnp.bfloat16
    for r in range(4):
        used = d.group_sizes[r].sum()
        assert not np.any(d.x[r, used:].astype(np.float32))
        assert not np.any(d.weights[r, used:])


def test_dropless_combine_is_the_weighted_sum_identity():
    d, weighted, x, idx, w = run_case(8, 9, 4, 32, seed=3)
    assert d.num_dropped.sum() == 0
    harness.assert_combine_close(weighted, oracle.dense_moe_identity(x, idx, w, 32), np.float32)


def test_all_tokens_to_one_expert():
    idx = np.full((4, 5, 2), 5, np.int32)
    d, *_ = run_case(4, 5, 2, 8, idx=idx)
    assert d.group_sizes[2].tolist() == [0, 40] and d.group_sizes.sum() == 40


def test_all_slots_unrouted():
    d, weighted, *_ = run_case(4, 5, 3, 8, idx=np.full((4, 5, 3), -1, np.int32))
    assert d.group_sizes.sum() == 0 and not np.any(d.x) and not np.any(weighted)
    assert np.all(d.handle.dest_rank == -1) and np.all(d.handle.row_src == -1)


@pytest.mark.parametrize("tokens", [0, 1])
def test_zero_and_one_token(tokens):
    d, weighted, *_ = run_case(4, tokens, 2, 8)
    assert d.x.shape == (4, 4 * tokens * 2, 8) and weighted.shape == (4, tokens, 8)


def test_top1_and_one_expert_per_rank():
    run_case(8, 6, 1, 8, seed=5)


def test_duplicate_experts_in_one_token_are_separate_rows():
    idx = np.tile(np.array([[3, 3, 3], [0, 3, 0]], np.int32), (4, 1, 1))
    d, *_ = run_case(4, 2, 3, 8, idx=idx)
    assert d.group_sizes[1, 1] == 4 * 4  # four slots of expert 3 from each of 4 ranks
    assert d.group_sizes[0, 0] == 4 * 2


@pytest.mark.parametrize("config", [dict(capacity_factor=0.5), dict(capacity=3)])
def test_overflow_drops_the_last_rows_and_counts_them(config):
    idx = np.zeros((4, 6, 2), np.int32)
    idx[:, :, 1] = np.arange(6) % 8  # rank 0 is oversubscribed
    d, *_ = run_case(4, 6, 2, 8, idx=idx, **config)
    arrived = ((idx >= 0) & (idx // 2 == 0)).sum()
    assert d.num_dropped[0] == arrived - d.x.shape[1] > 0


def test_invalid_ids_count_and_act_as_unrouted():
    rng = np.random.default_rng(11)
    idx, w = harness.random_routing(rng, 4, 8, 2, 8, invalid=0.2)
    d, *_ = run_case(4, 8, 2, 8, idx=idx, weights=w)
    assert d.num_invalid.sum() == ((idx < -1) | (idx >= 8)).sum() > 0


def test_ep_over_one_axis_of_a_2d_mesh():
    run_case(4, 5, 2, 8, data=2, seed=7)


def test_large_hidden_bf16():
    run_case(2, 16, 8, 16, dtype=jnp.bfloat16, hidden=256, seed=9)
