"""EPGroup: the mesh axis that experts are spread over, its config, and the backend's state."""

from __future__ import annotations

import atexit
import weakref
from typing import Any

from jax.sharding import Mesh

from jax_ep.backends.reference import ReferenceBackend
from jax_ep.config import EPConfig

BACKENDS = ("auto", "reference", "cuda")
_open_groups: "weakref.WeakSet[EPGroup]" = weakref.WeakSet()


def cuda_available() -> bool:
    """True when the extension was built with the CUDA kernels."""
    from jax_ep import _ext

    return _ext.with_cuda()


def _resolve_backend(backend: str, mesh: Mesh) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"EPGroup: backend must be one of {BACKENDS}, got {backend!r}")
    on_gpus = all(d.platform == "gpu" for d in mesh.devices.flat)
    if backend == "auto":
        return "cuda" if on_gpus and cuda_available() else "reference"
    if backend == "cuda":
        if not cuda_available():
            raise ValueError("EPGroup: backend='cuda' needs jax_ep built with nvcc (the CUDA "
                             "kernels are not in this build); reinstall with nvcc on PATH or "
                             "use backend='reference'")
        if not on_gpus:
            raise ValueError("EPGroup: backend='cuda' needs a mesh of GPU devices, got "
                             f"{sorted({d.platform for d in mesh.devices.flat})}")
    return backend


class EPGroup:
    """Experts spread over mesh axis `axis_name`; one EP group per slice of the other axes.

    Args:
      mesh: the mesh the MoE layer's shard_map runs over.
      axis_name: the axis of `mesh` that holds the experts (N = mesh.shape[axis_name] ranks).
      config: static sizes and knobs (EPConfig).
      backend: "auto" (cuda on GPUs when built with CUDA, else reference), "reference", "cuda".

    The cuda backend allocates its communication buffers here, once, and frees them on
    close() (or at interpreter exit). Use as a context manager to scope them.
    """

    def __init__(self, mesh: Mesh, axis_name: str, config: EPConfig, backend: str = "auto"):
        if not isinstance(mesh, Mesh):
            raise ValueError(f"EPGroup: mesh must be a jax.sharding.Mesh, got {type(mesh)}")
        if axis_name not in mesh.axis_names:
            raise ValueError(f"EPGroup: axis {axis_name!r} is not an axis of the mesh "
                             f"{tuple(mesh.axis_names)}")
        if not isinstance(config, EPConfig):
            raise ValueError(f"EPGroup: config must be an EPConfig, got {type(config)}")
        n = mesh.shape[axis_name]
        if config.num_experts % n:
            raise ValueError(f"EPGroup: num_experts={config.num_experts} is not divisible by the "
                             f"{n} ranks of axis {axis_name!r}; choose E as a multiple of N")
        self.mesh = mesh
        self.axis_name = axis_name
        self.config = config
        self.num_ranks = n
        self.experts_per_rank = config.num_experts // n
        self.backend_name = _resolve_backend(backend, mesh)
        self.backend: Any
        if self.backend_name == "cuda":
            from jax_ep.backends.cuda import CudaBackend

            self.backend = CudaBackend(mesh, axis_name, config)
        else:
            self.backend = ReferenceBackend(axis_name)
        self._closed = False
        _open_groups.add(self)

    def check(self) -> None:
        """Raises if a cuda kernel of this group reported an error after the fact (a peer
        that never arrived: the wait times out after EPConfig.timeout_s). A later call on the
        group raises the same error; use this after block_until_ready to fail fast."""
        self.backend.check()

    def close(self) -> None:
        """Frees the backend's buffers; the group can't be used afterwards."""
        if not self._closed:
            self._closed = True
            self.backend.close()

    def __enter__(self) -> "EPGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"EPGroup(axis={self.axis_name!r}, N={self.num_ranks}, "
                f"E={self.config.num_experts}, backend={self.backend_name!r})")


@atexit.register
def _close_all() -> None:
    for group in list(_open_groups):
        group.close()
