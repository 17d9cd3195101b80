"""Every bad static input docs/contract.md lists is a ValueError at trace time that says what to change."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from jax_ep import coordination, validation
from tests import harness

N, T, K, E, H = 4, 3, 2, 8, 16


@pytest.fixture(scope="module")
def group():
    return jax_ep.EPGroup(harness.make_mesh(N), "expert",
                          jax_ep.EPConfig(num_experts=E, top_k=K, max_tokens=T, hidden_size=H,
                                          dtype="float32"),
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
        jax_ep.EPGroup(harness.make_mesh(4), "expert",
                       jax_ep.EPConfig(num_experts=6, top_k=2, max_tokens=T, hidden_size=H))


def test_unknown_axis_and_backend():
    mesh = harness.make_mesh(4)
    cfg = jax_ep.EPConfig(num_experts=8, top_k=2, max_tokens=T, hidden_size=H)
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        jax_ep.EPGroup(mesh, "experts", cfg)
    with pytest.raises(ValueError, match="backend must be one of"):
        jax_ep.EPGroup(mesh, "expert", cfg, backend="nccl")


def test_cuda_backend_on_cpu_mesh_is_refused():
    with pytest.raises(ValueError, match="backend='cuda' needs"):
        jax_ep.EPGroup(harness.make_mesh(2), "expert",
                       jax_ep.EPConfig(num_experts=4, top_k=1, max_tokens=T, hidden_size=H),
                       backend="cuda")


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=0, top_k=1), "num_experts must be a positive int"),
    (dict(num_experts=4, top_k=0), "top_k must be a positive int"),
    (dict(num_experts=4, top_k=64), "above the supported"),
    (dict(num_experts=4, top_k=1, dtype="int8"), "dtype must be one of"),
    (dict(num_experts=4, top_k=1, capacity=4, capacity_factor=1.0), "not both"),
    (dict(num_experts=4, top_k=1, capacity_factor=0.0), "capacity_factor must be a finite .*> 0"),
    (dict(num_experts=4, top_k=1, timeout_s=0), "timeout_s must be a finite number > 0"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jax_ep.EPConfig(**kwargs)


@pytest.mark.parametrize("field,value,match", [
    ("capacity_factor", float("inf"), "capacity_factor must be a finite number > 0, got inf"),
    ("capacity_factor", float("nan"), "capacity_factor must be a finite number"),
    ("capacity_factor", "1.5", "capacity_factor must be a finite number"),
    ("timeout_s", float("inf"), "timeout_s must be a finite number > 0 and at most"),
    ("timeout_s", 1e12, "timeout_s must be a finite number > 0 and at most"),
    ("debug", "false", "debug must be True or False, got 'false'"),
    ("padded_layout", 1, "padded_layout must be True or False"),
    ("padded_zero_fill", None, "padded_zero_fill must be True or False"),
    ("portable", "yes", "portable must be True or False"),
    ("num_experts", 2**31, "num_experts must be a positive int below 2\\*\\*31"),
    ("top_k", True, "top_k must be a positive int"),
    ("max_tokens", 16.0, "max_tokens must be a positive int"),
    ("hidden_size", 2**40, "hidden_size must be a positive int below"),
    ("capacity", -3, "capacity must be a positive int"),
    ("num_sms", np.float32(8), "num_sms must be a positive int"),
    ("dtype", "bf16", "dtype must be one of bfloat16, float16, float32 .*got 'bf16' \\(did you "
                      "mean 'bfloat16'\\?\\)"),
    ("dtype", "f16", "did you mean 'float16'"),  # numpy reads "f16" as float128
    ("dtype", "not-a-dtype", "dtype must be one of bfloat16, float16, float32"),
    ("dtype", jnp.float8_e4m3fn, "dtype must be one of"),
])
def test_config_types_and_ranges_are_checked_at_construction(field, value, match):
    """Issue 12.3: inf, truthy strings, sizes past int32 and unknown dtype names fail here with
    a message naming the field, not later (OverflowError, numpy TypeError, debug silently on)."""
    kwargs = dict(num_experts=4, top_k=1)
    kwargs[field] = value
    with pytest.raises(ValueError, match=match):
        jax_ep.EPConfig(**kwargs)


def test_config_normalises_spellings():
    """Two processes spelling one config differently build equal configs, with the same repr
    (what group creation compares across processes), hash and field types."""
    a = jax_ep.EPConfig(num_experts=np.int64(16), top_k=np.int32(2), max_tokens=np.uint16(8),
                        hidden_size=64, dtype=jnp.bfloat16, capacity_factor=np.float32(1.5),
                        timeout_s=30, debug=np.bool_(False))
    b = jax_ep.EPConfig(num_experts=16, top_k=2, max_tokens=8, hidden_size=64, dtype="bfloat16",
                        capacity_factor=1.5, timeout_s=30.0, debug=False)
    assert a == b and hash(a) == hash(b) and repr(a) == repr(b)
    assert type(a.num_experts) is int and type(a.max_tokens) is int
    assert type(a.timeout_s) is float and type(a.capacity_factor) is float
    assert type(a.debug) is bool and a.dtype == "bfloat16"
    for spelling in (np.float32, jnp.float32, np.dtype("float32"), "f4", "float32"):
        assert jax_ep.EPConfig(num_experts=4, top_k=1, dtype=spelling).dtype == "float32"
    mesh = harness.make_mesh(4)
    assert (coordination.describe(a, mesh, "expert", 0, "auto", None)
            == coordination.describe(b, mesh, "expert", 0, "auto", None))


def test_config_stays_frozen_and_hashable():
    cfg = jax_ep.EPConfig(num_experts=8, top_k=2, dtype=np.float16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3
    assert {cfg: 1}[dataclasses.replace(cfg)] == 1
    assert dataclasses.replace(cfg, top_k=np.int64(3)).top_k == 3
    with pytest.raises(ValueError, match="debug must be True or False"):
        dataclasses.replace(cfg, debug="true")


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


@pytest.mark.parametrize("op", ["dispatch", "combine"])
@pytest.mark.parametrize("num_sms", [0, -3, 2.5, True])
def test_bad_per_call_sm_budget(group, op, num_sms):
    x, idx, w = inputs()

    def per(a, b, c):
        if op == "dispatch":
            return jax_ep.dispatch(group, a, b, c, num_sms=num_sms).x
        d = jax_ep.dispatch(group, a, b, c)
        return jax_ep.combine(group, d.x, d.handle, num_sms=num_sms)

    with pytest.raises(ValueError, match="num_sms must be a positive int"):
        harness.per_rank(group.mesh, per)(x, idx, w)


def _handle_of(group, t=T):
    """A Handle of the right shapes for `group` (combine's checks look at shapes only)."""
    c = group.config.capacity_rows(group.num_ranks, t)
    return jax_ep.Handle(dest_rank=jnp.zeros((t, K), jnp.int32),
                         dest_row=jnp.zeros((t, K), jnp.int32),
                         row_src=jnp.zeros((c,), jnp.int32), num_recv=jnp.zeros((), jnp.int32))


@pytest.mark.parametrize("wrong,match", [
    (None, "needs the handle of the dispatch that produced these rows: pass d.handle"),
    ("dispatched", r"pass d.handle \(the routing\), not the Dispatched d itself"),
    ("weights", r"handle must be Dispatched.handle .* got a jax.Array of shape \[24\]"),
])
def test_combine_with_something_else_than_a_handle(group, wrong, match):
    """Issue 12.3: combine(group, rows, None) and combine(group, rows, d) say what to pass
    (an AttributeError before)."""
    x, idx, w = inputs()

    def per(a, b, c):
        d = jax_ep.dispatch(group, a, b, c)
        handle = {None: None, "dispatched": d, "weights": d.weights}[wrong]
        return jax_ep.combine(group, d.x, handle)

    with pytest.raises(ValueError, match=match):
        harness.per_rank(group.mesh, per)(x, idx, w)


def _closed_group():
    group = jax_ep.EPGroup(harness.make_mesh(N), "expert",
                           jax_ep.EPConfig(num_experts=E, top_k=K, max_tokens=T, hidden_size=H,
                                           dtype="float32"), backend="reference")
    group.close()
    return group


def test_closed_group_is_refused_at_trace_time():
    """Issue 12.3: a closed group fails when traced, on every backend (the reference one ran
    on before; the cuda one failed only at run time)."""
    group = _closed_group()
    x, idx, w = inputs()
    with pytest.raises(ValueError, match="was closed .* create a new EPGroup"):
        run_dispatch(group, x, idx, w)
    fn = harness.per_rank(group.mesh, lambda a: jax_ep.combine(group, a, _handle_of(group)))
    with pytest.raises(ValueError, match=r"jax_ep.combine: EPGroup\(.*\) was closed"):
        fn(jnp.zeros((N, N * T * K, H)))


def test_group_closed_by_its_with_block_is_refused():
    with jax_ep.EPGroup(harness.make_mesh(N), "expert",
                        jax_ep.EPConfig(num_experts=E, top_k=K, max_tokens=T, hidden_size=H,
                                        dtype="float32"),
                        backend="hierarchical", hosts=[0, 0, 1, 1]) as group:
        jax.block_until_ready(run_dispatch(group, *inputs()))
    with pytest.raises(ValueError, match="was closed"):
        run_dispatch(group, *inputs())


def test_check_of_a_closed_group_raises():
    """group.check() says the group was closed instead of passing."""
    with pytest.raises(ValueError, match="EPGroup.check: .* was closed"):
        _closed_group().check()


# --- EPConfig.portable: the cuda kernels' limits on every backend ------------------------------


def _portable_group(backend="reference", **cfg):
    cfg = dict(dict(num_experts=E, top_k=K, max_tokens=T), **cfg)
    kwargs = dict(hosts=[0, 0, 1, 1]) if backend == "hierarchical" else {}
    return jax_ep.EPGroup(harness.make_mesh(N), "expert", jax_ep.EPConfig(**cfg),
                          backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "hierarchical"])
