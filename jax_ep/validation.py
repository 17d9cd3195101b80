"""Trace-time checks of static inputs: every bad shape, dtype or context is a ValueError that
says what to change, raised before anything runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep.config import SUPPORTED_DTYPES, Sizes, dtype_name, sizes_for

if TYPE_CHECKING:
    from jax_ep.group import EPGroup
    from jax_ep.types import Handle


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(np.shape(a))


def check_inside_axis(group: "EPGroup", op: str) -> None:
    """The op must be traced inside shard_map over the group's axis, of the group's size."""
    try:
        size = jax.lax.axis_size(group.axis_name)
    except NameError:
        raise ValueError(
            f"jax_ep.{op} must be called inside jax.shard_map over the mesh axis "
            f"{group.axis_name!r} of the group's mesh (no such axis is bound here); wrap the MoE "
            f"layer in shard_map(..., mesh=group.mesh) with that axis in its specs") from None
    if size != group.num_ranks:
        raise ValueError(
            f"jax_ep.{op}: axis {group.axis_name!r} has size {size} here but the group was built "
            f"for {group.num_ranks} ranks; use the EPGroup made from this mesh")


def check_rows_dtype(name: str, op: str, a: Any) -> None:
    if dtype_name(a.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"jax_ep.{op}: {name} has dtype {dtype_name(a.dtype)}; "
                         f"supported: {', '.join(SUPPORTED_DTYPES)}")


def check_hidden(group: "EPGroup", op: str, hidden: int, dtype: Any) -> None:
    config = group.config
    if config.hidden_size is not None and hidden != config.hidden_size:
        raise ValueError(f"jax_ep.{op}: rows have hidden size {hidden} but "
                         f"EPConfig.hidden_size={config.hidden_size}")
    group.backend.check_row_layout(op, hidden, np.dtype(dtype))


def check_dispatch(group: "EPGroup", x: Any, topk_idx: Any, topk_weights: Any) -> Sizes:
    """Checks dispatch's inputs; returns the call's static sizes."""
    check_inside_axis(group, "dispatch")
    config = group.config
    if len(_shape(x)) != 2:
        raise ValueError(f"jax_ep.dispatch: x must be [T, H] per rank, got shape {_shape(x)}")
    check_rows_dtype("x", "dispatch", x)
    t, h = _shape(x)
    k = config.top_k
    if _shape(topk_idx) != (t, k):
        raise ValueError(f"jax_ep.dispatch: topk_idx must be [T, k] = [{t}, {k}] "
                         f"(T from x, k = EPConfig.top_k), got {_shape(topk_idx)}")
    if topk_idx.dtype != jnp.int32:
        raise ValueError(f"jax_ep.dispatch: topk_idx must be int32, got {topk_idx.dtype}; "
                         f"use topk_idx.astype(jnp.int32)")
    if _shape(topk_weights) != (t, k):
        raise ValueError(f"jax_ep.dispatch: topk_weights must be [T, k] = [{t}, {k}], "
                         f"got {_shape(topk_weights)}")
    if topk_weights.dtype != jnp.float32:
        raise ValueError(f"jax_ep.dispatch: topk_weights must be float32, got "
                         f"{topk_weights.dtype}; use topk_weights.astype(jnp.float32)")
    if config.max_tokens is not None and t > config.max_tokens:
        raise ValueError(f"jax_ep.dispatch: T = {t} tokens per rank exceeds "
                         f"EPConfig.max_tokens={config.max_tokens}; raise max_tokens or "
                         f"shard the tokens over more devices")
    check_hidden(group, "dispatch", h, x.dtype)
    return sizes_for(config, group.num_ranks, t, h)


def check_combine(group: "EPGroup", rows: Any, handle: "Handle", weights: Any) -> Sizes:
    """Checks combine's inputs; returns the call's static sizes."""
    check_inside_axis(group, "combine")
    config = group.config
    if len(_shape(rows)) != 2:
        raise ValueError(f"jax_ep.combine: rows must be [C, H] per rank, got {_shape(rows)}")
    check_rows_dtype("rows", "combine", rows)
    c, h = _shape(rows)
    t = _shape(handle.dest_rank)[0]
    if _shape(handle.dest_rank) != (t, config.top_k) or _shape(handle.row_src) != (c,):
        raise ValueError(
            f"jax_ep.combine: rows [{c}, {h}] do not match the handle (made for "
            f"{_shape(handle.row_src)[0]} rows, {t} tokens); pass the handle of the dispatch "
            f"that produced these rows")
    expected = config.capacity_rows(group.num_ranks, t)
    if c != expected:
        raise ValueError(f"jax_ep.combine: rows have {c} rows but this group's capacity for "
                         f"T = {t} is {expected}")
    if weights is not None:
        if _shape(weights) != (c,) or weights.dtype != jnp.float32:
            raise ValueError(f"jax_ep.combine: weights must be float32 [C] = [{c}], got "
                             f"{weights.dtype} {_shape(weights)}")
    check_hidden(group, "combine", h, rows.dtype)
    return sizes_for(config, group.num_ranks, t, h)
