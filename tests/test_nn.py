"""The MoE layers (Flax NNX and Equinox) against a dense MoE written here in plain jnp: every
token through every expert, weighted by its routing, no communication. Outputs, the aux dict
(aux loss, z-loss, expert load) and gradients w.r.t. the input and every parameter must agree
to float32 rounding, with the default layer and with the routing / expert options."""

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
Z_COEF = 0.05  # and of the router z-loss
H, F = 16, 24


# --- the oracle: dense MoE, independent of jax_ep -------------------------------------------------

def _gelu_exact(v):
    return 0.5 * v * (1.0 + jax.scipy.special.erf(v / np.sqrt(2.0)))


ORACLE_ACTIVATIONS = {"silu": lambda v: v / (1.0 + jnp.exp(-v)), "gelu": _gelu_exact,
                      "gelu_tanh": lambda v: jax.nn.gelu(v, approximate=True),
                      "relu": lambda v: jnp.maximum(v, 0.0),
                      "sigmoid": lambda v: 1.0 / (1.0 + jnp.exp(-v))}


def dense_moe_aux(params, x, *, k, router, renormalize, activation="silu", num_groups=1,
                  topk_groups=None, routed_scaling_factor=1.0):
    """x [T, H] -> (y [T, H], {aux_loss, z_loss, expert_load}) by brute force over all
    experts. Optional parameters (router_bias, correction_bias, b_*, shared_b_*) are used when
    present in params."""
    act = ORACLE_ACTIVATIONS[activation]
    logits = x @ params["router"] + params.get("router_bias", 0.0)
    gates = jax.nn.softmax(logits, -1) if router == "softmax" else jax.nn.sigmoid(logits)
    probs = gates / jnp.sum(gates, -1, keepdims=True)
    num_tokens, num_experts = logits.shape
    choice = jax.lax.stop_gradient(gates + params.get("correction_bias", 0.0))
    if topk_groups is not None:  # keep the groups with the best sum of their two best scores
        per = num_experts // num_groups
        grouped = jnp.sort(choice.reshape(num_tokens, num_groups, per), axis=-1)
        best = jnp.sum(grouped[..., -min(2, per):], axis=-1)  # [T, G]
        kept = jnp.argsort(-best, axis=-1, stable=True)[:, :topk_groups]
        allowed = jnp.any(kept[:, :, None] == jnp.arange(num_groups), axis=1)
        choice = jnp.where(jnp.repeat(allowed, per, axis=1), choice, -jnp.inf)
    top_e = jnp.argsort(-choice, axis=-1, stable=True)[:, :k]
    top_w = jnp.take_along_axis(gates, top_e, axis=-1)
    if renormalize:
        top_w = top_w / jnp.sum(top_w, -1, keepdims=True)
    top_w = top_w * routed_scaling_factor
    chosen = top_e[:, :, None] == jnp.arange(num_experts)  # [T, k, E]
    weight = jnp.sum(jnp.where(chosen, top_w[:, :, None], 0.0), axis=1)  # [T, E]

    def mlp(gate, up, down, b_gate=0.0, b_up=0.0, b_down=0.0):
        return (act(x @ gate + b_gate) * (x @ up + b_up)) @ down + b_down

    y = jnp.zeros_like(x)
    for e in range(num_experts):
        biases = ([params[n][e] for n in ("b_gate", "b_up", "b_down")]
                  if "b_gate" in params else [])
        y = y + weight[:, e:e + 1] * mlp(params["w_gate"][e], params["w_up"][e],
                                         params["w_down"][e], *biases)
    if "shared_gate" in params:
        biases = ([params[n] for n in ("shared_b_gate", "shared_b_up", "shared_b_down")]
                  if "shared_b_gate" in params else [])
        y = y + mlp(params["shared_gate"], params["shared_up"], params["shared_down"], *biases)
    frac_routed = jnp.mean(jnp.sum(chosen, axis=1), axis=0) / k  # [E], sums to 1
    aux = num_experts * jnp.sum(jax.lax.stop_gradient(frac_routed) * jnp.mean(probs, 0))
    z_loss = jnp.mean(jnp.log(jnp.sum(jnp.exp(logits), axis=-1)) ** 2)
    load = jnp.sum(chosen, axis=(0, 1)).astype(jnp.int32)
    return y, {"aux_loss": aux, "z_loss": z_loss, "expert_load": load}


