"""Which host each rank of the EP axis lives on, and the rank groups the hierarchical backend's
collectives run over.

Ranks of one host are numbered by their order on the EP axis (their local index); the
inter-host leg pairs the ranks with the same local index on different hosts, as DeepEP sends
RDMA traffic to one GPU per node and forwards it over NVLink.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from jax.sharding import Mesh


@dataclasses.dataclass(frozen=True)
class Topology:
    """host_of[r]: host index (0, 1, ... by first appearance on the axis) of EP rank r."""

    host_of: tuple[int, ...]

    @property
    def num_ranks(self) -> int:
        return len(self.host_of)

    @property
    def num_hosts(self) -> int:
        return max(self.host_of) + 1

    @property
    def local_of(self) -> tuple[int, ...]:
        """local_of[r]: r's position among the ranks of its host, in axis order."""
        seen = [0] * self.num_hosts
        out = []
        for h in self.host_of:
            out.append(seen[h])
            seen[h] += 1
        return tuple(out)

    @property
    def ranks_per_host(self) -> int:
        """L; only meaningful when check_uniform() passed."""
        return self.num_ranks // self.num_hosts

    def check_uniform(self, who: str) -> None:
        counts = np.bincount(np.asarray(self.host_of))
        if len(set(counts.tolist())) != 1:
            raise ValueError(
                f"{who} needs the same number of EP ranks on every host, got "
                f"{dict(enumerate(counts.tolist()))} ranks per host (hosts={list(self.host_of)}); "
                f"use backend='reference' or an EP axis with equal slices per host")

    def rank_at(self) -> np.ndarray:
        """[num_hosts, L] int32: the rank of each (host, local index)."""
        table = np.zeros((self.num_hosts, self.ranks_per_host), np.int32)
        for r, (h, l) in enumerate(zip(self.host_of, self.local_of)):
            table[h, l] = r
        return table

    def intra_groups(self) -> list[list[int]]:
        """The ranks of each host, in local order (axis_index_groups of the intra-host leg)."""
        return self.rank_at().tolist()

    def inter_groups(self) -> list[list[int]]:
        """The ranks of each local index, in host order (axis_index_groups of the inter-host
        leg)."""
        return self.rank_at().T.tolist()


def from_labels(hosts: Sequence[Any], num_ranks: int) -> Topology:
    """Topology from one host label per EP rank (any hashable labels: ints, host names)."""
    hosts = list(hosts)
    if len(hosts) != num_ranks:
        raise ValueError(f"EPGroup: hosts must give the host of each of the {num_ranks} ranks of "
                         f"the EP axis, got {len(hosts)} entries: {hosts}")
    index: dict[Any, int] = {}
    return Topology(tuple(index.setdefault(h, len(index)) for h in hosts))


def discover(mesh: Mesh, axis_name: str, hostnames: dict[int, str]) -> Topology:
    """The host of each EP rank from its device's process and that process's host name
    (hostnames: process index -> name, from the group's coordination). Every EP slice of a
    larger mesh must show the same pattern, since one compiled program serves them all."""
    axis = mesh.axis_names.index(axis_name)
    devices = np.moveaxis(mesh.devices, axis, -1).reshape(-1, mesh.devices.shape[axis])
    patterns = {from_labels([hostnames.get(d.process_index, "?") for d in row], len(row))
                for row in devices}
    if len(patterns) != 1:
        raise ValueError(f"EPGroup: the EP slices of the mesh lie on hosts in different patterns "
                         f"({sorted(p.host_of for p in patterns)}); pass hosts= explicitly or "
                         f"lay the mesh out so every slice spans its hosts alike")
    return patterns.pop()


def ep_slices(mesh: Mesh, axis_name: str) -> dict[tuple[int, ...], list[Any]]:
    """The devices of each EP group (one per index of the mesh's other axes), in rank order."""
    axis = mesh.axis_names.index(axis_name)
    devices = np.moveaxis(mesh.devices, axis, -1)
    return {idx: list(devices[idx]) for idx in np.ndindex(devices.shape[:-1])}
