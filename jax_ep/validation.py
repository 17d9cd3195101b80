"""Trace-time checks of static inputs: every bad shape, dtype or context is a ValueError that
says what to change, raised before anything runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import row_rules
from jax_ep.config import (FP8_DTYPE, INT32_MAX, SUPPORTED_DTYPES, EPConfig, CallShape, dtype_name,
                           fp8_scale_cols, shape_for)
from jax_ep.types import Dispatched, Handle, PaddedHandle

if TYPE_CHECKING:
    from jax_ep.group import EPGroup

LAYOUTS = ("normal", "padded")


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(np.shape(a))


def check_open(group: "EPGroup", op: str) -> None:
    """A closed group's buffers are freed: using it must fail here, not in a kernel."""
    if getattr(group, "_closed", False):
        raise ValueError(f"jax_ep.{op}: {group!r} was closed (EPGroup.close() or the end of its "
                         f"`with` block) and cannot be used again; create a new EPGroup")


def check_portable_config(config: EPConfig, num_ranks: int) -> None:
    """EPConfig.portable: the sizes the cuda backends need at group creation, on every backend.

    Args:
      config: the group's EPConfig.
      num_ranks: N, the ranks of the group's EP axis.
    Raises ValueError saying what to set, or how to opt out.
    """
    if not config.portable:
        return
    if config.max_tokens is None or config.hidden_size is None:
        raise ValueError(
            "EPGroup: set EPConfig.max_tokens and EPConfig.hidden_size: the cuda backend (what "
            "backend='auto' picks on GPUs) sizes its buffers from them, and EPConfig.portable "
            "(the default) holds every backend to that so a model tested on CPU runs on GPUs. "
            "EPConfig(portable=False) opts out on the reference and hierarchical (xla) backends")
    if num_ranks * config.max_tokens * config.top_k > INT32_MAX:
        raise ValueError(
            f"EPGroup: N * max_tokens * top_k = {num_ranks} * {config.max_tokens} * "
            f"{config.top_k} must be < 2**31 (the cuda kernels' slot indices are int32; "
            f"EPConfig.portable holds every backend to that)")


def check_handle(handle: Any) -> None:
    """combine takes Dispatched.handle; say so for the usual slips (None, the Dispatched)."""
    if isinstance(handle, (Handle, PaddedHandle)):
        return
    if handle is None:
        raise ValueError("jax_ep.combine needs the handle of the dispatch that produced these "
                         "rows: pass d.handle, with d = jax_ep.dispatch(...)")
    if isinstance(handle, Dispatched):
        raise ValueError("jax_ep.combine: pass d.handle (the routing), not the Dispatched d "
                         "itself: combine(group, rows, d.handle, weights=d.weights)")
    got = (f"a jax.Array of shape {list(_shape(handle))}" if isinstance(handle, jax.Array)
           else type(handle).__name__)
    raise ValueError(f"jax_ep.combine: handle must be Dispatched.handle (a Handle or "
                     f"PaddedHandle) of the dispatch that produced these rows, got {got}")


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
    """Rows of `hidden` x `dtype`: EPConfig.hidden_size, then the backend's own rule and, when
    EPConfig.portable, the cuda kernels' rule on every backend."""
    config = group.config
    if config.hidden_size is not None and hidden != config.hidden_size:
        raise ValueError(f"jax_ep.{op}: rows have hidden size {hidden} but "
                         f"EPConfig.hidden_size={config.hidden_size}")
    group.backend.check_row_width(op, hidden, np.dtype(dtype))
    if config.portable:
        row_rules.check_row_width(config, op, hidden, np.dtype(dtype), on_cuda=False)


