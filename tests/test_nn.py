"""The MoE layers (Flax NNX and Equinox) against a dense MoE written here in plain jnp: every
token through every expert, weighted by its routing, no communication. Outputs, the aux loss
and gradients w.r.t. the input and every parameter must agree to float32 rounding."""

import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_ep.nn import moe_math

AUX_COEF = 0.3  # weight of the aux loss in the test loss, so its gradient is checked too
H, F = 16, 24


# --- the oracle: dense MoE, independent of jax_ep -------------------------------------------------

def dense_moe(params, x, *, k, router, renormalize):
    """x [T, H] -> (y [T, H], aux []) by brute force over all experts."""
    logits = x @ params["router"]
    gates = jax.nn.softmax(logits, -1) if router == "softmax" else jax.nn.sigmoid(logits)
    probs = gates / jnp.sum(gates, -1, keepdims=True)
    top_w, top_e = jax.lax.top_k(gates, k)
    if renormalize:
        top_w = top_w / jnp.sum(top_w, -1, keepdims=True)
    num_experts = logits.shape[-1]
    chosen = top_e[:, :, None] == jnp.arange(num_experts)  # [T, k, E]
    weight = jnp.sum(jnp.where(chosen, top_w[:, :, None], 0.0), axis=1)  # [T, E]
    y = jnp.zeros_like(x)
    for e in range(num_experts):
        h = jax.nn.silu(x @ params["w_gate"][e]) * (x @ params["w_up"][e])
        y = y + weight[:, e:e + 1] * (h @ params["w_down"][e])
    if "shared_gate" in params:
        h = jax.nn.silu(x @ params["shared_gate"]) * (x @ params["shared_up"])
        y = y + h @ params["shared_down"]
    frac_routed = jnp.mean(jnp.sum(chosen, axis=1), axis=0) / k  # [E], sums to 1
    aux = num_experts * jnp.sum(jax.lax.stop_gradient(frac_routed) * jnp.mean(probs, 0))
    return y, aux


def oracle_loss_and_grads(params, x, cot, **routing):
    def loss(params, x):
        y, aux = dense_moe(params, x.reshape(-1, H), **routing)
        return jnp.sum(y * cot.reshape(-1, H)) + AUX_COEF * aux, (y.reshape(x.shape), aux)

    (_, (y, aux)), (g_params, g_x) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, aux, g_params, g_x


# --- the layers under test, as (y, aux, grads by parameter name, grad of x) ----------------------

def flax_layer(**kwargs):
    from flax import nnx

    from jax_ep.nn.flax import MoE

    layer = MoE(rngs=nnx.Rngs(0), **kwargs)
    graphdef, state = nnx.split(layer)

    def run(x, cot):
        def loss(state, x):
            y, aux = nnx.merge(graphdef, state)(x)
            return jnp.sum(y * cot) + AUX_COEF * aux, (y, aux)

        (_, (y, aux)), (g_state, g_x) = jax.jit(
            jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)
        return y, aux, {name: g_state[name][...] for name in layer.params()}, g_x

    return layer.params(), run


