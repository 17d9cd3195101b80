"""The processes that hold one EP group's devices, kept in step through the jax.distributed
key-value store.

Creating a group is collective over those processes: each publishes what it built (a digest of
EPConfig, mesh shape and axes, EP axis, backend, hosts and the group's creation index) and checks
the others', so a mismatch is a ValueError naming the process and the fields that differ instead
of a kernel that waits on buffers nobody allocated. Every wait on a peer is bounded (EPConfig's
timeout_s) and names the process that did not arrive. close() waits for every peer before
anything is freed, so no process frees a buffer a peer may still write.

With one process nothing is published and every wait returns at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
from typing import Any, Sequence

import jax
from jax.sharding import Mesh

from jax_ep.config import EPConfig

# Creation index of the next group over each set of processes: the processes agree on it only
# if they create their groups in the same order, which is what makes KV keys line up.
_creation_counts: dict[tuple[int, ...], int] = {}


def kv_client() -> Any:
    """The jax.distributed client, or None when jax.distributed is not initialized."""
    from jax._src import distributed

    return distributed.global_state.client


def hostname() -> str:
    """This process's host name; JAX_EP_HOSTNAME overrides it (emulated hosts in tests)."""
    return os.environ.get("JAX_EP_HOSTNAME") or socket.gethostname()


def processes_of(mesh: Mesh) -> tuple[int, ...]:
    return tuple(sorted({d.process_index for d in mesh.devices.flat}))


def describe(config: EPConfig, mesh: Mesh, axis_name: str, index: int, backend: str,
             hosts: Sequence[Any] | None, intra_host: str = "auto") -> dict[str, str]:
    """What every process must agree on, field by field (compared as text)."""
    fields = {f"config.{f.name}": repr(getattr(config, f.name))
              for f in dataclasses.fields(config)}
    fields.update({
        "mesh.axis_names": repr(tuple(mesh.axis_names)),
        "mesh.shape": repr(tuple(mesh.devices.shape)),
        "mesh.device_ids": repr(tuple(int(d.id) for d in mesh.devices.flat)),
        "axis_name": repr(axis_name),
        "backend": repr(backend),
        "intra_host": repr(intra_host),
        "hosts": repr(None if hosts is None else tuple(hosts)),
        "creation_index": repr(index),
    })
    return fields


def _digest(fields: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass
class GroupCoordinator:
    """One EP group's view of its processes.

    Attributes:
      processes: process indices holding the mesh's devices, sorted.
      me: this process's index.
      index: the group's creation index among groups over the same processes.
      timeout_s: the bound on every wait for a peer.
      hostnames: process index -> host name, for every process of the group.
      prefix: the group's KV-store namespace (backends put their own keys under it).
    """

    processes: tuple[int, ...]
    me: int
    index: int
    timeout_s: float
    hostnames: dict[int, str]
    prefix: str
    client: Any = None

    @property
    def spans_processes(self) -> bool:
        return len(self.processes) > 1

    def publish(self, name: str, value: str) -> None:
        """Sets `<prefix>/<name>/<me>` for the peers to read."""
        self.client.key_value_set(f"{self.prefix}/{name}/{self.me}", value)

    def fetch(self, process: int, name: str, what: str, deadline: float | None = None) -> str:
        """Reads `<prefix>/<name>/<process>`, waiting until `deadline` (time.monotonic()) or
        timeout_s; a peer that never publishes is a TimeoutError naming it and `what` it
        failed to do."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout_s
        wait_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            return self.client.blocking_key_value_get(f"{self.prefix}/{name}/{process}", wait_ms)
        except Exception as e:  # the client raises a generic XlaRuntimeError on DEADLINE_EXCEEDED
            raise TimeoutError(
                f"jax_ep: EPGroup #{self.index} over processes {list(self.processes)}: process "
                f"{process} did not {what} within {self.timeout_s:g} s (EPConfig.timeout_s). Is "
                f"it running, and does it create the same EPGroups in the same order?") from e

    def fetch_all(self, name: str, what: str) -> dict[int, str]:
        """Every peer's `<name>` under one deadline; raises naming the first peer missing."""
        deadline = time.monotonic() + self.timeout_s
        return {p: self.fetch(p, name, what, deadline) for p in self.processes if p != self.me}

    def barrier(self, name: str) -> None:
        """Returns once every process of the group reached barrier `name`; TimeoutError naming
        a missing process after timeout_s."""
        if not self.spans_processes:
            return
        self.publish(name, "1")
        self.fetch_all(name, f"reach '{name}' of the group")


def create(mesh: Mesh, axis_name: str, config: EPConfig, *, backend: str,
           hosts: Sequence[Any] | None, intra_host: str = "auto") -> GroupCoordinator:
    """The collective part of EPGroup creation: checks every process built the same group.

    Raises ValueError naming the process and the differing fields when setups differ, and
    TimeoutError naming the process that did not create the group within config.timeout_s.
    """
    processes = processes_of(mesh)
    me = jax.process_index()
    index = _creation_counts.get(processes, 0)
    _creation_counts[processes] = index + 1
    prefix = f"jax_ep/groups/{'-'.join(map(str, processes))}/{index}"
    coord = GroupCoordinator(processes, me, index, float(config.timeout_s), {me: hostname()},
                             prefix)
    if not coord.spans_processes:
        return coord
    if me not in processes:
        raise ValueError(f"EPGroup: this process ({me}) holds none of the mesh's devices (they "
                         f"belong to processes {list(processes)}); build the group from a mesh "
                         f"that includes this process's devices")
    coord.client = kv_client()
    if coord.client is None:
        raise ValueError(f"EPGroup: the mesh spans processes {list(processes)}; call "
                         f"jax.distributed.initialize() in every process first")
    fields = describe(config, mesh, axis_name, index, backend, hosts, intra_host)
    coord.publish("hello", json.dumps({"digest": _digest(fields), "fields": fields,
                                       "hostname": coord.hostnames[me]}))
    for p, text in coord.fetch_all("hello", "create this EPGroup").items():
        theirs = json.loads(text)
        coord.hostnames[p] = theirs["hostname"]
        if theirs["digest"] != _digest(fields):
            diffs = [f"{k}: {fields[k]} here vs {theirs['fields'].get(k)} on process {p}"
                     for k in fields if fields[k] != theirs["fields"].get(k)]
            raise ValueError(
                f"EPGroup #{index} over processes {list(processes)}: process {p} created it "
                f"with a different setup than this process ({me}): " + "; ".join(diffs) +
                ". Every process must create the same EPGroups (same EPConfig, mesh, axis, "
                "backend and hosts) in the same order")
    return coord