def dense_moe(params, x, **routing):
    """x [T, H] -> (y [T, H], aux_loss [])."""
    y, aux = dense_moe_aux(params, x, **routing)
    return y, aux["aux_loss"]


def oracle_loss_and_grads(params, x, cot, **routing):
    def loss(params, x):
        y, aux = dense_moe_aux(params, x.reshape(-1, H), **routing)
        total = jnp.sum(y * cot.reshape(-1, H)) + AUX_COEF * aux["aux_loss"]
        return total + Z_COEF * aux["z_loss"], (y.reshape(x.shape), aux)

    (_, (y, aux)), (g_params, g_x) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, aux, g_params, g_x


# --- the layers under test, as (y, aux dict, grads by parameter name, grad of x) -----------------

def _layer_loss(y, aux, cot):
    return jnp.sum(y * cot) + AUX_COEF * aux["aux_loss"] + Z_COEF * aux["z_loss"]


def flax_layer(correction_bias_value=None, **kwargs):
    from flax import nnx

    from jax_ep.nn.flax import MoE

    layer = MoE(rngs=nnx.Rngs(0), **kwargs)
    if correction_bias_value is not None:
        layer.correction_bias[...] = correction_bias_value
    graphdef, state = nnx.split(layer)

    def run(x, cot):
        def loss(state, x):
            y, aux = nnx.merge(graphdef, state)(x, return_aux=True)
            return _layer_loss(y, aux, cot), (y, aux)

        (_, (y, aux)), (g_state, g_x) = jax.jit(
            jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)
        return y, aux, {name: g_state[name][...] for name in layer.params()}, g_x

    return layer.params(), run


def equinox_layer(correction_bias_value=None, **kwargs):
    import equinox as eqx

    from jax_ep.nn.equinox import MoE

    layer = MoE(key=jax.random.key(0), **kwargs)
    if correction_bias_value is not None:
        layer = eqx.tree_at(lambda m: m.correction_bias, layer, correction_bias_value)

    def run(x, cot):
        def loss(layer, x):
            y, aux = layer(x, return_aux=True)
            return _layer_loss(y, aux, cot), (y, aux)

        (_, (y, aux)), (g_layer, g_x) = jax.jit(
            jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(layer, x)
        return y, aux, g_layer.params(), g_x

    return layer.params(), run


LAYERS = {"flax": flax_layer, "equinox": equinox_layer}
# Options that change the routing or the experts: passed to the layer and to the oracle.
ORACLE_OPTIONS = ("activation", "num_groups", "topk_groups", "routed_scaling_factor")


def mesh_of(shape, names):
    n = int(np.prod(shape))
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def check_against_oracle(framework, *, x_shape, mesh, num_experts, top_k, router="softmax",
                         renormalize=True, shared_ffn=0, seed=1, correction_bias_value=None,
                         **layer_kwargs):
    """The layer's y, aux dict (aux_loss, z_loss, expert_load; nothing dropped or invalid) and
    the gradients of a loss using y, aux_loss and z_loss, against the dense oracle."""
    params, run = LAYERS[framework](hidden=H, ffn=F, num_experts=num_experts, top_k=top_k,
                                    mesh=mesh, router=router, renormalize=renormalize,
                                    shared_ffn=shared_ffn,
                                    correction_bias_value=correction_bias_value, **layer_kwargs)
    expected = {"router", "w_gate", "w_up", "w_down"}
    if shared_ffn:
        expected |= {"shared_gate", "shared_up", "shared_down"}
    if layer_kwargs.get("use_bias"):
        expected |= {"b_gate", "b_up", "b_down"}
        expected |= {"shared_b_gate", "shared_b_up", "shared_b_down"} if shared_ffn else set()
    expected |= {n for n in ("router_bias", "correction_bias") if layer_kwargs.get(n)}
    assert set(params) == expected
    kx, kc = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, x_shape + (H,))
    cot = jax.random.normal(kc, x_shape + (H,))
    y, aux, g_params, g_x = run(x, cot)
    params = {n: np.asarray(p) for n, p in params.items()}
    options = {n: layer_kwargs[n] for n in ORACLE_OPTIONS if n in layer_kwargs}
    y_ref, aux_ref, g_ref, g_x_ref = oracle_loss_and_grads(
        params, x, cot, k=top_k, router=router, renormalize=renormalize, **options)
    tol = dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(y, y_ref, **tol)
    for name in ("aux_loss", "z_loss"):
        np.testing.assert_allclose(aux[name], aux_ref[name], **tol, err_msg=name)
    np.testing.assert_array_equal(aux["expert_load"], aux_ref["expert_load"])
    assert int(aux["num_dropped"]) == 0 and int(aux["num_invalid"]) == 0
    np.testing.assert_allclose(g_x, g_x_ref, **tol)
    assert set(g_params) == set(g_ref)
    for name in g_ref:
        np.testing.assert_allclose(g_params[name], g_ref[name], **tol, err_msg=name)
    # The routing really spread tokens over several experts (else the check proves little).
    used = jnp.max(jnp.abs(g_ref["w_down"]), axis=(1, 2)) > 0
    if "topk_groups" in layer_kwargs or correction_bias_value is not None:
        assert int(jnp.sum(used)) > num_experts // 2
    else:
        assert bool(jnp.all(used)) or top_k == 1


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


