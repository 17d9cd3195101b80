"""The compiled extension loads, registers its FFI targets, and matches the Python package."""

import numpy as np

from jax_ep import _ext


def test_abi_version_through_an_ffi_call():
    assert int(np.asarray(_ext.abi_version_via_ffi())) == _ext.ABI_VERSION


def test_cuda_targets_exist_exactly_when_built_with_cuda():
    targets = set(_ext.module().cuda_targets())
    if _ext.with_cuda():
        assert {"jax_ep_dispatch", "jax_ep_redispatch", "jax_ep_combine"} <= targets
    else:
        assert not targets
