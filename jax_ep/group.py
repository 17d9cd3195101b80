"""EPGroup: the mesh axis that experts are spread over, its config, and the backend's state."""

from __future__ import annotations

import atexit
import itertools
import warnings
import weakref
from typing import Any, Sequence

from jax.sharding import Mesh

from jax_ep import coordination, topology
from jax_ep.backends.reference import ReferenceBackend
from jax_ep.config import EPConfig

BACKENDS = ("auto", "reference", "cuda", "hierarchical")
INTRA_HOST = ("auto", "cuda", "xla")
_open_groups: "weakref.WeakSet[EPGroup]" = weakref.WeakSet()
_creation_order = itertools.count()


def cuda_available() -> bool:
    """True when the extension was built with the CUDA kernels."""
    from jax_ep import _ext

    return _ext.with_cuda()


def _resolve_backend(backend: str, mesh: Mesh, num_hosts: int) -> str:
    on_gpus = all(d.platform == "gpu" for d in mesh.devices.flat)
    if backend == "auto":
        if num_hosts > 1:
            return "hierarchical"
        return "cuda" if on_gpus and cuda_available() else "reference"
    if backend == "cuda":
        if num_hosts > 1:
            raise ValueError(f"EPGroup: backend='cuda' moves tokens within one host, but the EP "
                             f"axis spans {num_hosts} hosts; use backend='hierarchical' (or "
                             f"'auto')")
        if not cuda_available():
            raise ValueError("EPGroup: backend='cuda' needs jax_ep built with nvcc (the CUDA "
                             "kernels are not in this build); reinstall with nvcc on PATH or "
                             "use backend='reference'")
        if not on_gpus:
            raise ValueError("EPGroup: backend='cuda' needs a mesh of GPU devices, got "
                             f"{sorted({d.platform for d in mesh.devices.flat})}")
    return backend


def _resolve_intra_host(intra_host: str, mesh: Mesh) -> str:
    on_gpus = all(d.platform == "gpu" for d in mesh.devices.flat)
    if intra_host == "auto":
        return "cuda" if on_gpus and cuda_available() else "xla"
    if intra_host == "cuda" and not (on_gpus and cuda_available()):
        raise ValueError("EPGroup: intra_host='cuda' needs a mesh of GPU devices and jax_ep built "
                         "with nvcc; use intra_host='xla' (or 'auto')")
    return intra_host


class EPGroup:
    """Experts spread over mesh axis `axis_name`; one EP group per slice of the other axes.

    Args:
      mesh: the mesh the MoE layer's shard_map runs over.
      axis_name: the axis of `mesh` that holds the experts (N = mesh.shape[axis_name] ranks).
      config: static sizes and knobs (EPConfig).
      backend: "auto" (hierarchical when the axis spans several hosts, else cuda on GPUs when
        built with CUDA, else reference), "reference", "cuda", "hierarchical".
      hosts: the host of each rank along the EP axis (any labels, e.g. [0, 0, 1, 1]); None
        discovers it from the devices' processes and their host names (one host with one
        process). Override it to run the hierarchical backend on one machine.
      intra_host: the hierarchical backend's leg inside a host: "cuda" (the cuda kernels over
        NVLink / CUDA IPC; needs EPConfig.max_tokens and hidden_size), "xla" (grouped XLA
        all_to_all), or "auto" (cuda on GPUs when built with CUDA, else xla). Other backends
        ignore it.

    Creation is collective over the processes holding the mesh's devices: each checks that the
    others created the same group (ValueError naming the differing process and fields) and a
    process that does not arrive within EPConfig.timeout_s is a TimeoutError naming it. Every
    process must create its groups in the same order, and close() them in the same order.
    The cuda backend allocates its communication buffers here, once, and frees them on
    close() (or at interpreter exit). Use as a context manager to scope them.
    """

    def __init__(self, mesh: Mesh, axis_name: str, config: EPConfig, backend: str = "auto",
                 hosts: Sequence[Any] | None = None, intra_host: str = "auto"):
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
        if backend not in BACKENDS:
            raise ValueError(f"EPGroup: backend must be one of {BACKENDS}, got {backend!r}")
        if intra_host not in INTRA_HOST:
            raise ValueError(f"EPGroup: intra_host must be one of {INTRA_HOST}, got "
                             f"{intra_host!r}")
        self.mesh = mesh
        self.axis_name = axis_name
        self.config = config
        self.num_ranks = n
        self.experts_per_rank = config.num_experts // n
        given = topology.from_labels(hosts, n) if hosts is not None else None
        self._coordinator = coordination.create(mesh, axis_name, config, backend=backend,
                                                hosts=hosts, intra_host=intra_host)
        self.topology = given or topology.discover(mesh, axis_name, self._coordinator.hostnames)
        self.backend_name = _resolve_backend(backend, mesh, self.topology.num_hosts)
        self.intra_host: str | None = None  # the hierarchical backend's intra-host leg
        self.backend: Any
        if self.backend_name == "cuda":
            from jax_ep.backends.cuda import CudaBackend

            self.backend = CudaBackend(mesh, axis_name, config, self._coordinator)
        elif self.backend_name == "hierarchical":
            from jax_ep.backends.hierarchical import HierarchicalBackend, XlaIntraHostLeg

            self.topology.check_uniform("EPGroup(backend='hierarchical')")
            self.intra_host = _resolve_intra_host(intra_host, mesh)
            if self.intra_host == "cuda":
                from jax_ep.backends.cuda_intra_host import CudaIntraHostLeg

                intra = CudaIntraHostLeg(mesh, axis_name, self.topology, config,
                                         self._coordinator)
            else:
                intra = XlaIntraHostLeg(axis_name, self.topology)
            self.backend = HierarchicalBackend(axis_name, self.topology, intra)
        else:
            self.backend = ReferenceBackend(axis_name)
        self._closed = False
        self._order = next(_creation_order)
        _open_groups.add(self)

    def check(self) -> None:
        """Raises if a cuda kernel of this group reported an error after the fact (a peer
        that never arrived: the wait times out after EPConfig.timeout_s). A later call on the
        group raises the same error; use this after block_until_ready to fail fast."""
        self.backend.check()

    def close(self) -> None:
        """Frees the backend's buffers; the group can't be used afterwards. Collective when the
        group spans processes: waits (at most EPConfig.timeout_s) for every peer to reach
        close() before freeing, so no peer is still writing into this process's buffers."""
        if not self._closed:
            self._closed = True
            try:
                # After jax.distributed.shutdown() (at exit) the peers are gone: no one to wait for.
                if coordination.kv_client() is not None or not self._coordinator.spans_processes:
                    self._coordinator.barrier("close")
            except TimeoutError as e:
                warnings.warn(f"{e}; freeing this process's EP buffers anyway", RuntimeWarning,
                              stacklevel=2)
            finally:
                self.backend.close()

    def __enter__(self) -> "EPGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        intra = f", intra_host={self.intra_host!r}" if self.intra_host else ""
        return (f"EPGroup(axis={self.axis_name!r}, N={self.num_ranks}, "
                f"E={self.config.num_experts}, backend={self.backend_name!r}{intra})")


@atexit.register
def _close_all() -> None:
    # In creation order, the same on every process, since close() waits for the peers.
    for group in sorted(_open_groups, key=lambda g: g._order):
        group.close()