def equinox_layer(**kwargs):
    from jax_ep.nn.equinox import MoE

    layer = MoE(key=jax.random.key(0), **kwargs)

    def run(x, cot):
        def loss(layer, x):
            y, aux = layer(x)
            return jnp.sum(y * cot) + AUX_COEF * aux, (y, aux)

        (_, (y, aux)), (g_layer, g_x) = jax.jit(
            jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(layer, x)
        return y, aux, g_layer.params(), g_x

    return layer.params(), run


LAYERS = {"flax": flax_layer, "equinox": equinox_layer}


def mesh_of(shape, names):
    n = int(np.prod(shape))
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def check_against_oracle(framework, *, x_shape, mesh, num_experts, top_k, router="softmax",
                         renormalize=True, shared_ffn=0, seed=1, **layer_kwargs):
    params, run = LAYERS[framework](hidden=H, ffn=F, num_experts=num_experts, top_k=top_k,
                                    mesh=mesh, router=router, renormalize=renormalize,
                                    shared_ffn=shared_ffn, **layer_kwargs)
    assert set(params) == ({"router", "w_gate", "w_up", "w_down"} |
                           ({"shared_gate", "shared_up", "shared_down"} if shared_ffn else set()))
    kx, kc = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, x_shape + (H,))
    cot = jax.random.normal(kc, x_shape + (H,))
    y, aux, g_params, g_x = run(x, cot)
    params = {n: np.asarray(p) for n, p in params.items()}
    y_ref, aux_ref, g_ref, g_x_ref = oracle_loss_and_grads(
        params, x, cot, k=top_k, router=router, renormalize=renormalize)
    tol = dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(y, y_ref, **tol)
    np.testing.assert_allclose(aux, aux_ref, **tol)
    np.testing.assert_allclose(g_x, g_x_ref, **tol)
    assert set(g_params) == set(g_ref)
    for name in g_ref:
        np.testing.assert_allclose(g_params[name], g_ref[name], **tol, err_msg=name)
    # The routing really spread tokens over several experts (else the check proves little).
    assert float(jnp.max(jnp.abs(g_ref["w_down"]), axis=(1, 2)).min()) > 0 or top_k == 1


CASES = [
    # framework, mesh shape, axes, E, k, router, renormalize, shared expert width
    ("flax", (8,), ("expert",), 8, 2, "softmax", True, 0),
    ("equinox", (8,), ("expert",), 16, 4, "sigmoid", True, 8),
    ("flax", (2,), ("expert",), 4, 1, "softmax", False, 8),
    ("equinox", (4,), ("expert",), 8, 3, "softmax", False, 0),
    ("flax", (2, 4), ("data", "expert"), 8, 2, "sigmoid", False, 8),
    ("equinox", (4, 2), ("data", "expert"), 4, 2, "softmax", True, 0),
]


@pytest.mark.parametrize("framework,shape,axes,num_experts,top_k,router,renorm,shared", CASES)
def test_ep_layer_matches_dense_moe(framework, shape, axes, num_experts, top_k, router, renorm,
                                    shared):
    check_against_oracle(framework, x_shape=(4, 16), mesh=mesh_of(shape, axes),
                         num_experts=num_experts, top_k=top_k, router=router,
                         renormalize=renorm, shared_ffn=shared)


def test_dense_fallback_without_mesh_matches_dense_moe():
    check_against_oracle("equinox", x_shape=(24,), mesh=None, num_experts=6, top_k=2,
                         router="sigmoid", shared_ffn=8)


def test_bfloat16_layer_with_max_tokens_and_capacity_is_close_to_dense_moe():
    """bf16 compute (dispatch moves bf16 rows); max_tokens above the call's T and a capacity
    factor that still fits every row here (4 ranks, capacity 4 * T * k = dropless)."""
    from jax_ep.nn.equinox import MoE

    layer = MoE(H, F, 8, 2, mesh=mesh_of((4,), ("expert",)), shared_ffn=8, dtype=jnp.bfloat16,
                max_tokens=32, capacity_factor=4.0, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(2), (64, H))
    y, aux = jax.jit(lambda m, x: m(x))(layer, x)
    assert y.dtype == jnp.bfloat16
    y_ref, aux_ref = dense_moe({n: np.asarray(p) for n, p in layer.params().items()}, x, k=2,
                               router="softmax", renormalize=True)
    scale = float(jnp.max(jnp.abs(y_ref)))
    np.testing.assert_allclose(y.astype(jnp.float32), y_ref, rtol=0, atol=0.03 * scale)
    np.testing.assert_allclose(aux, aux_ref, rtol=1e-3)


