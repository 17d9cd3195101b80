"""MoE layer for Flax NNX: `MoE(nnx.Module)`, expert-parallel over a mesh axis.

    moe = MoE(hidden=64, ffn=128, num_experts=8, top_k=2, mesh=mesh, rngs=nnx.Rngs(0))
    y, aux_loss = moe(x)                  # x [..., 64], tokens sharded over the token axes
    y, aux = moe(x, return_aux=True)      # aux: dict (loss, aux_loss, z_loss, expert_load, ...)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jax_ep.nn import moe_math
from jax_ep.nn._extra import require
from jax_ep.nn.moe_math import (CORRECTION_BIAS, Initializer, MoESpec, init_params,
                                moe_forward, param_shapes, param_specs)

nnx = require("flax.nnx", "jax_ep.nn.flax")


class CorrectionBias(nnx.Variable):
    """The router's correction bias (DeepSeek-V3 aux-loss-free balancing): chooses experts but
    gets no gradient. Not an nnx.Param, so nnx.Optimizer(..., wrt=nnx.Param) and
    nnx.split(model, nnx.Param, ...) leave it out of the trained parameters; update it with
    MoE.update_correction_bias."""


def _variable(value: jax.Array, name: str, spec: MoESpec) -> nnx.Variable:
    """An nnx.Param (or CorrectionBias) with the PartitionSpec of moe_math.param_specs as its
    sharding metadata (per dimension: the expert axis on E, else None) when the layer has a
    mesh, so nnx.get_partition_spec / get_named_sharding describe how the layer runs."""
    kind = CorrectionBias if name == CORRECTION_BIAS else nnx.Param
    if spec.mesh is None:
        return kind(value)
    pspec = tuple(param_specs(spec)[name])
    names = pspec + (None,) * (value.ndim - len(pspec))
    return kind(nnx.with_partitioning(lambda: value, names, spec.mesh)())


class MoE(nnx.Module):
    """Top-k routed gated-MLP (SwiGLU) experts with jax_ep dispatch/combine (Flax NNX).

    Args:
      hidden: H, token width. ffn: F, each expert's hidden width.
      num_experts: E (a multiple of the expert axis' size). top_k: k.
      mesh: the mesh to run over; None = the dense fallback (all experts, one device's math).
      expert_axis: mesh axis holding the experts; weights [E, H, F] are sharded on it.
      token_axes: mesh axes the tokens are split over (default: all axes of the mesh).
      shared_ffn: width of an always-on shared expert (0 = none).
      router: "softmax" or "sigmoid". renormalize: top-k weights sum to 1 per token.
      capacity_factor, max_tokens, backend: passed to the EPGroup's EPConfig / backend. With a
        mesh and max_tokens the EPGroup is made here (a bad backend fails at construction);
        without max_tokens, at the first call.
      dtype: compute dtype (bf16, f16, f32); param_dtype: dtype the parameters are kept in.
      activation: gate activation: "silu" (SwiGLU), "gelu" (GeGLU), "gelu_tanh", "relu",
        "sigmoid", or a function.
      expert_gemm: how the experts' grouped matmuls run (docs/nn.md, "Expert matmuls").
      use_bias: biases in the routed and shared experts. router_bias: a bias on the logits.
      correction_bias: DeepSeek-V3's aux-loss-free balancing bias (a CorrectionBias variable,
        selection only; see update_correction_bias).
      num_groups, topk_groups: grouped / node-limited top-k (DeepSeek-V3 n_group, topk_group).
      routed_scaling_factor: multiplies the routing weights.
      aux_loss_coef, z_loss_coef: weights of aux_loss and z_loss in aux["loss"].
      router_init, expert_init, shared_init, bias_init: initializers `init(key, shape, dtype)`
        (jax.nn.initializers style) of the router [H, E], routed experts [E, H, F] / [E, F, H],
        shared expert and biases; None = Normal(0, 1/fan_in) weights, zero biases.
      sow_aux: also sow the aux dict into nnx.Intermediate as `moe_aux` on every call, for
        models whose blocks return only x: collect with nnx.capture(model, nnx.Intermediate)
        (Flax >= 0.12; older: nnx.pop(model, nnx.Intermediate) after the call).
      rngs: nnx.Rngs for initialisation.

    Call: x [..., H] -> (y [..., H], aux_loss [] f32, the load-balancing loss E * sum f_e p_e);
    with return_aux=True -> (y, aux dict): see moe_math.moe_forward.
    Parameters (nnx.Param, with sharding metadata when there is a mesh): router [H, E],
    w_gate / w_up [E, H, F], w_down [E, F, H] and, per option, router_bias [E], b_gate / b_up
    [E, F], b_down [E, H], shared_gate / shared_up [H, S], shared_down [S, H], shared_b_*;
    correction_bias [E] is a CorrectionBias.
    """

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
                 sow_aux: bool = False, rngs: nnx.Rngs):
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
        self.sow_aux = sow_aux
        moe_math.build_group(self.spec)
        inits = dict(router=router_init, expert=expert_init, shared=shared_init, bias=bias_init)
        for name, value in init_params(rngs.params(), self.spec, param_dtype, inits).items():
            setattr(self, name, _variable(value, name, self.spec))

    def params(self) -> dict[str, jax.Array]:
        """The parameters as a dict of arrays (moe_math's names), the correction bias too."""
        return {name: getattr(self, name)[...] for name in param_shapes(self.spec)}

    def update_correction_bias(self, expert_load: jax.Array, rate: float = 1e-3) -> None:
        """DeepSeek-V3's balancing step, in place: bias += rate * sign(mean load - load), with
        expert_load = aux["expert_load"] of the step (works inside nnx.jit)."""
        if not self.spec.correction_bias:
            raise ValueError("MoE.update_correction_bias: the layer was built without "
                             "correction_bias=True")
        bias = self.correction_bias
        bias[...] = moe_math.correction_bias_update(bias[...], expert_load, rate)

    def __call__(self, x: jax.Array, *, return_aux: bool = False):
        y, aux = moe_forward(self.spec, self.params(), x, return_aux=True)
        if self.sow_aux:
            self.sow(nnx.Intermediate, "moe_aux", aux)
        return (y, aux) if return_aux else (y, aux["aux_loss"])
