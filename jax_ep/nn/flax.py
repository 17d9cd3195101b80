"""MoE layer for Flax NNX: `MoE(nnx.Module)`, expert-parallel over a mesh axis.

    moe = MoE(hidden=64, ffn=128, num_experts=8, top_k=2, mesh=mesh, rngs=nnx.Rngs(0))
    y, aux_loss = moe(x)          # x [..., 64], tokens sharded over the mesh's token axes
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jax_ep.nn._extra import require
from jax_ep.nn.moe_math import MoESpec, init_params, moe_forward, param_shapes

nnx = require("flax.nnx", "jax_ep.nn.flax")


class MoE(nnx.Module):
    """Top-k routed SwiGLU experts with jax_ep dispatch/combine (Flax NNX).

    Args:
      hidden: H, token width. ffn: F, each expert's SwiGLU width.
      num_experts: E (a multiple of the expert axis' size). top_k: k.
      mesh: the mesh to run over; None = the dense fallback (all experts, one device's math).
      expert_axis: mesh axis holding the experts; weights [E, H, F] are sharded on it.
      token_axes: mesh axes the tokens are split over (default: all axes of the mesh).
      shared_ffn: width of an always-on shared expert (0 = none).
      router: "softmax" or "sigmoid". renormalize: top-k weights sum to 1 per token.
      capacity_factor, max_tokens, backend: passed to the EPGroup's EPConfig / backend.
      dtype: compute dtype (bf16, f16, f32); param_dtype: dtype the parameters are kept in.
      rngs: nnx.Rngs for initialisation.

    Call: x [..., H] -> (y [..., H], aux_loss [] f32, the load-balancing loss E * sum f_e p_e).
    Parameters: router [H, E], w_gate / w_up [E, H, F], w_down [E, F, H] and, with a shared
    expert, shared_gate / shared_up [H, S], shared_down [S, H].
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, *,
                 mesh: Mesh | None = None, expert_axis: str = "expert",
                 token_axes: tuple[str, ...] | None = None, shared_ffn: int = 0,
                 router: str = "softmax", renormalize: bool = True,
                 capacity_factor: float | None = None, max_tokens: int | None = None,
                 backend: str = "auto", dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.spec = MoESpec(hidden=hidden, ffn=ffn, num_experts=num_experts, top_k=top_k,
                            shared_ffn=shared_ffn, router=router, renormalize=renormalize,
                            mesh=mesh, expert_axis=expert_axis, token_axes=token_axes,
                            capacity_factor=capacity_factor, max_tokens=max_tokens,
                            backend=backend, dtype=dtype)
        for name, value in init_params(rngs.params(), self.spec, param_dtype).items():
            setattr(self, name, nnx.Param(value))

    def params(self) -> dict[str, jax.Array]:
        """The parameters as a dict of arrays (moe_math's names)."""
        return {name: getattr(self, name)[...] for name in param_shapes(self.spec)}

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return moe_forward(self.spec, self.params(), x)
