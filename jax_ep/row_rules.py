"""The rows the cuda kernels can move, stated once: every backend applies this rule when
EPConfig.portable is set (the default), so what runs on the CPU backends runs on GPUs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from jax_ep.config import EPConfig

VECTOR_BYTES = 16  # the kernels copy rows in 16-byte vectors


def _portable_hint(on_cuda: bool) -> str:
    if on_cuda:
        return "(or backend='reference' with EPConfig(portable=False))"
    return ("(the cuda kernels need this and EPConfig(portable=True), the default, holds every "
            "backend to it; EPConfig(portable=False) lifts it on the CPU backends)")


def check_row_width(config: "EPConfig", op: str, hidden: int, dtype: np.dtype,
                     on_cuda: bool = True) -> None:
    """Rows of `hidden` x `dtype` must be whole 16-byte vectors and, when
    EPConfig.hidden_size is set, no wider than hidden_size x EPConfig.dtype (the buffers' rows).

    on_cuda: whether the caller is a cuda backend (only changes the error's hint).
    Raises ValueError naming the width to use.
    """
    dtype = np.dtype(dtype)
    row_bytes = hidden * dtype.itemsize
    if row_bytes % VECTOR_BYTES:
        step = VECTOR_BYTES // np.gcd(VECTOR_BYTES, dtype.itemsize)
        raise ValueError(
            f"jax_ep.{op}: the cuda kernels move rows in {VECTOR_BYTES}-byte vectors; "
            f"H={hidden} in {dtype.name} is {row_bytes} bytes. Use a hidden size that is a "
            f"multiple of {step} for {dtype.name} {_portable_hint(on_cuda)}")
    if config.hidden_size is None:
        return
    max_row_bytes = config.hidden_size * np.dtype(jnp.dtype(config.dtype)).itemsize
    if row_bytes > max_row_bytes:
        raise ValueError(
            f"jax_ep.{op}: rows of {row_bytes} bytes ({hidden} x {dtype.name}) are wider than "
            f"the buffers (EPConfig.hidden_size={config.hidden_size} x "
            f"{jnp.dtype(config.dtype).name}); set EPConfig.dtype to the widest dtype you move "
            f"{_portable_hint(on_cuda)}")
