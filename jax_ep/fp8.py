"""FP8 (e4m3) tokens for dispatch: per-token, per-128-channel float32 scales.

    x_fp8, scales = jax_ep.quantize_fp8(x)                      # x [T, H], H % 128 == 0
    d = jax_ep.dispatch(group, x_fp8, idx, w, x_scales=scales)   # d.x fp8, d.scales f32
    h = jax_ep.dequantize_fp8(d.x, d.scales, jnp.bfloat16)       # or feed an fp8 matmul

Dispatch moves fp8 rows as bytes and their scales with them (half the bytes of bf16). Combine
stays bf16/f32. An fp8 dispatch passes no gradient to x (quantisation is not differentiable);
the routing weights still get theirs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep.config import FP8_BLOCK

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
_MIN_AMAX = 1e-4  # all-zero blocks get a finite scale (their values quantise to 0 anyway)


def _blocks(x: jax.Array, op: str) -> jax.Array:
    """[..., H] -> [..., H / 128, 128]."""
    h = x.shape[-1]
    if h % FP8_BLOCK:
        raise ValueError(f"jax_ep.{op}: the hidden size {h} must be a multiple of {FP8_BLOCK} "
                         f"(one float32 scale per {FP8_BLOCK} channels)")
    return x.reshape(x.shape[:-1] + (h // FP8_BLOCK, FP8_BLOCK))


def quantize_fp8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., H] (bf16 | f16 | f32) -> (x_fp8 [..., H] float8_e4m3fn, scales [..., H/128] f32).

    scale = max(amax of the 128-channel block, 1e-4) / 448, x_fp8 = round(x / scale), so
    x ~= x_fp8 * scale with the block's largest magnitude at the top of the e4m3 range.
    """
    blocks = _blocks(x, "quantize_fp8").astype(jnp.float32)
    amax = jnp.max(jnp.abs(blocks), axis=-1)
    scales = jnp.maximum(amax, _MIN_AMAX) / FP8_MAX
    q = jnp.clip(blocks / scales[..., None], -FP8_MAX, FP8_MAX).astype(FP8)
    return q.reshape(x.shape), scales


def dequantize_fp8(x_fp8: jax.Array, scales: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """x_fp8 [..., H] float8_e4m3fn, scales [..., H/128] f32 -> x [..., H] in `dtype`."""
    if scales.shape != x_fp8.shape[:-1] + (x_fp8.shape[-1] // FP8_BLOCK,):
        raise ValueError(f"jax_ep.dequantize_fp8: scales must be {x_fp8.shape[:-1]} + "
                         f"(H/{FP8_BLOCK},), got {scales.shape} for x of {x_fp8.shape}")
    blocks = _blocks(x_fp8, "dequantize_fp8").astype(jnp.float32)
    return (blocks * scales[..., None]).reshape(x_fp8.shape).astype(dtype)


def is_fp8(x) -> bool:
    return jnp.dtype(x.dtype) == jnp.dtype(FP8)
