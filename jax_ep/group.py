"""EPGroup: the mesh axis that experts are spread over, its config, and the backend's state."""

from __future__ import annotations

import atexit
import itertools
import logging
import time
import warnings
import weakref
from typing import Any, Sequence

from jax.sharding import Mesh

from jax_ep import coordination, memory, topology, validation
from jax_ep.backends import layout_operations
from jax_ep.backends.hierarchical import INTER_HOST
from jax_ep.backends.reference import ReferenceBackend
from jax_ep.config import EPConfig

BACKENDS = ("auto", "reference", "cuda", "hierarchical")
INTRA_HOST = ("auto", "cuda", "xla")
_open_groups: "weakref.WeakSet[EPGroup]" = weakref.WeakSet()
logger = logging.getLogger("jax_ep")
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
      inter_host: the hierarchical backend's engine between hosts: "ragged" (XLA
        ragged_all_to_all after a count exchange: each token crosses only to the hosts of its
        slots; GPUs only), "all_to_all" (a static chunk of T tokens per host; every platform),
        or "auto" (ragged on GPUs when XLA_FLAGS holds
        hierarchical.RAGGED_XLA_FLAG, which XLA needs to run it between hosts, else
        all_to_all). Other backends ignore it.

    Creation is collective over the processes holding the mesh's devices: each checks that the
    others created the same group (ValueError naming the differing process and fields) and a
    process that does not arrive within EPConfig.timeout_s is an EPPeerError (a TimeoutError)
    naming it, on every process, the late one included. Every process must create its groups
    in the same order, make the same jax_ep calls, and close() them in the same order; on CPU
    backends over several processes each call checks that (docs/multihost.md).
    The cuda backend allocates its communication buffers here, once, and frees them on
    close() (or at interpreter exit). Use as a context manager to scope them.
    """

    def __init__(self, mesh: Mesh, axis_name: str, config: EPConfig, backend: str = "auto",
                 hosts: Sequence[Any] | None = None, intra_host: str = "auto",
                 inter_host: str = "auto"):
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
        if inter_host not in INTER_HOST:
            raise ValueError(f"EPGroup: inter_host must be one of {INTER_HOST}, got "
                             f"{inter_host!r}")
        validation.check_portable_config(config, n)
        self.mesh = mesh
        self.axis_name = axis_name
        self.config = config
        self.num_ranks = n
        self.experts_per_rank = config.num_experts // n
        given = topology.from_labels(hosts, n) if hosts is not None else None
        self._coordinator = coordination.create(mesh, axis_name, config, backend=backend,
                                                hosts=hosts, intra_host=intra_host,
                                                inter_host=inter_host)
        self.topology = given or topology.discover(mesh, axis_name, self._coordinator.hostnames)
        self.backend_name = _resolve_backend(backend, mesh, self.topology.num_hosts)
        self.intra_host: str | None = None  # the hierarchical backend's intra-host leg
        self.inter_host: str | None = None  # and its engine between hosts
        self.backend: Any
        if self.backend_name == "cuda":
            from jax_ep.backends.cuda import CudaBackend

            self.backend = CudaBackend(mesh, axis_name, config, self._coordinator)
        elif self.backend_name == "hierarchical":
            from jax_ep.backends.hierarchical import (HierarchicalBackend, XlaIntraHostLeg,
                                                      resolve_inter_host)

            self.topology.check_uniform("EPGroup(backend='hierarchical')")
            self.intra_host = _resolve_intra_host(intra_host, mesh)
            self.inter_host = resolve_inter_host(inter_host,
                                                 [d.platform for d in mesh.devices.flat])
            if self.intra_host == "cuda":
                from jax_ep.backends.cuda import CudaIntraHostLeg

                intra = CudaIntraHostLeg(mesh, axis_name, self.topology, config,
                                         self._coordinator)
            else:
                intra = XlaIntraHostLeg(axis_name, self.topology)
            self.backend = HierarchicalBackend(axis_name, self.topology, intra, self.inter_host,
                                               config.f32_partials)
        else:
            self.backend = ReferenceBackend(axis_name)
        self.ops = layout_operations(self.backend_name, self.backend, axis_name)
        self._calls = self._call_checks()
        if self._calls is not None:  # every operation of either layout starts with the step
            self.backend = coordination.CheckedBackend(self.backend, self._calls)
            self.ops = {"normal": self.backend,
                        "padded": coordination.CheckedBackend(self.ops["padded"], self._calls)}
        self._closed = False
        self._order = next(_creation_order)
        _open_groups.add(self)
        _log_created(self)

    def _call_checks(self) -> "coordination.CallChecks | None":
        """The per-call step with the peers (coordination.CallChecks) on CPU backends over
        several processes: XLA's gloo collectives would wait 30 minutes for a missing peer and
        name nobody. GPUs keep their hot path free of host round trips: the cuda kernels bound
        their own waits, NCCL's collectives are not bounded (docs/multihost.md)."""
        on_cpus = all(d.platform == "cpu" for d in self.mesh.devices.flat)
        if not (self._coordinator.spans_processes and on_cpus):
            return None
        return coordination.CallChecks(self._coordinator, self.mesh)

    def check(self) -> None:
        """Raises if a call of this group failed after the fact: a cuda kernel that timed out
        waiting for a peer (EPRuntimeError), or, on CPU backends over several processes, a
        peer that did not reach a call within EPConfig.timeout_s (EPPeerError). A later call
        on the group raises the same error; use this after block_until_ready to fail fast."""
        validation.check_open(self, "EPGroup.check")
        self.backend.check()

    def close(self) -> None:
        """Frees the backend's buffers; the group can't be used afterwards. Collective when the
        group spans processes: waits (at most EPConfig.timeout_s) for every peer to reach
        close() before freeing, so no peer is still writing into this process's buffers. A
        peer that a wait already gave up on (here or in another group) is not waited for
        again, so closing many groups with a dead peer takes one timeout_s in all."""
        self._close(deadline=None)

    def _close(self, deadline: float | None) -> None:
        """close(), waiting for the peers timeout_s, and until `deadline` (time.monotonic()) at
        most."""
        if self._closed:
            return
        self._closed = True
        own = time.monotonic() + self.config.timeout_s
        deadline = own if deadline is None else min(deadline, own)
        try:
            # After jax.distributed.shutdown() (at exit) the peers are gone: no one to wait for.
            if coordination.kv_client() is not None or not self._coordinator.spans_processes:
                if self._calls is not None:
                    self._calls.close()
                self._coordinator.barrier("close", deadline)
        except TimeoutError as e:
            warnings.warn(f"{e}; freeing this process's EP buffers anyway", RuntimeWarning,
                          stacklevel=3)
        finally:
            self.backend.close()

    def __enter__(self) -> "EPGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        intra = (f", intra_host={self.intra_host!r}, inter_host={self.inter_host!r}"
                 if self.intra_host else "")
        return (f"EPGroup(axis={self.axis_name!r}, N={self.num_ranks}, "
                f"E={self.config.num_experts}, backend={self.backend_name!r}{intra})")


