"""The processes that hold one EP group's devices, kept in step through the jax.distributed
key-value store.

Creating a group is collective over those processes: each publishes what it built (a digest of
EPConfig, mesh shape and axes, EP axis, backend, hosts and the group's creation index) and checks
the others', so a mismatch is a ValueError naming the process and the fields that differ instead
of a kernel that waits on buffers nobody allocated. Every wait on a peer is bounded (EPConfig's
timeout_s) and names the process that did not arrive. close() waits for every peer before
anything is freed, so no process frees a buffer a peer may still write.

Waits that decide whether a group (or a call) goes ahead end the same way on every process: each
process owns one *slot* per step, a KV key that the first writer sets (the store refuses to
overwrite it). A process arriving writes its record there; one that gives up on a peer writes
"abandoned" into the peer's slot. Whichever came first is what every process reads, the late
peer included, so either all go ahead or all raise (EPPeerError).

On the CPU backends every dispatch, redispatch and combine makes such a step (CallChecks) before
its first collective, because XLA's gloo collectives wait 30 minutes for a missing peer and
name nobody (docs/multihost.md).

With one process nothing is published and every wait returns at once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from jax_ep.config import EPConfig
from jax_ep.errors import EPPeerError

# Creation index of the next group over each set of processes: the processes agree on it only
# if they create their groups in the same order, which is what makes KV keys line up.
_creation_counts: dict[tuple[int, ...], int] = {}
# Processes that a wait of this process gave up on (creation, a call, a close). close() does not
# wait for them again, so closing many groups with a dead peer costs one timeout_s in all.
_unresponsive: set[int] = set()

ARRIVED, ABANDONED, CLOSED = "arrived", "abandoned", "closed"
# The first process of a group deletes the call entries every this many calls, on a thread of
# its own: a KV round trip less on every call's path.
_FORGET_EVERY = 64
_janitor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jax_ep_kv_cleanup")


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
             hosts: Sequence[Any] | None, intra_host: str = "auto",
             inter_host: str = "auto") -> dict[str, str]:
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
        "inter_host": repr(inter_host),
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

    @property
    def peers(self) -> list[int]:
        return [p for p in self.processes if p != self.me]

    @property
    def name(self) -> str:
        """How messages name the group."""
        return f"jax_ep: EPGroup #{self.index} over processes {list(self.processes)}"

    def publish(self, name: str, value: str) -> None:
        """Sets `<prefix>/<name>/<me>` for the peers to read."""
        self.client.key_value_set(f"{self.prefix}/{name}/{self.me}", value)

    def fetch(self, process: int, name: str, what: str, deadline: float | None = None) -> str:
        """Reads `<prefix>/<name>/<process>`, waiting until `deadline` (time.monotonic()) or
        timeout_s; a peer that never publishes is an EPPeerError (a TimeoutError) naming it and
        `what` it failed to do."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout_s
        try:
            return self.client.blocking_key_value_get(f"{self.prefix}/{name}/{process}",
                                                      _ms_until(deadline))
        except Exception as e:  # the client raises a generic JaxRuntimeError on DEADLINE_EXCEEDED
            _unresponsive.add(process)
            raise EPPeerError(
                f"{self.name}: process {process} did not {what} within {self.timeout_s:g} s "
                f"(EPConfig.timeout_s). Is it running, and does it create the same EPGroups in "
                f"the same order?") from e

    def fetch_all(self, name: str, what: str) -> dict[int, str]:
        """Every peer's `<name>` under one deadline; raises naming the first peer missing."""
        deadline = time.monotonic() + self.timeout_s
        return {p: self.fetch(p, name, what, deadline) for p in self.peers}

    def barrier(self, name: str, deadline: float | None = None) -> None:
        """Returns once every process of the group reached barrier `name`, or `deadline`
        (default: timeout_s from now) passed; then an EPPeerError names the missing processes.
        A process that a wait already gave up on is not waited for again, only looked up."""
        if not self.spans_processes:
            return
        if deadline is None:
            deadline = time.monotonic() + self.timeout_s
        self.publish(name, "1")
        missing = []
        for p in self.peers:
            try:
                self.fetch(p, name, "", time.monotonic() if p in _unresponsive else deadline)
            except EPPeerError:
                missing.append(p)
        if missing:
            who = (f"process {missing[0]}" if len(missing) == 1 else f"processes {missing}")
            raise EPPeerError(f"{self.name}: {who} did not reach '{name}' of the group within "
                              f"{self.timeout_s:g} s (EPConfig.timeout_s), or had already "
                              f"failed to arrive in time before")

    # --- slots: one KV key per (step, process) that the first writer sets ----------------------

    def _key(self, slot: str, process: int) -> str:
        return f"{self.prefix}/{slot}/{process}"

    def claim(self, slot: str, process: int, record: dict, what: str) -> dict:
        """Writes `record` into `process`'s entry of `slot` unless someone wrote it first;
        returns what the entry holds, the same on every process."""
        key = self._key(slot, process)
        try:
            self.client.key_value_set(key, json.dumps(record))
            return record
        except Exception as refused:  # ALREADY_EXISTS, or the coordination service is gone
            try:
                return json.loads(self.client.key_value_try_get(key))
            except Exception:
                raise EPPeerError(
                    f"{self.name}: the jax.distributed coordination service (run by process 0) "
                    f"does not answer while this process ({self.me}) waits to {what}; process 0 "
                    f"probably died ({refused})") from refused

    def _await(self, slot: str, process: int, what: str, deadline: float) -> dict:
        """`process`'s record in `slot`; one that is not there by `deadline` is claimed as
        abandoned (if it arrives meanwhile, the claim returns its arrival instead)."""
        try:
            record = json.loads(self.client.blocking_key_value_get(self._key(slot, process),
                                                                   _ms_until(deadline)))
        except Exception:
            record = self.claim(slot, process, {"state": ABANDONED, "by": self.me}, what)
        if record.get("state") == ABANDONED:
            _unresponsive.add(process)
            by = record["by"]
            who = "this process" if by == self.me else f"process {by}"
            raise EPPeerError(
                f"{self.name}: process {process} did not {what} within {self.timeout_s:g} s "
                f"(EPConfig.timeout_s; {who} gave up waiting for it). It died, stalls, or "
                f"skipped a jax_ep call: every process must create the same EPGroups and make "
                f"the same jax_ep calls in the same order. The group is unusable now.")
        if record.get("state") == CLOSED:
            raise EPPeerError(
                f"{self.name}: process {process} closed the group where this process "
                f"({self.me}) expected it to {what}: the processes' jax_ep calls diverged. "
                f"The group is unusable now.")
        return record

    def agree(self, slot: str, record: dict, what: str) -> dict[int, dict]:
        """Claims this process's entry of `slot` with `record` and returns every peer's, all
        within timeout_s; raises EPPeerError naming the first peer that is missing (or that
        gave up on this process), which every process of the group then raises too."""
        deadline = time.monotonic() + self.timeout_s
        mine = self.claim(slot, self.me, record, what)
        if mine.get("state") == ABANDONED:
            raise EPPeerError(
                f"{self.name}: process {mine['by']} gave up waiting for this process "
                f"({self.me}) to {what} after {self.timeout_s:g} s (EPConfig.timeout_s): this "
                f"process came too late or skipped a jax_ep call. The group is unusable now.")
        return {p: self._await(slot, p, what, deadline) for p in self.peers}

    def forget(self, slots: Sequence[str]) -> None:
        """Deletes every process's entry of `slots` (once no process can read them any more)."""
        for slot in slots:
            try:
                self.client.key_value_delete(f"{self.prefix}/{slot}")
            except Exception:  # only memory in the coordination service is at stake
                pass


