"""The experts' grouped matmuls (jax_ep.nn.expert_gemm.grouped_swiglu): every implementation
against a float64 numpy oracle (per group, forward and hand-derived gradients), on CPU, for
group sizes with empty groups, all rows in one group, and rows past sum(group_sizes) holding
garbage; the capacity layout with and without overflow passes; inside shard_map; and, on a
GPU, the capacity layout against the lax.ragged_dot path (alone and inside the layer)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_ep.nn import expert_gemm as eg

G, H, F, C = 6, 8, 12, 40
# Group sizes [G] over C rows: empty groups, one group holding every row (first, last, middle),
# nothing routed, and sums below C (the rows past the sum hold garbage).
GROUP_SIZES = [
    [5, 0, 9, 3, 0, 11],
    [C, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, C],
    [0, 0, 17, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [7, 7, 7, 7, 6, 6],
    [1, 2, 0, 30, 0, 1],
]
# name -> grouped_swiglu keywords. capacity=3 and 1 force overflow passes (chunks of tile rows,
# several per group and several passes); 64 >= C never overflows.
CPU_IMPLS = {
    "ragged": dict(impl="ragged"),
    "capacity": dict(impl="capacity"),
    "capacity_cap3": dict(impl="capacity", capacity=3),
    "capacity_cap1": dict(impl="capacity", capacity=1),
    "capacity_cap64": dict(impl="capacity", capacity=64),
}


def _params(rng, bias, dtype=np.float32):
    def r(*shape, scale=0.4):
        return (scale * rng.normal(size=shape)).astype(dtype)

    w = dict(w_gate=r(G, H, F), w_up=r(G, H, F), w_down=r(G, F, H))
    if bias:
        w.update(b_gate=r(G, F), b_up=r(G, F), b_down=r(G, H))
    return w


def oracle(rows, group_sizes, params, cot):
    """float64 numpy: y [C, H] and the gradients of sum(y * cot), by group."""
    rows, cot = rows.astype(np.float64), cot.astype(np.float64)
    p = {n: v.astype(np.float64) for n, v in params.items()}
    bias = "b_gate" in p
    y, dx = np.zeros_like(rows), np.zeros_like(rows)
    grads = {n: np.zeros_like(v) for n, v in p.items()}
    start = 0
    for g, n in enumerate(group_sizes):
        x, dy = rows[start:start + n], cot[start:start + n]
        gate = x @ p["w_gate"][g] + (p["b_gate"][g] if bias else 0)
        up = x @ p["w_up"][g] + (p["b_up"][g] if bias else 0)
        sig = 1 / (1 + np.exp(-gate))
        act = gate * sig * up
        y[start:start + n] = act @ p["w_down"][g] + (p["b_down"][g] if bias else 0)
        d_act = dy @ p["w_down"][g].T
        d_up = d_act * gate * sig
        d_gate = d_act * up * sig * (1 + gate * (1 - sig))
        grads["w_down"][g] = act.T @ dy
        grads["w_gate"][g] = x.T @ d_gate
        grads["w_up"][g] = x.T @ d_up
        if bias:
            grads["b_gate"][g], grads["b_up"][g] = d_gate.sum(0), d_up.sum(0)
            grads["b_down"][g] = dy.sum(0)
        dx[start:start + n] = d_gate @ p["w_gate"][g].T + d_up @ p["w_up"][g].T
        start += n
    return y, dx, grads


def value_and_grads(kwargs, activation=jax.nn.silu):
    """jit(rows, group_sizes, params, cot -> (y, d rows, d params)) for grouped_swiglu(**kwargs):
    group sizes are traced, so one compile serves every case."""

    def loss(rows, group_sizes, params, cot):
        y = eg.grouped_swiglu(rows, group_sizes, **params, activation=activation, **kwargs)
        return jnp.sum(y.astype(jnp.float32) * cot), y

    grad = jax.value_and_grad(loss, argnums=(0, 2), has_aux=True)
    return jax.jit(lambda *a: (lambda out: (out[0][1], *out[1]))(grad(*a)))


def garbage_past(rows, total, value):
    rows = rows.copy()
    rows[total:] = value
    return rows


def check_against_oracle(kwargs, bias, garbage, tol=2e-5):
    rng = np.random.default_rng(0)
    params = _params(rng, bias)
    run = value_and_grads(kwargs)
    for sizes in GROUP_SIZES:
        total = sum(sizes)
        rows = rng.normal(size=(C, H)).astype(np.float32)
        cot = rng.normal(size=(C, H)).astype(np.float32)
        y, d_rows, d_params = run(garbage_past(rows, total, garbage),
                                  jnp.asarray(sizes, jnp.int32), params, cot)
        y_ref, dx_ref, g_ref = oracle(rows, sizes, params, cot)
        msg = f"{kwargs} group sizes {sizes}"
        np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol, err_msg=msg)
        np.testing.assert_array_equal(np.asarray(y)[total:], 0, err_msg=msg)
        np.testing.assert_allclose(d_rows[:total], dx_ref[:total], rtol=tol, atol=tol,
                                   err_msg=msg)
        assert np.all(np.asarray(d_rows)[total:] == 0), msg
        assert set(d_params) == set(g_ref)
        for name, ref in g_ref.items():
            np.testing.assert_allclose(d_params[name], ref, rtol=tol, atol=tol,
                                       err_msg=f"{msg} d{name}")


@pytest.mark.parametrize("name", list(CPU_IMPLS))
def test_matches_numpy_oracle(name):
    """Forward and gradients against the oracle; the new implementations never read the rows
    past sum(group_sizes) (NaN there changes nothing), lax.ragged_dot gets finite garbage."""
    check_against_oracle(CPU_IMPLS[name], bias=False,
                         garbage=1e3 if name == "ragged" else np.nan)


@pytest.mark.parametrize("name", ["ragged", "capacity", "capacity_cap3"])
def test_with_biases_matches_numpy_oracle(name):
    check_against_oracle(CPU_IMPLS[name], bias=True, garbage=1e3 if name == "ragged" else np.nan)


@pytest.mark.parametrize("name", ["capacity", "capacity_cap1"])
def test_other_activation_matches_ragged(name):
    """A non-silu gate (exact GeLU, with biases): the capacity layout's custom VJP against
    lax.ragged_dot's autodiff."""
    rng = np.random.default_rng(3)
    params = _params(rng, bias=True)
    gelu = functools.partial(jax.nn.gelu, approximate=False)
    rows = rng.normal(size=(C, H)).astype(np.float32)
    cot = rng.normal(size=(C, H)).astype(np.float32)
    sizes = jnp.asarray(GROUP_SIZES[0], jnp.int32)
    got = value_and_grads(CPU_IMPLS[name], gelu)(rows, sizes, params, cot)
    ref = value_and_grads(dict(impl="ragged"), gelu)(rows, sizes, params, cot)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_bfloat16_capacity_is_close_to_oracle():
    rng = np.random.default_rng(1)
    params = _params(rng, bias=False)
    sizes = GROUP_SIZES[0]
    rows = rng.normal(size=(C, H)).astype(np.float32)
    cot = rng.normal(size=(C, H)).astype(np.float32)
    bf16 = {n: jnp.asarray(v, jnp.bfloat16) for n, v in params.items()}
    y, d_rows, d_params = value_and_grads(dict(impl="capacity", capacity=4))(
        jnp.asarray(rows, jnp.bfloat16), jnp.asarray(sizes, jnp.int32), bf16, cot)
    assert y.dtype == d_rows.dtype == d_params["w_gate"].dtype == jnp.bfloat16
    y_ref, dx_ref, g_ref = oracle(rows, sizes, params, cot)

    def rel(a, b):
        return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)

    assert rel(y, y_ref) < 2e-2 and rel(d_rows, dx_ref) < 2e-2
    for name, ref in g_ref.items():
        assert rel(d_params[name], ref) < 2e-2, name


