"""What a real model needs from the MoE layers beyond the math (which tests/test_nn.py checks
against the dense oracle): sharding metadata and sharded init, the EPGroup made at
construction, drop / invalid counts and sowing, remat names and named scopes, the correction
bias update, initializers, and clear configuration errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ep.nn import moe_math
from tests.test_nn import F, H, mesh_of

EXPERT_SHARDED = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
OPTIONS = dict(use_bias=True, correction_bias=True)  # expert biases are sharded too


def _sharded_over_experts(array, mesh):
    return array.sharding.is_equivalent_to(NamedSharding(mesh, P("expert")), array.ndim)


# --- sharding metadata and sharded init ---------------------------------------------------------

def test_flax_partition_specs_and_sharded_init_under_eval_shape():
    from flax import nnx

    from jax_ep.nn.flax import MoE

    mesh = mesh_of((2, 4), ("data", "expert"))

    def make():
        return MoE(H, F, 8, 2, mesh=mesh, rngs=nnx.Rngs(0), **OPTIONS)

    abstract = nnx.eval_shape(make)
    state = nnx.state(abstract)
    specs = nnx.get_partition_spec(state)
    for name in EXPERT_SHARDED:
        assert specs[name].get_value() == P("expert", *[None] * (state[name].ndim - 1)), name
    for name in ("router", "correction_bias"):
        assert all(a is None for a in specs[name].get_value()), name
    # The correction bias is not a trainable parameter.
    assert "correction_bias" not in nnx.state(abstract, nnx.Param)

    # Sharded init: jit with the shardings the metadata gives (as for a checkpoint restore).
    shardings = nnx.get_named_sharding(state, mesh)
    sharded = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    for name in moe_math.param_shapes(abstract.spec):
        value = sharded[name][...]
        assert _sharded_over_experts(value, mesh) == (name in EXPERT_SHARDED), name
    assert float(jnp.std(sharded["w_up"][...])) == pytest.approx(1 / math.sqrt(H), rel=0.2)
    model = nnx.merge(nnx.graphdef(abstract), sharded)
    assert _sharded_over_experts(model.w_gate[...], mesh)


def test_equinox_partition_specs_and_sharded_init():
    import equinox as eqx

    from jax_ep.nn.equinox import MoE, partition_specs, trainable

    mesh = mesh_of((2, 4), ("data", "expert"))

    def make(key):
        return MoE(H, F, 8, 2, mesh=mesh, key=key, **OPTIONS)

    abstract = eqx.filter_eval_shape(make, jax.random.key(0))
    specs = abstract.partition_specs()
    for name in EXPERT_SHARDED:
        assert getattr(specs, name) == P("expert"), name
    assert specs.router == P() and specs.correction_bias == P() and specs.shared_up is None
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    model = jax.jit(make, out_shardings=shardings)(jax.random.key(0))
    for name, value in model.params().items():
        assert _sharded_over_experts(value, mesh) == (name in EXPERT_SHARDED), name

    # Whole-model helpers: P() for every other array; the correction bias is not trained.
    tree = {"moe": model, "w": jnp.ones(3), "n": None}
    whole = partition_specs(tree)
    assert whole["w"] == P() and whole["n"] is None and whole["moe"].w_down == P("expert")
    flags = trainable(tree)
    assert flags["w"] is True and flags["moe"].correction_bias is False
    assert flags["moe"].w_gate is True and flags["moe"].b_down is True


# --- the EPGroup at construction -----------------------------------------------------------------

@pytest.mark.parametrize("framework", ["flax", "equinox"])
def test_a_bad_backend_fails_when_the_layer_is_built(framework):
    from jax_ep import group as group_module

    if group_module.cuda_available() and jax.devices()[0].platform == "gpu":
        pytest.skip("cuda is usable here")
    mesh = mesh_of((4,), ("expert",))
    if framework == "flax":
        from flax import nnx

        from jax_ep.nn.flax import MoE

        make = lambda **kw: MoE(H, F, 8, 2, mesh=mesh, rngs=nnx.Rngs(0), **kw)  # noqa: E731
    else:
        from jax_ep.nn.equinox import MoE

        make = lambda **kw: MoE(H, F, 8, 2, mesh=mesh, key=jax.random.key(0), **kw)  # noqa: E731
    with pytest.raises(ValueError, match="backend='cuda'"):
        make(max_tokens=16, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        make(backend="cudaa")
    # Without max_tokens the group is made at the first call.
    assert moe_math.build_group(moe_math.MoESpec(hidden=H, ffn=F, num_experts=8, top_k=2,
                                                 mesh=mesh, backend="cuda")) is None


def test_the_group_made_at_construction_is_the_one_calls_use():
    spec = moe_math.MoESpec(hidden=H, ffn=F, num_experts=8, top_k=2, max_tokens=32,
                            mesh=mesh_of((4,), ("expert",)))
    group = moe_math.build_group(spec)
    assert group is moe_math.group_for(spec, 16) and group.config.max_tokens == 32
    assert moe_math.build_group(moe_math.MoESpec(hidden=H, ffn=F, num_experts=8, top_k=2,
                                                 mesh=spec.mesh)) is None


# --- aux dict: drops, invalid ids, load; sow -----------------------------------------------------

def test_dropped_counts_expert_load_and_sow():
    """capacity_factor=0.5: each rank keeps C = ceil(0.5 * T * k) rows and drops the rest; the
    aux dict sums the drops over the ranks. sow_aux sows the same dict (nnx.capture)."""
    from flax import nnx

    from jax_ep.nn.flax import MoE

    n, e, k, t = 4, 8, 2, 64
    layer = MoE(H, F, e, k, mesh=mesh_of((n,), ("expert",)), capacity_factor=0.5,
                aux_loss_coef=0.01, z_loss_coef=0.001, sow_aux=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (t, H))
    (_, aux), sown = nnx.jit(
        lambda m, x: nnx.capture(m, nnx.Intermediate)(x, return_aux=True))(layer, x)
    assert set(aux) == set(moe_math.AUX_KEYS)
    # expert_load (checked against the dense oracle in test_nn.py) counts slots before drops.
    assert int(np.sum(aux["expert_load"])) == t * k
    capacity = math.ceil(0.5 * (t // n) * k)
    received = np.asarray(aux["expert_load"]).reshape(n, e // n).sum(axis=1)
    expected = int(np.sum(np.maximum(received - capacity, 0)))
    assert expected > 0 and int(aux["num_dropped"]) == expected
    assert int(aux["num_invalid"]) == 0
    np.testing.assert_allclose(aux["loss"], 0.01 * aux["aux_loss"] + 0.001 * aux["z_loss"],
                               rtol=1e-6)
    (first,) = sown["moe_aux"].get_value()
    for name in moe_math.AUX_KEYS:
        np.testing.assert_array_equal(first[name], aux[name], err_msg=name)


# --- remat names and named scopes ----------------------------------------------------------------

def test_remat_policy_naming_dispatch_experts_combine():
    """jax.checkpoint with save_only_these_names(dispatch, experts, combine): same gradients as
    without remat, and the names take effect (the backward pass re-runs less communication
    than with nothing saved). The named scopes reach the HLO."""
    from jax_ep.nn.equinox import MoE

    layer = MoE(H, F, 8, 2, mesh=mesh_of((4,), ("expert",)), shared_ffn=8,
                key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(5), (32, H))

    def loss(layer, x):
        y, aux = layer(x)
        return jnp.sum(jnp.sin(y)) + 0.1 * aux

    names = jax.checkpoint_policies.save_only_these_names(*moe_math.CHECKPOINT_NAMES)
    nothing = jax.checkpoint_policies.nothing_saveable
    grad = jax.grad(loss, argnums=(0, 1))
    remat_grad = jax.grad(jax.checkpoint(loss, policy=names), argnums=(0, 1))
    plain, rematted = jax.jit(lambda m, x: (grad(m, x), remat_grad(m, x)))(layer, x)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    def all_to_alls(policy):
        f = jax.grad(jax.checkpoint(loss, policy=policy), argnums=(0, 1))
        return str(jax.make_jaxpr(f)(layer, x)).count("all_to_all")

    assert all_to_alls(names) < all_to_alls(nothing)
    hlo = jax.jit(loss).lower(layer, x).as_text(debug_info=True)
    for scope in ("jax_ep.moe", moe_math.ROUTER_NAME, moe_math.DISPATCH_NAME,
                  moe_math.EXPERTS_NAME, moe_math.COMBINE_NAME, moe_math.SHARED_NAME):
        assert scope in hlo, scope


# --- correction bias, initializers, errors -------------------------------------------------------

def test_correction_bias_update_in_both_frameworks():
    from flax import nnx

    from jax_ep.nn.equinox import MoE as EqxMoE
    from jax_ep.nn.flax import MoE as FlaxMoE

    load = jnp.array([10, 2, 4, 0], jnp.int32)  # mean 4
    step = 1e-2 * np.array([-1.0, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(moe_math.correction_bias_update(jnp.zeros(4), load, 1e-2), step)
    flax_layer = FlaxMoE(H, F, 4, 2, router="sigmoid", correction_bias=True, rngs=nnx.Rngs(0))
    flax_layer.update_correction_bias(load, 1e-2)
    flax_layer.update_correction_bias(load, 1e-2)
    np.testing.assert_allclose(flax_layer.correction_bias[...], 2 * step, rtol=1e-6)
    eqx_layer = EqxMoE(H, F, 4, 2, correction_bias=True, key=jax.random.key(0))
    updated = eqx_layer.update_correction_bias(load, 1e-2)
    np.testing.assert_allclose(updated.correction_bias, step)
    np.testing.assert_array_equal(eqx_layer.correction_bias, np.zeros(4))
    with pytest.raises(ValueError, match="correction_bias=True"):
        FlaxMoE(H, F, 4, 2, rngs=nnx.Rngs(0)).update_correction_bias(load)


def test_initializers_by_family_and_by_name():
    spec = moe_math.MoESpec(hidden=H, ffn=F, num_experts=4, top_k=2, shared_ffn=8,
                            use_bias=True, router_bias=True, correction_bias=True)

    def const(c):
        return lambda key, shape, dtype: jnp.full(shape, c, dtype)

    params = moe_math.init_params(jax.random.key(0), spec, inits={
        "router": const(1.0), "expert": const(2.0), "w_down": const(3.0), "shared": const(4.0),
        "bias": const(5.0)})
    expect = {"router": 1, "w_gate": 2, "w_up": 2, "w_down": 3, "shared_gate": 4,
              "shared_down": 4, "b_gate": 5, "b_down": 5, "router_bias": 5, "shared_b_up": 5,
              "correction_bias": 0}
    for name, value in expect.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)
    # Defaults: Normal(0, 1/fan_in) weights (the same values as without options), zero biases.
    plain = moe_math.init_params(jax.random.key(0), moe_math.MoESpec(hidden=H, ffn=F,
                                                                     num_experts=4, top_k=2))
    assert float(jnp.std(plain["w_gate"])) == pytest.approx(1 / math.sqrt(H), rel=0.2)
    default = moe_math.init_params(jax.random.key(0), spec)
    assert not np.any(default["b_up"]) and not np.any(default["router_bias"])
    with pytest.raises(ValueError, match="unknown parameters or families"):
        moe_math.init_params(jax.random.key(0), spec, inits={"kernel": const(0.0)})


def test_bad_options_say_what_to_change():
    def spec(**kw):
        return moe_math.MoESpec(hidden=H, ffn=F, num_experts=8, top_k=2, **kw)

    with pytest.raises(ValueError, match="activation must be one of"):
        spec(activation="swiglu")
    with pytest.raises(ValueError, match="not divisible by num_groups=3"):
        spec(num_groups=3)
    with pytest.raises(ValueError, match=r"topk_groups must be an int in \[1, num_groups=4\]"):
        spec(num_groups=4, topk_groups=5)
    with pytest.raises(ValueError, match="raise topk_groups"):
        moe_math.MoESpec(hidden=H, ffn=F, num_experts=8, top_k=3, num_groups=4, topk_groups=1)
    with pytest.raises(ValueError, match="routed_scaling_factor must be > 0"):
        spec(routed_scaling_factor=0.0)
    with pytest.raises(ValueError, match="z_loss_coef must be >= 0"):
        spec(z_loss_coef=-1.0)
    assert spec(activation=jnp.tanh).activation_fn is jnp.tanh