def _ms_until(deadline: float) -> int:
    return max(1, int((deadline - time.monotonic()) * 1000))


def create(mesh: Mesh, axis_name: str, config: EPConfig, *, backend: str,
           hosts: Sequence[Any] | None, intra_host: str = "auto",
           inter_host: str = "auto") -> GroupCoordinator:
    """The collective part of EPGroup creation: checks every process built the same group.

    Raises ValueError naming the process and the differing fields when setups differ, and
    EPPeerError (a TimeoutError) naming the process that did not create the group within
    config.timeout_s; a process that arrives after a peer gave up on it raises it too, so no
    process is left with a group its peers do not serve.
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
    fields = describe(config, mesh, axis_name, index, backend, hosts, intra_host, inter_host)
    hello = {"state": ARRIVED, "digest": _digest(fields), "fields": fields,
             "hostname": coord.hostnames[me]}
    for p, theirs in coord.agree("hello", hello, "create this EPGroup").items():
        coord.hostnames[p] = theirs["hostname"]
        if theirs["digest"] != hello["digest"]:
            diffs = [f"{k}: {fields[k]} here vs {theirs['fields'].get(k)} on process {p}"
                     for k in fields if fields[k] != theirs["fields"].get(k)]
            raise ValueError(
                f"EPGroup #{index} over processes {list(processes)}: process {p} created it "
                f"with a different setup than this process ({me}): " + "; ".join(diffs) +
                ". Every process must create the same EPGroups (same EPConfig, mesh, axis, "
                "backend and hosts) in the same order")
    return coord


class _Outcome:
    """One call's check, shared by this process's devices: the first to reach the call runs it."""

    def __init__(self, consumers: int):
        self.done = threading.Event()
        self.error: str | None = None
        self.left = consumers


class CallChecks:
    """The per-call step of a CPU backend whose group spans processes.

    Before the first collective of every dispatch, redispatch and combine, a host callback (that
    the call's inputs wait for) claims this process's slot `calls/<n>` with the phase and waits,
    at most timeout_s, for every peer's: a peer that died, stalls or skipped the call is an
    EPPeerError naming it, the call number and the phase, instead of a gloo collective that waits
    30 minutes. After the first failure every later call of the group fails at once with the
    same message (group.check() raises it).

    Call n is counted per device (each of this process's devices runs the callback once per
    call, in its own thread); the first device to reach call n checks it for all of them.
    """

    def __init__(self, coord: GroupCoordinator, mesh: Mesh):
        self.coord = coord
        self.mesh = mesh
        self.error: str | None = None
        self.calls = 0  # calls this process has started checking
        self._lock = threading.Lock()
        self._seen: dict[tuple, int] = {}  # device coordinates -> calls it reached
        self._sharing: dict[tuple, int] = {}  # device coordinates -> local devices that have them
        self._pending: dict[int, _Outcome] = {}
        self._local = sum(d.process_index == coord.me for d in mesh.devices.flat)

    def guard(self, phase: str, tree: Any) -> Any:
        """`tree` (arrays inside shard_map, None leaves allowed), made to wait for the check of
        this call (`phase`: "dispatch", "redispatch", "combine")."""
        manual = jax.sharding.get_abstract_mesh().manual_axes
        axes = tuple(a for a in self.mesh.axis_names if a in manual)
        leaves, treedef = jax.tree.flatten(tree)
        # Real data dependencies on both sides (XLA:CPU drops optimization barriers): the
        # callback reads one element of every input, so it runs after the previous call's
        # collectives made them; every integer input (routing: each collective of every
        # backend depends on one) adds its result, a runtime 0 that XLA cannot fold away.
        probe = sum(jnp.sum(leaf.reshape(-1)[:1]).astype(jnp.float32) for leaf in leaves)
        coords = jnp.asarray([lax.axis_index(a) for a in axes], jnp.int32).reshape(len(axes))
        # A pure callback (no effect): remat and scan accept it, and its result, which every
        # collective of the call depends on, keeps XLA from dropping or hoisting it. Every
        # process runs the same program, so any re-execution (remat) happens everywhere alike.
        token = jax.pure_callback(functools.partial(self._on_device, phase, axes),
                                  jax.ShapeDtypeStruct((), jnp.int32), coords, probe,
                                  vmap_method="sequential")
        leaves = [leaf + token.astype(leaf.dtype) if jnp.issubdtype(leaf.dtype, jnp.integer)
                  else leaf for leaf in leaves]
        return jax.tree.unflatten(treedef, leaves)

    def _on_device(self, phase: str, axes: tuple[str, ...], coords, probe) -> np.ndarray:
        del probe  # only there to order the callback after the call's inputs
        key = (axes, tuple(int(c) for c in np.asarray(coords)))
        with self._lock:
            seen = self._seen.get(key, 0)
            self._seen[key] = seen + 1
            call = seen // self._devices_at(key)
            outcome = self._pending.get(call)
            lead = outcome is None
            if lead:
                outcome = self._pending[call] = _Outcome(self._local)
        if lead:
            try:
                outcome.error = self._check(call, phase)
            except Exception as e:  # never leave this process's other devices waiting
                outcome.error = self.error = f"{self.coord.name}: call {call} ({phase}): {e!r}"
            finally:
                outcome.done.set()
        else:  # the lead's check is bounded by timeout_s
            outcome.done.wait()
        with self._lock:
            outcome.left -= 1
            if outcome.left <= 0:
                self._pending.pop(call, None)
        if outcome.error:
            raise EPPeerError(outcome.error)
        return np.int32(0)

    def _devices_at(self, key: tuple) -> int:
        """This process's devices with the given coordinates on the shard_map's manual axes
        (more than one when some mesh axes are not manual); each reaches every call once."""
        if key not in self._sharing:
            axes, coords = key
            where = [self.mesh.axis_names.index(a) for a in axes]
            self._sharing[key] = max(1, sum(
                self.mesh.devices[pos].process_index == self.coord.me
                and all(pos[w] == c for w, c in zip(where, coords))
                for pos in np.ndindex(self.mesh.devices.shape)))
        return self._sharing[key]

    def _check(self, call: int, phase: str) -> str | None:
        """Call `call`'s step; returns the error message, or None when every process is there.
        The phase only names the call in messages: XLA may run two independent jax_ep calls of
        one program in either order, so processes may legitimately differ in it."""
        if self.error:
            return self.error
        self.calls = max(self.calls, call + 1)
        what = f"reach call {call} ({phase})"
        try:
            self.coord.agree(f"calls/{call}", {"state": ARRIVED, "phase": phase}, what)
        except EPPeerError as e:
            self.error = str(e)
            return self.error
        # Every peer reached this call, so each has read all entries of the calls before it.
        if call and call % _FORGET_EVERY == 0 and self.coord.me == self.coord.processes[0]:
            _janitor.submit(self.coord.forget,
                            [f"calls/{c}" for c in range(call - _FORGET_EVERY, call)])
        return None

    def close(self) -> None:
        """Marks this process's next call as never coming: a peer waiting for it fails at once
        (naming this process) instead of after timeout_s."""
        try:
            self.coord.claim(f"calls/{self.calls}", self.coord.me, {"state": CLOSED},
                             "close the group")
        except EPPeerError:
            pass  # the coordination service is gone: nobody waits on it any more

    def check(self) -> None:
        """Raises the group's first failure (EPPeerError), if any."""
        if self.error:
            raise EPPeerError(self.error)


class CheckedBackend:
    """A CPU backend's operations (either layout) over several processes, with CallChecks'
    step before each one. Everything else (check_row_width, attributes) is the wrapped
    object's."""

    def __init__(self, backend: Any, calls: CallChecks):
        self.inner = backend
        self.calls = calls

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def check(self) -> None:
        self.calls.check()
        self.inner.check()

    def dispatch(self, x, topk_idx, topk_weights, sizes, *rest):
        x, topk_idx, topk_weights = self.calls.guard("dispatch", (x, topk_idx, topk_weights))
        return self.inner.dispatch(x, topk_idx, topk_weights, sizes, *rest)

    def redispatch(self, x, slot_values, handle, sizes):
        x, slot_values, handle = self.calls.guard("redispatch", (x, slot_values, handle))
        return self.inner.redispatch(x, slot_values, handle, sizes)

    def combine(self, rows, row_scale, row_values, handle, sizes):
        rows, row_scale, row_values, handle = self.calls.guard(
            "combine", (rows, row_scale, row_values, handle))
        return self.inner.combine(rows, row_scale, row_values, handle, sizes)
