"""Which implementation of the padded (low-latency) layout an EPGroup uses: the operations of a
backend (dispatch, redispatch, combine; see jax_ep/backends/__init__.py) over [E_local, N*M, ...]
rows and a PaddedHandle."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jax_ep.group import EPGroup

_ops: "weakref.WeakKeyDictionary[EPGroup, Any]" = weakref.WeakKeyDictionary()


def padded_ops(group: "EPGroup") -> Any:
    """The group's padded-layout operations (made once per group)."""
    ops = _ops.get(group)
    if ops is None:
        if group.backend_name == "cuda":
            from jax_ep.backends.cuda_padded import CudaPaddedOps

            ops = CudaPaddedOps(group.backend)
        else:
            from jax_ep.backends.reference_padded import ReferencePaddedOps

            ops = ReferencePaddedOps(group.axis_name)
        _ops[group] = ops
    return ops
