"""The compiled extension: loaded once, its FFI targets registered with XLA once."""

from __future__ import annotations

import functools
from types import ModuleType

import jax

ABI_VERSION = 4  # must equal JAX_EP_ABI_VERSION in ffi/abi.h


@functools.cache
def module() -> ModuleType:
    try:
        from jax_ep import _jax_ep
    except ImportError as e:  # pragma: no cover - a broken install
        raise ImportError(
            "jax_ep's compiled extension is missing: install the package with "
            "`pip install .` (an editable source tree without a build has none)") from e
    if _jax_ep.ABI_VERSION != ABI_VERSION:
        raise ImportError(f"jax_ep: the compiled extension has ABI {_jax_ep.ABI_VERSION}, the "
                          f"Python package expects {ABI_VERSION}; rebuild with `pip install .`")
    for name, capsule in _jax_ep.cpu_targets().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    for name, capsule in _jax_ep.cuda_targets().items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    return _jax_ep


def with_cuda() -> bool:
    return bool(module().WITH_CUDA)


def abi_version_via_ffi() -> jax.Array:
    """Runs the CPU custom call that reports the extension's ABI version (a plumbing check)."""
    module()
    call = jax.ffi.ffi_call("jax_ep_abi_version", jax.ShapeDtypeStruct((), jax.numpy.int32))
    with jax.default_device(jax.devices("cpu")[0]):
        return call()