def test_inside_shard_map_per_rank_group_sizes():
    """Each of 4 ranks runs its own group sizes through the capacity layout (overflow passes
    with different trip counts per rank), under jit(grad(shard_map(...)))."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("expert",))
    rng = np.random.default_rng(2)
    params = _params(rng, bias=False)
    sizes = np.asarray(GROUP_SIZES[:4], np.int32)  # [4 ranks, G]
    rows = rng.normal(size=(4, C, H)).astype(np.float32)
    cot = rng.normal(size=(4, C, H)).astype(np.float32)

    def body(rows, sizes, params, cot):
        y = eg.grouped_swiglu(rows[0], sizes[0], **params, impl="capacity", capacity=5)
        return jnp.sum(y * cot[0])[None]

    per_rank = jax.shard_map(body, mesh=mesh, in_specs=(P("expert"), P("expert"), P(), P("expert")),
                             out_specs=P("expert"))
    d_rows, d_params = jax.jit(jax.grad(lambda r, s, p, c: jnp.sum(per_rank(r, s, p, c)),
                                        argnums=(0, 2)))(rows, sizes, params, cot)
    d_params_ref = {n: 0 for n in params}
    for r in range(4):
        _, dx_ref, g_ref = oracle(rows[r], list(sizes[r]), params, cot[r])
        np.testing.assert_allclose(d_rows[r], dx_ref, rtol=2e-5, atol=2e-5)
        d_params_ref = {n: d_params_ref[n] + g_ref[n] for n in g_ref}
    for name, ref in d_params_ref.items():
        np.testing.assert_allclose(d_params[name], ref, rtol=2e-5, atol=2e-5, err_msg=name)


def test_capacity_plan():
    # DeepSeek-V3 on one GPU: 8192 tokens * top-8 over 256 experts, 256 rows per expert.
    plan = eg.capacity_plan(65536, 256, expected_rows=65536)
    assert plan.capacity == 320 and plan.tile == 128 and plan.chunks == 8
    # With N = 8 ranks the dropless buffer is 8x the expected rows: sized from the expected.
    assert eg.capacity_plan(8 * 65536, 256, expected_rows=65536).capacity == 320
    assert eg.capacity_plan(16384, 8).capacity == 2240  # Mixtral: 2048 rows per expert
    assert eg.capacity_plan(100, 10).capacity == 24  # mean 10 + 4 * sqrt(10), rounded to 8
    assert eg.capacity_plan(10, 4, capacity=100).capacity == 10  # never more than C
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        eg.capacity_plan(10, 4, capacity=0)


def test_overflow_pass_count():
    plan = eg.CapacityPlan(capacity=4, tile=2, chunks=3)
    sizes = jnp.asarray([4, 9, 0, 6, 5], jnp.int32)  # 0 + 3 + 0 + 1 + 1 chunks of 2 rows
    assert int(eg._overflow_passes(sizes, plan)) == 2
    assert int(eg._overflow_passes(jnp.asarray([4, 4, 0, 1, 2], jnp.int32), plan)) == 0


def test_auto_resolution():
    assert eg.IMPLS == ("auto", "ragged", "capacity")
    assert eg.resolve_impl("auto", jnp.bfloat16, platform="cpu") == "ragged"
    assert eg.resolve_impl("capacity", platform="cpu") == "capacity"
    assert eg.resolve_impl("ragged", platform="gpu") == "ragged"
    for dtype, hidden, ffn in ((jnp.bfloat16, 256, 512), (jnp.float32, 200, 512)):
        assert eg.resolve_impl("auto", dtype, hidden, ffn, platform="gpu") == "capacity"
    with pytest.raises(ValueError, match="impl must be one of"):
        eg.resolve_impl("cublas")


def test_argument_errors():
    rows, sizes = jnp.zeros((C, H)), jnp.zeros((G,), jnp.int32)
    w = _params(np.random.default_rng(0), bias=True)
    with pytest.raises(ValueError, match="shapes disagree"):
        eg.grouped_swiglu(rows[:, :4], sizes, w["w_gate"], w["w_up"], w["w_down"])
    with pytest.raises(ValueError, match="all three biases"):
        eg.grouped_swiglu(rows, sizes, w["w_gate"], w["w_up"], w["w_down"], b_gate=w["b_gate"])
    with pytest.raises(ValueError, match="impl must be one of"):
        eg.grouped_swiglu(rows, sizes, w["w_gate"], w["w_up"], w["w_down"], impl="cublas")


def test_empty_rows():
    w = _params(np.random.default_rng(0), bias=False)
    for impl in ("capacity", "ragged"):
        y = eg.grouped_swiglu(jnp.zeros((0, H)), jnp.zeros((G,), jnp.int32), **w, impl=impl)
        assert y.shape == (0, H)


# --- on a GPU --------------------------------------------------------------------------------

# name -> grouped_swiglu keywords, each checked against the lax.ragged_dot path.
GPU_IMPLS = {
    "capacity": dict(impl="capacity"),
}


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_IMPLS))
def test_impls_agree_with_ragged_dot_on_gpu(name):
    """bf16 at sizes the GPU kernels tile (H, F multiples of 128), an empty group, a group
    larger than the capacity (overflow passes), rows past the sum holding garbage: forward and
    gradients within bf16 rounding of the float32 lax.ragged_dot result, and as close as the
    bf16 lax.ragged_dot result is."""
    kwargs = GPU_IMPLS[name]
    g, h, f, c = 8, 256, 384, 2048
    rng = np.random.default_rng(0)
    sizes = np.asarray([300, 0, 410, 97, 256, 1, 600, 200], np.int32)  # sum 1864 < 2048
    rows = rng.normal(size=(c, h)).astype(np.float32)
    rows[sizes.sum():] = 1e4
    cot = rng.normal(size=(c, h)).astype(np.float32)
    params = {n: (rng.normal(size=s) / np.sqrt(s[1])).astype(np.float32)
              for n, s in (("w_gate", (g, h, f)), ("w_up", (g, h, f)), ("w_down", (g, f, h)))}

    def run(kwargs, dtype):
        as_dtype = functools.partial(jnp.asarray, dtype=dtype)
        return value_and_grads(kwargs)(as_dtype(rows), jnp.asarray(sizes),
                                       jax.tree.map(as_dtype, params), cot)

    with jax.default_matmul_precision("highest"):
        ref = run(dict(impl="ragged"), jnp.float32)
    ragged_bf16 = run(dict(impl="ragged"), jnp.bfloat16)
    got = run(dict(kwargs, expected_rows=int(sizes.sum())), jnp.bfloat16)
    total = int(sizes.sum())
    assert np.all(np.asarray(got[0], np.float32)[total:] == 0)
    for name, a, b, r in zip(["y", "d rows", "d w_down", "d w_gate", "d w_up"],
                             jax.tree.leaves(got), jax.tree.leaves(ref),
                             jax.tree.leaves(ragged_bf16)):
        a, b, r = (np.asarray(v, np.float32)[:total] if name in ("y", "d rows")
                   else np.asarray(v, np.float32) for v in (a, b, r))
        assert np.all(np.isfinite(a)), name
        assert _relative(a, b) < max(2e-2, 2 * _relative(r, b)), (name, _relative(a, b),
                                                                   _relative(r, b))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_IMPLS))
def test_layer_step_on_gpu_matches_ragged_path(name):
    """The EP layer's per-rank body on one GPU (cuda dispatch / combine) with the experts by
    `name`, against the same body with lax.ragged_dot: loss and every gradient, bf16."""
    kwargs = GPU_IMPLS[name]
    from jax_ep import combine, dispatch
    from jax_ep.nn import moe_math

    mesh = Mesh(np.array(jax.devices("gpu")[:1]), ("expert",))
    spec = moe_math.MoESpec(hidden=256, ffn=256, num_experts=8, top_k=2, mesh=mesh,
                            dtype="bfloat16", backend="cuda")
    params = moe_math.init_params(jax.random.key(0), spec, jnp.float32)
    x = jax.random.normal(jax.random.key(1), (512, 256), jnp.float32)

    def step(experts: dict):
        def body(x, params):
            x = x.astype(jnp.bfloat16)
            group = moe_math.group_for(spec, x.shape[0])
            routing = moe_math.route(x, params["router"], spec)
            d = dispatch(group, x, routing.experts, routing.weights)
            w = [params[n].astype(x.dtype) for n in moe_math.EXPERT_PARAMS]
            rows = eg.grouped_swiglu(d.x, d.group_sizes, *w, **experts,
                                     expected_rows=x.shape[0] * spec.top_k)
            y = combine(group, rows, d.handle, weights=d.weights)
            return jnp.sum(jnp.square(y.astype(jnp.float32)))[None]

        specs = {n: P("expert") if n in moe_math.EXPERT_PARAMS else P() for n in params}
        f = jax.shard_map(body, mesh=mesh, in_specs=(P("expert"), specs), out_specs=P("expert"))
        return jax.jit(jax.value_and_grad(lambda x, p: jnp.sum(f(x, p)), argnums=(0, 1)))

    got = step(kwargs)(x, params)
    ref = step(dict(impl="ragged"))(x, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert np.all(np.isfinite(np.asarray(a, np.float32)))
        assert _relative(a, b) < 3e-2, (_relative(a, b), np.shape(a))
