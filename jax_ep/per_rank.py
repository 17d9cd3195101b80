"""Per-rank programs over an EP mesh, for tests, benchmarks and examples: inputs and outputs
carry a leading axis of size R (every rank of the mesh, data-major), so a rank's values are
`a[r]` on the host whatever the processes and devices.

    out = per_rank.program(mesh, lambda x, idx, w: jax_ep.dispatch(group, x, idx, w))(
        per_rank.to_global(x, mesh), ...)      # x [R, T, H] numpy
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def program(mesh: Mesh, fn: Callable) -> Callable:
    """jit(shard_map(fn)) over every axis of `mesh`, one rank's slice of each [R, ...] input
    per call of fn; fn's outputs come back stacked [R, ...] (scalars per rank as [R])."""
    spec = P(tuple(mesh.axis_names))

    def body(*args):
        out = fn(*jax.tree.map(lambda a: a[0], args))
        return jax.tree.map(lambda o: o[None], out)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))


def to_global(a: np.ndarray, mesh: Mesh) -> jax.Array:
    """[R, ...] numpy (entry r for rank r) -> a global array with one rank per device; every
    process passes the whole array and places the ranks it holds."""
    sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def local_parts(tree) -> dict[int, object]:
    """{rank: pytree of numpy arrays} for the ranks this process holds of a per-rank output."""
    leaves, treedef = jax.tree.flatten(tree)
    ranks = sorted(s.index[0].start or 0 for s in leaves[0].addressable_shards)
    out = {}
    for r in ranks:
        picked = []
        for leaf in leaves:
            shard = next(s for s in leaf.addressable_shards if (s.index[0].start or 0) == r)
            picked.append(np.asarray(shard.data)[0])
        out[r] = jax.tree.unflatten(treedef, picked)
    return out
