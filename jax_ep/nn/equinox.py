"""MoE layer for Equinox: `MoE(eqx.Module)`, expert-parallel over a mesh axis.

    moe = MoE(hidden=64, ffn=128, num_experts=8, top_k=2, mesh=mesh, key=jax.random.key(0))
    y, aux_loss = moe(x)                  # x [..., 64]: all tokens at once (do not vmap it)
    y, aux = moe(x, return_aux=True)      # aux: dict (loss, aux_loss, z_loss, expert_load, ...)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_ep.nn import moe_math
from jax_ep.nn._extra import require
from jax_ep.nn.moe_math import (Initializer, MoESpec, init_params, moe_forward, param_shapes,
                                param_specs)

eqx = require("equinox", "jax_ep.nn.equinox")

_FIELDS = ("router", "w_gate", "w_up", "w_down", "shared_gate", "shared_up", "shared_down",
           "router_bias", "correction_bias", "b_gate", "b_up", "b_down", "shared_b_gate",
           "shared_b_up", "shared_b_down")


class MoE(eqx.Module):
    """Top-k routed gated-MLP (SwiGLU) experts with jax_ep dispatch/combine (Equinox).

    Same arguments as jax_ep.nn.flax.MoE (but sow_aux), with `key` (a jax.random key) instead
    of `rngs`. Call: x [..., H] -> (y [..., H], aux_loss [] f32), or with return_aux=True
    (y, aux dict), see moe_math.moe_forward. The routing couples tokens (top-k over experts,
    the aux loss), so pass the whole batch rather than vmapping the layer.

    Fields: the parameters (None when their option is off). correction_bias gets no gradient;
    keep it away from the optimizer with `trainable(model)` and update it with
    update_correction_bias. partition_specs() gives each field's PartitionSpec.
    """

    spec: MoESpec = eqx.field(static=True)
    router: jax.Array
    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array
    shared_gate: jax.Array | None
    shared_up: jax.Array | None
    shared_down: jax.Array | None
    router_bias: jax.Array | None
    correction_bias: jax.Array | None
    b_gate: jax.Array | None
    b_up: jax.Array | None
    b_down: jax.Array | None
    shared_b_gate: jax.Array | None
    shared_b_up: jax.Array | None
    shared_b_down: jax.Array | None

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, *,
                 mesh: Mesh | None = None, expert_axis: str = "expert",
                 token_axes: tuple[str, ...] | None = None, shared_ffn: int = 0,
                 router: str = "softmax", renormalize: bool = True,
                 capacity_factor: float | None = None, max_tokens: int | None = None,
                 backend: str = "auto", expert_gemm: str = "auto",
                 dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, activation: str | Callable = "silu",
                 use_bias: bool = False, router_bias: bool = False,
                 correction_bias: bool = False, num_groups: int = 1,
                 topk_groups: int | None = None, routed_scaling_factor: float = 1.0,
                 aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0,
                 router_init: Initializer | None = None, expert_init: Initializer | None = None,
                 shared_init: Initializer | None = None, bias_init: Initializer | None = None,
                 key: jax.Array):
        self.spec = MoESpec(hidden=hidden, ffn=ffn, num_experts=num_experts, top_k=top_k,
                            shared_ffn=shared_ffn, router=router, renormalize=renormalize,
                            mesh=mesh, expert_axis=expert_axis, token_axes=token_axes,
                            capacity_factor=capacity_factor, max_tokens=max_tokens,
                            backend=backend, expert_gemm=expert_gemm, dtype=dtype,
                            activation=activation,
                            use_bias=use_bias, router_bias=router_bias,
                            correction_bias=correction_bias, num_groups=num_groups,
                            topk_groups=topk_groups,
                            routed_scaling_factor=routed_scaling_factor,
                            aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef)
        moe_math.build_group(self.spec)
        inits = dict(router=router_init, expert=expert_init, shared=shared_init, bias=bias_init)
        params = init_params(key, self.spec, param_dtype, inits)
        for name in _FIELDS:
            setattr(self, name, params.get(name))

    def params(self) -> dict[str, jax.Array]:
        """The parameters as a dict of arrays (moe_math's names), the correction bias too."""
        return {name: getattr(self, name) for name in param_shapes(self.spec)}

    def partition_specs(self) -> "MoE":
        """This module with each array replaced by its PartitionSpec over spec.mesh (expert
        weights and biases P(expert_axis), the rest P()): for jax.jit's in/out_shardings
        (through NamedSharding) or shard_map's in_specs."""
        specs = param_specs(self.spec)
        present = [n for n in _FIELDS if getattr(self, n) is not None]
        return eqx.tree_at(lambda m: [getattr(m, n) for n in present],
                           jax.tree.map(lambda _: P(), self),
                           replace=[specs[n] for n in present])

    def update_correction_bias(self, expert_load: jax.Array, rate: float = 1e-3) -> "MoE":
        """A copy with DeepSeek-V3's balancing step applied: bias += rate * sign(mean load -
        load), with expert_load = aux["expert_load"] of the step."""
        if self.correction_bias is None:
            raise ValueError("MoE.update_correction_bias: the layer was built without "
                             "correction_bias=True")
        new = moe_math.correction_bias_update(self.correction_bias, expert_load, rate)
        return eqx.tree_at(lambda m: m.correction_bias, self, new)

    def __call__(self, x: jax.Array, *, return_aux: bool = False):
        return moe_forward(self.spec, self.params(), x, return_aux=return_aux)


def _is_moe(node: Any) -> bool:
    return isinstance(node, MoE)


def partition_specs(tree: Any) -> Any:
    """PartitionSpecs for a whole model: MoE layers by MoE.partition_specs, every other array
    P() (replicated); other leaves (None, static) unchanged. Same structure as `tree`."""
    return jax.tree.map(lambda n: n.partition_specs() if _is_moe(n) else P(), tree,
                        is_leaf=_is_moe)


def trainable(tree: Any) -> Any:
    """A filter spec (pytree of bools) for eqx.partition / eqx.filter: True for the inexact
    arrays an optimizer should train, False for the MoE layers' correction_bias (gradient-free;
    weight decay would otherwise shrink it). E.g.
    `params, static = eqx.partition(model, trainable(model))`."""
    def spec(node: Any) -> Any:
        if not _is_moe(node):
            return eqx.is_inexact_array(node)
        flags = jax.tree.map(eqx.is_inexact_array, node)
        if node.correction_bias is None:
            return flags
        return eqx.tree_at(lambda m: m.correction_bias, flags, False)

    return jax.tree.map(spec, tree, is_leaf=_is_moe)

