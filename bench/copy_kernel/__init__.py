"""A copy kernel run on a given SM budget (copy_kernel.cu), as a bench-only XLA custom call: the
copy ceiling that jax_ep's dispatch and combine at num_sms = S are compared with (`copy(S)`).
Built on first use (build.py), loaded with ctypes and registered for the CUDA platform.

    from bench.copy_kernel import copy_kernel, unavailable
    if unavailable() is None:
        y = copy_kernel(x, num_blocks=24)   # y == x byte for byte; x.nbytes % 16 == 0
"""

from __future__ import annotations

import ctypes
import functools

from .build import build, find_nvcc, library_path  # noqa: F401 - re-exported

TARGET = "jax_ep_bench_copy"
_libraries = []  # the loaded library, kept alive while XLA may call into it


@functools.cache
def load() -> str:
    """Builds (if needed), loads and registers the custom call once; returns the library's
    path. Raises RuntimeError (one line) where it cannot be built."""
    import jax

    path = build()
    lib = ctypes.cdll.LoadLibrary(str(path))
    _libraries.append(lib)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxEpBenchCopy), platform="CUDA")
    return str(path)


def has_gpu() -> bool:
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@functools.cache
def unavailable() -> str | None:
    """None where the copy kernel can run; otherwise why not, in one line (no GPU, no nvcc, a
    failed build, load or first launch), for the bench to print and skip the copy(S) column."""
    if not has_gpu():
        return "no GPU"
    if find_nvcc() is None and not library_path().exists():
        return "nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda) and no built library"
    try:
        load()
        import jax
        import jax.numpy as jnp

        # A first launch: a library built for another GPU fails here, not inside the bench.
        jax.block_until_ready(copy_kernel(jnp.arange(4, dtype=jnp.uint32), 1))
    except Exception as e:  # noqa: BLE001 - any failure means: skip, saying why
        return " ".join(str(e).split())[:300]
    return None


def copy_kernel(x, num_blocks: int):
    """A copy of x (any dtype and shape, x.nbytes a multiple of 16) made by num_blocks blocks of
    1024 threads on the GPU: one block per SM of the budget."""
    import jax
    import numpy as np

    load()
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype))(
        x, num_blocks=np.int64(num_blocks))