def _log_created(group: EPGroup) -> None:
    """INFO on the logger "jax_ep": the backend a new group runs on (and why it is that one:
    `python -m jax_ep.info`), its sizes, and the device memory its buffers hold per GPU."""
    if not logger.isEnabledFor(logging.INFO):
        return
    c = group.config
    backend = group.backend_name + (f" (intra_host={group.intra_host})" if group.intra_host
                                    else "")
    sizes = (f"top_k={c.top_k} max_tokens={c.max_tokens} hidden_size={c.hidden_size} "
             f"dtype={c.dtype} num_sms={c.num_sms}")
    if c.capacity is not None:
        sizes += f" capacity={c.capacity}"
    elif c.capacity_factor is not None:
        sizes += f" capacity_factor={c.capacity_factor:g}"
    if c.padded_layout:
        sizes += " padded_layout"
    held = memory.group_buffer_bytes(group)
    held_text = ("no persistent device buffers" if held is None else
                 f"{memory.format_bytes(held)} ({held} bytes) of device memory per GPU")
    logger.info("EPGroup on axis %r: backend=%s N=%d E=%d %s; %s", group.axis_name, backend,
                group.num_ranks, c.num_experts, sizes, held_text)


@atexit.register
def _close_all() -> None:
    # In creation order, the same on every process, since close() waits for the peers; under
    # one deadline, so that exit with a dead peer waits one timeout_s, not one per group.
    groups = sorted(_open_groups, key=lambda g: g._order)
    if groups:
        deadline = time.monotonic() + max(g.config.timeout_s for g in groups)
        for group in groups:
            group._close(deadline)
