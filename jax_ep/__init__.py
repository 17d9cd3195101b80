"""jax_ep: expert-parallel MoE token dispatch and combine for JAX.

    group = jax_ep.EPGroup(mesh, "expert", jax_ep.EPConfig(num_experts=E, top_k=k))
    # inside shard_map over "expert":
    d = jax_ep.dispatch(group, x, topk_idx, topk_weights)
    y = jax.lax.ragged_dot(d.x, w_experts, d.group_sizes)
    out = jax_ep.combine(group, y, d.handle, weights=d.weights)

`python -m jax_ep.info` reports the build and what backend="auto" picks; jax_ep.buffer_bytes(config,
N) the device memory a cuda group will take. Logs go to the standard logger "jax_ep".
"""

from jax_ep.api import combine, dispatch
from jax_ep.errors import EPPeerError, EPRuntimeError, InvalidExpertIdError
from jax_ep.config import EPConfig
from jax_ep.fp8 import dequantize_fp8, quantize_fp8
from jax_ep.group import EPGroup, cuda_available
from jax_ep.memory import buffer_bytes
from jax_ep.types import Dispatched, Handle, PaddedHandle

__all__ = ["EPConfig", "EPGroup", "Dispatched", "Handle", "PaddedHandle", "dispatch", "combine",
           "quantize_fp8", "dequantize_fp8", "cuda_available", "buffer_bytes", "EPRuntimeError", "EPPeerError",
           "InvalidExpertIdError"]
__version__ = "0.1.0"