@pytest.mark.parametrize("weight_spec", [P(), P("expert")])
def test_layer_called_inside_users_shard_map(weight_spec):
    """Inside a shard_map over the mesh, the layer runs per rank on local tokens, with the
    expert weights whole (sliced to this rank's experts) or already sharded."""
    import equinox as eqx

    from jax_ep.nn.equinox import MoE

    mesh = mesh_of((2, 4), ("data", "expert"))
    layer = MoE(H, F, 8, 2, mesh=mesh, shared_ffn=4, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(3), (64, H))
    tokens = P(("data", "expert"))
    experts = lambda m: (m.w_gate, m.w_up, m.w_down)  # noqa: E731
    specs = jax.tree.map(lambda _: P(), layer)
    specs = eqx.tree_at(experts, specs, replace=(weight_spec,) * 3)
    f = jax.jit(jax.shard_map(lambda m, x: m(x), mesh=mesh, in_specs=(specs, tokens),
                              out_specs=(tokens, P())))
    y, aux = f(layer, x)
    y_ref, aux_ref = dense_moe({n: np.asarray(p) for n, p in layer.params().items()}, x,
                               k=2, router="softmax", renormalize=True)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(aux, aux_ref, rtol=2e-5, atol=2e-5)


def test_aux_loss_is_one_for_a_uniform_router():
    """Zero router weights: uniform scores, and (top-k of ties) the aux loss is exactly 1."""
    spec = moe_math.MoESpec(hidden=H, ffn=F, num_experts=4, top_k=2)
    params = moe_math.init_params(jax.random.key(0), spec)
    params["router"] = jnp.zeros_like(params["router"])
    # Ties make top-k pick experts 0 and 1 for every token: f = (1/2, 1/2, 0, 0), p = 1/4 each.
    _, aux = jax.jit(moe_math.moe_forward, static_argnums=0)(spec, params, jnp.ones((8, H)))
    np.testing.assert_allclose(aux, 4 * (0.5 * 0.25 + 0.5 * 0.25), rtol=1e-6)


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("module,missing", [("jax_ep.nn.flax", "flax"),
                                            ("jax_ep.nn.equinox", "equinox")])
def test_missing_extra_names_the_install_command(monkeypatch, module, missing):
    import jax_ep.nn

    for name in [m for m in sys.modules if m == missing or m.startswith(missing + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import <name>` fail
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setattr(jax_ep.nn, "moe_math", moe_math)  # restored after the re-import below
    with pytest.raises(ImportError, match=r"pip install 'jax_ep\[nn\]'"):
        importlib.import_module(module)
    # The framework-free parts import without either framework.
    monkeypatch.delitem(sys.modules, "jax_ep.nn.moe_math", raising=False)
    importlib.import_module("jax_ep.nn.moe_math")


def test_bad_configurations_say_what_to_change():
    mesh = mesh_of((4,), ("expert",))
    with pytest.raises(ValueError, match="not divisible by the 4 devices"):
        moe_math.MoESpec(hidden=H, ffn=F, num_experts=6, top_k=2, mesh=mesh)
    with pytest.raises(ValueError, match="router must be one of"):
        moe_math.MoESpec(hidden=H, ffn=F, num_experts=4, top_k=2, router="relu")
    with pytest.raises(ValueError, match="top_k=5 exceeds"):
        moe_math.MoESpec(hidden=H, ffn=F, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="include the expert axis"):
        moe_math.MoESpec(hidden=H, ffn=F, num_experts=4, top_k=2,
                         mesh=mesh_of((2, 2), ("data", "expert")), token_axes=("data",))
    spec = moe_math.MoESpec(hidden=H, ffn=F, num_experts=4, top_k=2, mesh=mesh)
    params = moe_math.init_params(jax.random.key(0), spec)
    with pytest.raises(ValueError, match="do not split evenly"):
        moe_math.moe_forward(spec, params, jnp.ones((6, H)))
    with pytest.raises(ValueError, match="width 8"):
        moe_math.moe_forward(spec, params, jnp.ones((8, 8)))


@pytest.mark.gpu
@pytest.mark.parametrize("framework", ["flax", "equinox"])
def test_layer_on_the_cuda_backend_matches_dense_moe(framework):
    """The layers on a GPU with backend='cuda' (dispatch, expert matmuls, combine and their
    gradients through the custom calls), against the dense MoE at full float32 precision."""
    gpu = jax.devices("gpu")[:1]
    with jax.default_matmul_precision("highest"):
        check_against_oracle(framework, x_shape=(4, 16), mesh=Mesh(np.array(gpu), ("expert",)),
                             num_experts=4, top_k=2, shared_ffn=8, backend="cuda")
