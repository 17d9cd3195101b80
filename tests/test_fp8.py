"""FP8 dispatch: quantize_fp8 / dequantize_fp8 against numpy, fp8 rows and their scales moved
bit for bit in both layouts (against the numpy oracles), gradients, errors."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_ep
from tests import harness, oracle

N, T, K, E, H = 4, 5, 2, 8, 256


def numpy_quantize(x):
    blocks = x.astype(np.float32).reshape(x.shape[:-1] + (-1, 128))
    scales = np.maximum(np.abs(blocks).max(-1), 1e-4) / 448.0
    return scales.astype(np.float32)


def test_quantize_matches_numpy_and_roundtrips():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(6, H)) * rng.choice([1e-3, 1.0, 50.0], size=(6, 1))).astype(
        ml_dtypes.bfloat16)
    x[2, :128] = 0  # an all-zero block
    q, scales = jax.jit(jax_ep.quantize_fp8)(x)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == x.shape and scales.shape == (6, 2)
    np.testing.assert_allclose(np.asarray(scales), numpy_quantize(x), rtol=1e-6)
    qf = np.asarray(q).astype(np.float32).reshape(6, 2, 128)
    # The block's largest magnitude sits at the top of the e4m3 range.
    nonzero = np.abs(x.astype(np.float32)).reshape(6, 2, 128).max(-1) > 0
    np.testing.assert_array_equal(np.abs(qf).max(-1)[nonzero], 448.0)
    back = np.asarray(jax_ep.dequantize_fp8(q, scales, jnp.float32))
    s = np.repeat(np.asarray(scales), 128, axis=1)
    # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal steps of 2^-9 * scale.
    err = np.abs(back - x.astype(np.float32))
    assert np.all(err <= 2.0 ** -4 * np.abs(x.astype(np.float32)) + 2.0 ** -9 * s)
    assert not np.any(back[2, :128])


def test_quantize_needs_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 128"):
        jax_ep.quantize_fp8(jnp.zeros((2, 96)))


def fp8_inputs(seed=0):
    rng = np.random.default_rng(seed)
    idx, w = harness.random_routing(rng, N, T, K, E, invalid=0.1)
    idx[:, 0, 1] = idx[:, 0, 0]
    x = harness.random_tokens(rng, N, T, H, np.float32) * 3
    q, s = jax.jit(jax_ep.quantize_fp8)(x)
    return np.asarray(q), np.asarray(s), idx, w


def make_group(**extra):
    cfg = jax_ep.EPConfig(num_experts=E, top_k=K, max_tokens=T, hidden_size=H, **extra)
    return jax_ep.EPGroup(harness.make_mesh(N), "expert", cfg, backend="reference")


@pytest.mark.parametrize("layout", ["normal", "padded"])
def test_fp8_dispatch_moves_rows_and_scales(layout):
    q, s, idx, w = fp8_inputs()
    group = make_group(padded_layout=True)
    run = harness.per_rank(group.mesh, lambda a, b, c, d: jax_ep.dispatch(
        group, a, b, c, layout=layout, x_scales=d))
    d = jax.tree.map(np.asarray, run(q, idx, w, s))
    assert d.x.dtype == jnp.float8_e4m3fn and d.scales.dtype == np.float32
    if layout == "normal":
        capacity = N * T * K
        want = oracle.dispatch(q, idx, w, E, capacity)
        harness.assert_dispatch_matches(d, want)
        np.testing.assert_array_equal(d.scales, oracle.dispatch(s, idx, w, E, capacity).rows)
    else:
        want = oracle.padded_dispatch(q, idx, w, E, T, scales=s)
        np.testing.assert_array_equal(d.x.view(np.uint8), want.rows.view(np.uint8))
        np.testing.assert_array_equal(d.scales, want.scales)
        np.testing.assert_array_equal(d.weights, want.row_weights)
        np.testing.assert_array_equal(d.recv_counts, want.recv_counts)


@pytest.mark.parametrize("layout", ["normal", "padded"])
def test_fp8_grads_reach_the_weights_not_the_tokens(layout):
    """loss of combine(dequantized rows, weights): d/dw equals the dense formula on the
    dequantized tokens; the fp8 tokens get a zero cotangent."""
    q, s, idx, w = fp8_inputs(1)
    group = make_group(padded_layout=True, dtype="float32")  # combine moves float32 rows

    def per(a, b, c, sc):
        d = jax_ep.dispatch(group, a, b, c, layout=layout, x_scales=sc)
        rows = jax_ep.dequantize_fp8(d.x, d.scales, jnp.float32)
        return jax_ep.combine(group, rows, d.handle, weights=d.weights)

    run = harness.per_rank(group.mesh, per)
    want_layout = oracle.padded_dispatch(q, idx, w, E, T)
    delivered = want_layout.slot_expert >= 0 if layout == "padded" else (idx >= 0) & (idx < E)
    deq = np.asarray(jax_ep.dequantize_fp8(q, s, jnp.float32))

    def dense(wt):
        return jnp.sum((jnp.where(delivered, wt, 0)[..., None] * deq[..., None, :]).sum(-2) ** 2)

    got = jax.grad(lambda wt: jnp.sum(run(q, idx, wt, s) ** 2))(jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.grad(dense)(jnp.asarray(w))),
                               rtol=1e-4, atol=1e-4)
    _, vjp = jax.vjp(lambda a: run(a, idx, w, s), jnp.asarray(q))
    (ct_q,) = vjp(jnp.ones((N, T, H), jnp.float32))
    assert not np.any(np.asarray(ct_q).astype(np.float32))


@pytest.mark.parametrize("case,match", [
    ("no_scales", "pass its per-128-channel scales"),
    ("scales_with_bf16", "x_scales is for fp8 tokens"),
    ("bad_scales_shape", r"x_scales must be float32 \[5, 2\]"),
])
def test_fp8_dispatch_errors(case, match):
    q, s, idx, w = fp8_inputs()
    group = make_group()
    x, sc = q, s
    if case == "no_scales":
        sc = None
    elif case == "scales_with_bf16":
        x = q.astype(np.float32).astype(ml_dtypes.bfloat16)
    elif case == "bad_scales_shape":
        sc = s[..., :1]
    with pytest.raises(ValueError, match=match):
        harness.per_rank(group.mesh, lambda a, b, c: jax_ep.dispatch(
            group, a, b, c, x_scales=sc if sc is None else sc[0]).x)(x, idx, w)


def test_combine_rejects_fp8_rows():
    q, s, idx, w = fp8_inputs()
    group = make_group()

    def per(a, b, c, sc):
        d = jax_ep.dispatch(group, a, b, c, x_scales=sc)
        return jax_ep.combine(group, d.x, d.handle)

    with pytest.raises(ValueError, match="rows has dtype float8_e4m3fn"):
        harness.per_rank(group.mesh, per)(q, idx, w, s)
