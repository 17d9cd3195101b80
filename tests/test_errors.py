"""Every bad static input DESIGN lists is a ValueError at trace time that says what to change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from tests import harness

N, T, K, E, H = 4, 3, 2, 8, 16


@pytest.fixture(scope="module")
def group():
    return jax_ep.EPGroup(harness.make_mesh(N), "expert",
                          jax_ep.EPConfig(num_experts=E, top_k=K, max_tokens=T, hidden_size=H),
                          backend="reference")


def inputs(t=T, h=H, k=K, x_dtype=jnp.float32, idx_dtype=jnp.int32, w_dtype=jnp.float32):
    return (jnp.zeros((N, t, h), x_dtype), jnp.zeros((N, t, k), idx_dtype),
            jnp.zeros((N, t, k), w_dtype))


def run_dispatch(group, x, idx, w):
    return harness.per_rank(group.mesh, lambda a, b, c: jax_ep.dispatch(group, a, b, c).x)(
        x, idx, w)


@pytest.mark.parametrize("kwargs,match", [
    (dict(x_dtype=jnp.int32), "x has dtype int32"),
    (dict(idx_dtype=jnp.float32), "topk_idx must be int32"),
    (dict(w_dtype=jnp.bfloat16), "topk_weights must be float32"),
    (dict(k=3), r"topk_idx must be \[T, k\]"),
    (dict(t=T + 1), "exceeds EPConfig.max_tokens"),
    (dict(h=H * 2), "EPConfig.hidden_size=16"),
])
def test_bad_dispatch_inputs(group, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_dispatch(group, *inputs(**kwargs))


def test_wrong_rank_of_x(group):
    x, idx, w = inputs()
    with pytest.raises(ValueError, match=r"x must be \[T, H\]"):
        run_dispatch(group, x[..., None], idx, w)


def test_weights_shape_mismatch(group):
    x, idx, w = inputs()
    with pytest.raises(ValueError, match=r"topk_weights must be \[T, k\]"):
        run_dispatch(group, x, idx, w[:, :, :1])


def test_outside_shard_map(group):
    x, idx, w = inputs()
    with pytest.raises(ValueError, match="inside jax.shard_map over the mesh axis 'expert'"):
        jax.jit(lambda a, b, c: jax_ep.dispatch(group, a, b, c))(x[0], idx[0], w[0])


def test_wrong_axis_size(group):
    other = harness.make_mesh(2)
    fn = harness.per_rank(other, lambda a, b, c: jax_ep.dispatch(group, a, b, c).x)
    x, idx, w = inputs()
    with pytest.raises(ValueError, match="group was built for 4 ranks"):
        fn(x[:2], idx[:2], w[:2])


def test_experts_not_divisible_by_ranks():
    with pytest.raises(ValueError, match="not divisible by the 4 ranks"):
        jax_ep.EPGroup(harness.make_mesh(4), "expert", jax_ep.EPConfig(num_experts=6, top_k=2))


def test_unknown_axis_and_backend():
    mesh = harness.make_mesh(4)
    cfg = jax_ep.EPConfig(num_experts=8, top_k=2)
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        jax_ep.EPGroup(mesh, "experts", cfg)
    with pytest.raises(ValueError, match="backend must be one of"):
        jax_ep.EPGroup(mesh, "expert", cfg, backend="nccl")


def test_cuda_backend_on_cpu_mesh_is_refused():
    with pytest.raises(ValueError, match="backend='cuda' needs"):
        jax_ep.EPGroup(harness.make_mesh(2), "expert", jax_ep.EPConfig(num_experts=4, top_k=1),
                       backend="cuda")


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=0, top_k=1), "num_experts must be a positive int"),
    (dict(num_experts=4, top_k=0), "top_k must be a positive int"),
    (dict(num_experts=4, top_k=64), "above the supported"),
    (dict(num_experts=4, top_k=1, dtype="int8"), "dtype must be one of"),
    (dict(num_experts=4, top_k=1, capacity=4, capacity_factor=1.0), "not both"),
    (dict(num_experts=4, top_k=1, capacity_factor=0.0), "capacity_factor must be > 0"),
    (dict(num_experts=4, top_k=1, timeout_s=0), "timeout_s must be > 0"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jax_ep.EPConfig(**kwargs)


def test_combine_rejects_rows_of_another_shape(group):
    x, idx, w = inputs()

    def per(a, b, c):
        d = jax_ep.dispatch(group, a, b, c)
        return jax_ep.combine(group, d.x[:-1], d.handle)

    with pytest.raises(ValueError, match="do not match the handle"):
        harness.per_rank(group.mesh, per)(x, idx, w)


def test_combine_rejects_bad_weights(group):
    x, idx, w = inputs()

    def per(a, b, c):
        d = jax_ep.dispatch(group, a, b, c)
        return jax_ep.combine(group, d.x, d.handle, weights=d.weights.astype(jnp.bfloat16))

    with pytest.raises(ValueError, match="weights must be float32"):
        harness.per_rank(group.mesh, per)(x, idx, w)


def test_debug_mode_names_the_bad_id():
    group = jax_ep.EPGroup(harness.make_mesh(N), "expert",
                           jax_ep.EPConfig(num_experts=E, top_k=K, debug=True),
                           backend="reference")
    x, idx, w = inputs()
    idx = np.zeros(idx.shape, np.int32)
    idx[2, 1, 1] = 42
    with pytest.raises(Exception, match=r"outside \[-1, 8\): 1 in all, e.g. 42 on rank 2"):
        jax.block_until_ready(run_dispatch(group, x, idx, w))
    # Valid ids pass in debug mode.
    jax.block_until_ready(run_dispatch(group, x, np.zeros_like(idx), w))
