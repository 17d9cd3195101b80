"""Varying-manual-axes types (shard_map's `vma`) for values XLA custom calls produce.

Inside shard_map, JAX tracks over which mesh axes a value varies. ffi_call requires its inputs
to agree and returns results that vary over none, although every rank computes its own. These
helpers give inputs and results the union of the inputs' axes, across JAX versions (pcast in
newer releases, pvary in older ones).
"""

from __future__ import annotations

import jax


def varying_axes(*values) -> tuple[str, ...]:
    axes: set = set()
    for v in values:
        aval = jax.typeof(v)
        vma = getattr(aval, "vma", None)
        if vma is None:
            vma = getattr(getattr(aval, "mat", None), "varying", frozenset())
        axes |= set(vma)
    return tuple(sorted(axes))


def make_varying(value, axes: tuple[str, ...]):
    missing = tuple(a for a in axes if a not in varying_axes(value))
    if not missing:
        return value
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(value, missing, to="varying")
    return jax.lax.pvary(value, missing)