BIAS_INIT = jax.nn.initializers.normal(0.5)  # non-zero biases, so they are really checked
# DeepSeek-V3 routing: sigmoid scores, aux-loss-free correction bias (random here), group-limited
# top-k, routed scaling; with GeGLU experts and biases (the oracle's random correction bias is
# the layer's, set after construction).
DEEPSEEK = dict(router="sigmoid", renormalize=True, correction_bias=True, num_groups=4,
                topk_groups=2, routed_scaling_factor=2.5, activation="gelu", use_bias=True,
                bias_init=BIAS_INIT)
OPTION_CASES = [
    # framework, mesh shape, axes, E, k, shared expert width, options
    ("flax", (2, 4), ("data", "expert"), 8, 2, 8, DEEPSEEK),
    ("equinox", (4,), ("expert",), 8, 3, 0,
     dict(router="softmax", renormalize=False, router_bias=True, use_bias=True,
          activation="relu", num_groups=2, topk_groups=1, bias_init=BIAS_INIT)),
]


@pytest.mark.parametrize("framework,shape,axes,num_experts,top_k,shared,options", OPTION_CASES,
                         ids=["flax-deepseek-v3", "equinox-biases-relu-groups"])
def test_ep_layer_with_options_matches_dense_moe(framework, shape, axes, num_experts, top_k,
                                                 shared, options):
    bias = (0.2 * jax.random.normal(jax.random.key(7), (num_experts,))
            if options.get("correction_bias") else None)
    check_against_oracle(framework, x_shape=(4, 16), mesh=mesh_of(shape, axes),
                         num_experts=num_experts, top_k=top_k, shared_ffn=shared,
                         correction_bias_value=bias, **options)


def test_dense_fallback_without_mesh_matches_dense_moe():
    """mesh=None (moe_math.dense_body), with the DeepSeek-V3 options on but gelu_tanh."""
    check_against_oracle("equinox", x_shape=(24,), mesh=None, num_experts=8, top_k=2,
                         shared_ffn=8, **{**DEEPSEEK, "activation": "gelu_tanh"},
                         correction_bias_value=0.2 * jax.random.normal(jax.random.key(7), (8,)))


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
