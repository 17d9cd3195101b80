"""MoE layer for Equinox: `MoE(eqx.Module)`, expert-parallel over a mesh axis.

    moe = MoE(hidden=64, ffn=128, num_experts=8, top_k=2, mesh=mesh, key=jax.random.key(0))
    y, aux_loss = moe(x)          # x [..., 64]: all tokens at once (do not vmap it)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jax_ep.nn._extra import require
from jax_ep.nn.moe_math import MoESpec, init_params, moe_forward, param_shapes

eqx = require("equinox", "jax_ep.nn.equinox")


class MoE(eqx.Module):
    """Top-k routed SwiGLU experts with jax_ep dispatch/combine (Equinox).

    Same arguments as jax_ep.nn.flax.MoE, with `key` (a jax.random key) instead of `rngs`.
    Call: x [..., H] -> (y [..., H], aux_loss [] f32). The routing couples tokens (top-k
    over experts, the aux loss), so pass the whole batch rather than vmapping the layer.
    """

    spec: MoESpec = eqx.field(static=True)
    router: jax.Array
    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array
    shared_gate: jax.Array | None
    shared_up: jax.Array | None
    shared_down: jax.Array | None

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, *,
                 mesh: Mesh | None = None, expert_axis: str = "expert",
                 token_axes: tuple[str, ...] | None = None, shared_ffn: int = 0,
                 router: str = "softmax", renormalize: bool = True,
                 capacity_factor: float | None = None, max_tokens: int | None = None,
                 backend: str = "auto", dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, key: jax.Array):
        self.spec = MoESpec(hidden=hidden, ffn=ffn, num_experts=num_experts, top_k=top_k,
                            shared_ffn=shared_ffn, router=router, renormalize=renormalize,
                            mesh=mesh, expert_axis=expert_axis, token_axes=token_axes,
                            capacity_factor=capacity_factor, max_tokens=max_tokens,
                            backend=backend, dtype=dtype)
        params = init_params(key, self.spec, param_dtype)
        for name in ("router", "w_gate", "w_up", "w_down", "shared_gate", "shared_up",
                     "shared_down"):
            setattr(self, name, params.get(name))

    def params(self) -> dict[str, jax.Array]:
        """The parameters as a dict of arrays (moe_math's names)."""
        return {name: getattr(self, name) for name in param_shapes(self.spec)}

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return moe_forward(self.spec, self.params(), x)