def test_portable_rows_must_be_whole_16_byte_vectors(backend):
    """Issue 12.3: what the cuda backend rejects, every backend rejects (by default)."""
    group = _portable_group(backend, hidden_size=12, dtype="bfloat16")  # 24-byte rows
    x, idx, w = inputs(h=12, x_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 8 for bfloat16 .*portable=False"):
        run_dispatch(group, x, idx, w)
    loose = _portable_group(backend, hidden_size=12, dtype="bfloat16", portable=False)
    assert run_dispatch(loose, x, idx, w).shape == (N, N * T * K, 12)


@pytest.mark.parametrize("backend", ["reference", "hierarchical"])
def test_portable_rows_no_wider_than_the_buffers(backend):
    """float32 rows with EPConfig.dtype="bfloat16" overflow the cuda buffers' rows."""
    group = _portable_group(backend, hidden_size=H)  # dtype bfloat16: 32-byte buffer rows
    with pytest.raises(ValueError, match="wider than the buffers .*widest dtype"):
        run_dispatch(group, *inputs(x_dtype=jnp.float32))
    loose = _portable_group(backend, hidden_size=H, portable=False)
    assert run_dispatch(loose, *inputs(x_dtype=jnp.float32)).dtype == jnp.float32


def test_portable_combine_rows_are_checked_too():
    group = _portable_group(hidden_size=H)  # bfloat16 buffers
    x, idx, w = inputs(x_dtype=jnp.bfloat16)

    def per(a, b, c):
        d = jax_ep.dispatch(group, a, b, c)
        return jax_ep.combine(group, d.x.astype(jnp.float32), d.handle)

    with pytest.raises(ValueError, match="jax_ep.combine: rows of 64 bytes .* wider"):
        harness.per_rank(group.mesh, per)(x, idx, w)


@pytest.mark.parametrize("missing", ["max_tokens", "hidden_size"])
def test_portable_config_needs_buffer_sizes(missing):
    """The sizes the cuda backend needs at group creation, checked for every backend."""
    cfg = dict(num_experts=E, top_k=K, max_tokens=T, hidden_size=H)
    del cfg[missing]
    with pytest.raises(ValueError, match="set EPConfig.max_tokens and EPConfig.hidden_size"):
        validation.check_portable_config(jax_ep.EPConfig(**cfg), N)
    validation.check_portable_config(jax_ep.EPConfig(**cfg, portable=False), N)
    with pytest.raises(ValueError, match=r"portable=False\) opts out"):
        jax_ep.EPGroup(harness.make_mesh(N), "expert", jax_ep.EPConfig(**cfg),
                       backend="reference")
    group = jax_ep.EPGroup(harness.make_mesh(N), "expert",
                           jax_ep.EPConfig(**cfg, portable=False), backend="reference")
    x, idx, w = inputs(x_dtype=jnp.bfloat16)
    assert run_dispatch(group, x, idx, w).shape == (N, N * T * K, H)


def test_portable_slot_count_fits_int32():
    cfg = jax_ep.EPConfig(num_experts=8, top_k=32, max_tokens=2**26, hidden_size=H)
    with pytest.raises(ValueError, match=r"N \* max_tokens \* top_k .* must be < 2\*\*31"):
        validation.check_portable_config(cfg, 4)
