"""Backends: each computes the same contract (docs/contract.md) with its own data movement.

A backend implements three per-rank operations, called inside shard_map over the group's axis:

  dispatch(x, topk_idx, topk_weights, sizes)
      -> (rows [C, H], row_weights [C], group_sizes [E_local], num_dropped [], handle)
  redispatch(x | None, slot_values | None, handle, sizes)
      -> (rows [C, H] | None, row_values [C] | None)         # move along an existing routing
  combine(rows | None, row_scale | None, row_values | None, handle, sizes)
      -> (out [T, H] | None, slot_values [T, k] | None)
         out[t] = sum over delivered slots j, in order, of f32(row_scale[r]) * f32(rows[r])
         slot_values[t, j] = row_values[r], with r = handle.dest_row[t, j]

Ids outside [0, E) are treated as unrouted by every backend.

The padded layout has operations of the same three shapes over [E_local, N*M, ...] rows and a
PaddedHandle. Which operations serve each layout is decided once, when the group is made
(`layout_operations`), and nowhere else:

  backend        normal layout                     padded layout
  reference      ReferenceBackend                  ReferencePaddedOps (reference_padded.py)
  cuda           CudaBackend (cuda/normal.py)      CudaPaddedOps (cuda/padded.py), same buffers
  hierarchical   HierarchicalBackend with its      HierarchicalPaddedOps (hierarchical_padded.py):
                 intra-host leg: cuda or xla       the same inter-host leg, and the padded
                                                   intra-host leg of the same kind: the padded
                                                   kernels on the cuda leg's buffers
                                                   (CudaIntraHostPaddedLeg) or pure JAX
                                                   (XlaIntraHostPaddedLeg, CPUs)
"""

from __future__ import annotations

from typing import Any

LAYOUTS = ("normal", "padded")


class NoDeviceState:
    """check() and close() of a backend made of XLA collectives only: nothing runs
    asynchronously that could fail later, nothing to free."""

    def check(self) -> None:
        pass

    def close(self) -> None:
        pass


def layout_operations(backend_name: str, backend: Any, axis_name: str) -> dict[str, Any]:
    """{"normal": ops, "padded": ops} of a group whose normal layout `backend` computes."""
    padded: Any
    if backend_name == "cuda":
        from jax_ep.backends.cuda import CudaPaddedOps

        padded = CudaPaddedOps(backend)
    elif backend_name == "hierarchical":
        # Two legs as in the normal layout; inside a host, the padded kernels where the normal
        # layout runs the cuda kernels, else pure JAX.
        from jax_ep.backends.hierarchical import XlaIntraHostLeg
        from jax_ep.backends.hierarchical_padded import (HierarchicalPaddedOps,
                                                         XlaIntraHostPaddedLeg)

        if isinstance(backend.intra, XlaIntraHostLeg):
            leg: Any = XlaIntraHostPaddedLeg(axis_name, backend.topo)
        else:
            from jax_ep.backends.cuda import CudaIntraHostPaddedLeg

            leg = CudaIntraHostPaddedLeg(backend.intra)
        padded = HierarchicalPaddedOps(backend, leg)
    else:
        from jax_ep.backends.reference_padded import ReferencePaddedOps

        padded = ReferencePaddedOps(axis_name)
    return {"normal": backend, "padded": padded}