def check_dispatch(group: "EPGroup", x: Any, topk_idx: Any, topk_weights: Any,
                   x_scales: Any = None, layout: str = "normal",
                   num_sms: int | None = None) -> CallShape:
    """Checks dispatch's inputs; returns the call's static sizes."""
    check_open(group, "dispatch")
    check_inside_axis(group, "dispatch")
    config = group.config
    if len(_shape(x)) != 2:
        raise ValueError(f"jax_ep.dispatch: x must be [T, H] per rank, got shape {_shape(x)}")
    check_layout(group, layout)
    if x_scales is not None or dtype_name(x.dtype) == FP8_DTYPE:
        check_fp8(x, x_scales)
    else:
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
    return shape_for(config, group.num_ranks, t, h, num_sms)


def check_combine(group: "EPGroup", rows: Any, handle: "Handle", weights: Any,
                  num_sms: int | None = None) -> CallShape:
    """Checks combine's inputs; returns the call's static sizes."""
    check_open(group, "combine")
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
    return shape_for(config, group.num_ranks, t, h, num_sms)


# --- the padded (low-latency) layout and fp8 dispatch ------------------------------------------


def check_layout(group: "EPGroup", layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"jax_ep.dispatch: layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "padded" and not group.config.padded_layout:
        raise ValueError("jax_ep.dispatch(layout='padded') needs EPConfig(padded_layout=True, "
                         "max_tokens=...): the padded layout is sized (and, on the cuda "
                         "backend, its buffers allocated) from them")


def check_fp8(x: Any, x_scales: Any) -> None:
    """An fp8 x comes with its scales [T, H/128] float32, and scales only with an fp8 x."""
    if dtype_name(x.dtype) != FP8_DTYPE:
        raise ValueError(f"jax_ep.dispatch: x_scales is for fp8 tokens; x has dtype "
                         f"{dtype_name(x.dtype)}, expected {FP8_DTYPE} (jax_ep.quantize_fp8 "
                         f"makes both)")
    t, h = _shape(x)
    want = (t, fp8_scale_cols(h))
    if x_scales is None:
        raise ValueError(f"jax_ep.dispatch: x is {FP8_DTYPE}; pass its per-128-channel scales "
                         f"as x_scales={list(want)} float32 (jax_ep.quantize_fp8 makes both)")
    if h % 128:
        raise ValueError(f"jax_ep.dispatch: fp8 rows need H a multiple of 128, got H={h}")
    if _shape(x_scales) != want or x_scales.dtype != jnp.float32:
        raise ValueError(f"jax_ep.dispatch: x_scales must be float32 {list(want)} (one scale "
                         f"per 128 channels of each token), got {x_scales.dtype} "
                         f"{list(_shape(x_scales))}")


def check_padded_combine(group: "EPGroup", rows: Any, handle: "PaddedHandle",
                         weights: Any, num_sms: int | None = None) -> CallShape:
    """Checks combine's inputs for the padded layout; returns the call's static sizes."""
    check_open(group, "combine")
    check_inside_axis(group, "combine")
    config = group.config
    n, el = group.num_ranks, group.experts_per_rank
    m = config.max_tokens
    t = _shape(handle.slot_expert)[0]
    if len(_shape(rows)) != 3 or _shape(rows)[:2] != (el, n * m):
        raise ValueError(f"jax_ep.combine: rows of the padded layout must be [E_local, N * M, H]"
                         f" = [{el}, {n * m}, H] per rank, got {list(_shape(rows))}")
    check_rows_dtype("rows", "combine", rows)
    h = _shape(rows)[2]
    if (_shape(handle.slot_expert) != (t, config.top_k)
            or _shape(handle.recv_counts) != (el, n)):
        raise ValueError("jax_ep.combine: the handle does not belong to this group's padded "
                         "layout; pass the handle of the dispatch that produced these rows")
    if weights is not None and (_shape(weights) != (el, n * m) or weights.dtype != jnp.float32):
        raise ValueError(f"jax_ep.combine: weights must be float32 [E_local, N * M] = "
                         f"[{el}, {n * m}], got {weights.dtype} {list(_shape(weights))}")
    check_hidden(group, "combine", h, rows.dtype)
    return shape_for(config, n, t, h, num_sms)
