"""Static configuration of an EP group and the static sizes derived from it.

Every static size (experts per rank, receive capacity, buffer sizes) is computed here and
nowhere else, so the reference backend, the CUDA backend and the buffer allocation agree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")
MAX_TOP_K = 32
FP8_DTYPE = "float8_e4m3fn"  # dispatch may move rows in this dtype, with per-block scales
FP8_BLOCK = 128  # channels per float32 scale of an fp8 row
INT32_MAX = 2**31 - 1  # the kernels index rows, slots and experts in int32
# The longest wait a config may ask for: waits on peers are made in int32 milliseconds.
MAX_TIMEOUT_S = INT32_MAX // 1000
# Spellings from other frameworks, named in the error (not accepted: the stored name is numpy's).
_DTYPE_SPELLINGS = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "fp32": "float32",
                    "f32": "float32"}


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def _is_int(value: Any) -> bool:
    # bool is an int subclass; True as a size is always a mistake.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _size(name: str, value: Any) -> int:
    """A positive int that fits the kernels' int32 arithmetic, as a Python int."""
    if not _is_int(value) or not 1 <= value <= INT32_MAX:
        raise ValueError(f"EPConfig.{name} must be a positive int below 2**31, got {value!r}")
    return int(value)


def _positive_float(name: str, value: Any, upper: float = math.inf) -> float:
    """A finite real in (0, upper], as a Python float."""
    real = _is_int(value) or isinstance(value, (float, np.floating))
    if not real or not math.isfinite(value) or not 0 < value <= upper:
        limit = f" and at most {upper:.0f}" if upper < math.inf else ""
        raise ValueError(f"EPConfig.{name} must be a finite number > 0{limit}, got {value!r}")
    return float(value)


def _flag(name: str, value: Any) -> bool:
    # A string such as "false" is truthy: only real booleans say what they mean.
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"EPConfig.{name} must be True or False, got {value!r}")
    return bool(value)


def _config_dtype(value: Any) -> str:
    """The canonical numpy name of a supported dtype given in any spelling numpy knows."""
    hint = ""
    if isinstance(value, str) and value.lower() in _DTYPE_SPELLINGS:
        hint = f" (did you mean {_DTYPE_SPELLINGS[value.lower()]!r}?)"
    try:
        name = jnp.dtype(value).name
    except (TypeError, ValueError):
        name = None
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"EPConfig.dtype must be one of {', '.join(SUPPORTED_DTYPES)} (a name "
                         f"or the numpy/jax.numpy type), got {value!r}{hint}")
    return name


@dataclasses.dataclass(frozen=True)
class EPConfig:
    """What an EP group needs to know ahead of the first call.

    Every field is checked and normalised at construction (sizes to int, floats to float, dtype
    to its numpy name such as "bfloat16"), so configs spelled differently but meaning the same
    (jnp.bfloat16 vs "bfloat16", np.int64(16) vs 16) are equal, hash alike and print alike.

    Attributes:
      num_experts: E, experts over the whole group; expert e lives on rank e // (E / N).
      top_k: k, routed slots per token (`topk_idx.shape[1]`).
      max_tokens: the largest T (tokens per rank) a call may pass. Required by the cuda backend,
        which sizes its communication buffers from it, and by every backend when portable.
      hidden_size: H. When set, calls must pass rows of this width; the cuda backend sizes its
        staging buffers with it. Required like max_tokens.
      dtype: the widest dtype that will be moved (bf16 activations with f32 gradients: float32).
      capacity_factor: receive capacity C = ceil(capacity_factor * T * k) rows per rank (at most
        the dropless bound N * T * k). None (default) is dropless.
      capacity: an exact C instead of capacity_factor (at most the dropless bound).
      num_sms: the most SMs (thread blocks) a cuda kernel occupies, so expert compute can overlap.
      timeout_s: how long a cuda kernel waits for a peer before it reports a timeout.
      debug: raise an error naming the bad id, its token and rank when topk_idx holds ids outside
        [-1, E) (works under jit, grad, jax.checkpoint and scan).
      padded_layout: enables `dispatch(..., layout="padded")` (the static decode layout, one round
        trip). Needs max_tokens; the cuda backend then also allocates the padded-layout buffers,
        2 * E * max_tokens rows for dispatch and as many for combine (double-buffered halves).
      padded_zero_fill: the padded layout's rows past each (expert, source) count are zero
        (True, the contract of every layout), or left unwritten (False: the decode fast path; at
        E_local * N * max_tokens rows, zeroing the padding costs far more than moving the data).
        combine and the gradients never read those rows either way; a grouped GEMM over the
        padded rows must then mask by Dispatched.recv_counts. The reference backend always
        writes zeros.
      portable: every backend enforces what the cuda kernels need (max_tokens and hidden_size
        set at group creation, rows whole 16-byte vectors no wider than hidden_size x dtype),
        so a model that runs on the CPU backends runs on GPUs (backend="auto" picks cuda
        there). False lifts these limits where a backend does not need them itself (reference,
        hierarchical with intra_host="xla"); the cuda backends enforce them regardless.
      f32_partials: the hierarchical backend's combine sends each host's partial sum back across
        hosts in float32 (True: rounded once, at the end) instead of the rows' dtype (False, the
        default: bf16 rows halve those bytes; the error this adds is in docs/multihost.md).
        Other backends round once anyway.
    """

    num_experts: int
    top_k: int
    max_tokens: int | None = None
    hidden_size: int | None = None
    dtype: Any = "bfloat16"
    capacity_factor: float | None = None
    capacity: int | None = None
    num_sms: int = 24
    timeout_s: float = 30.0
    debug: bool = False
    padded_layout: bool = False
    padded_zero_fill: bool = True
    portable: bool = True
    f32_partials: bool = False

    def __post_init__(self) -> None:
        for name, value in self._normalised_fields().items():
            object.__setattr__(self, name, value)  # frozen: the one place fields are rewritten
        if self.top_k > MAX_TOP_K:
            raise ValueError(f"EPConfig.top_k={self.top_k} is above the supported {MAX_TOP_K}")
        if self.capacity_factor is not None and self.capacity is not None:
            raise ValueError("EPConfig: set capacity_factor or capacity, not both")
        if self.padded_layout and self.max_tokens is None:
            raise ValueError("EPConfig(padded_layout=True) needs max_tokens: the padded layout "
                             "holds max_tokens rows per (local expert, source rank)")

    def _normalised_fields(self) -> dict[str, Any]:
        """Every field checked for type and range, in its one canonical spelling."""
        def optional(check, name: str, *args):
            value = getattr(self, name)
            return None if value is None else check(name, value, *args)

        return dict(
            num_experts=_size("num_experts", self.num_experts),
            top_k=_size("top_k", self.top_k),
            max_tokens=optional(_size, "max_tokens"),
            hidden_size=optional(_size, "hidden_size"),
            dtype=_config_dtype(self.dtype),
            capacity_factor=optional(_positive_float, "capacity_factor"),
            capacity=optional(_size, "capacity"),
            num_sms=_size("num_sms", self.num_sms),
            timeout_s=_positive_float("timeout_s", self.timeout_s, MAX_TIMEOUT_S),
            debug=_flag("debug", self.debug),
            padded_layout=_flag("padded_layout", self.padded_layout),
            padded_zero_fill=_flag("padded_zero_fill", self.padded_zero_fill),
            portable=_flag("portable", self.portable),
            f32_partials=_flag("f32_partials", self.f32_partials),
        )

    def capacity_rows(self, num_ranks: int, num_tokens: int) -> int:
        """C: receive rows per rank for T = num_tokens tokens per rank on num_ranks ranks."""
        dropless = num_ranks * num_tokens * self.top_k
        if self.capacity is not None:
            return min(dropless, self.capacity)
        if self.capacity_factor is not None:
            # Clamped before ceil: a huge factor times T * k may round to inf.
            return min(dropless, math.ceil(min(self.capacity_factor * num_tokens * self.top_k,
                                               dropless)))
        return dropless


@dataclasses.dataclass(frozen=True)
class CallShape:
    """The static sizes of one call on one rank (docs/contract.md's notation), and the SM
    budget its cuda kernels run with (the C++ side's CallShape holds the same fields)."""

    num_ranks: int  # N
    num_experts: int  # E
    experts_per_rank: int  # E_local
    num_tokens: int  # T
    top_k: int  # k
    hidden: int  # H
    capacity: int  # C
    slots_per_source: int = 0  # M: padded-layout rows per (local expert, source rank)
    num_sms: int = 24  # thread blocks of each multi-block cuda kernel of this call

    @property
    def num_slots(self) -> int:
        """T * k: routed slots sent by one rank (the stream length to each peer)."""
        return self.num_tokens * self.top_k


def shape_for(config: EPConfig, num_ranks: int, num_tokens: int, hidden: int,
              num_sms: int | None = None) -> CallShape:
    """The call's shape; num_sms overrides EPConfig.num_sms for this call only."""
    if num_sms is not None and (not isinstance(num_sms, (int, np.integer))
                                or isinstance(num_sms, bool) or not 1 <= num_sms < 2**31):
        raise ValueError(f"jax_ep: num_sms must be a positive int (thread blocks per kernel), "
                         f"got {num_sms!r}")
    return CallShape(
        num_ranks=num_ranks,
        num_experts=config.num_experts,
        experts_per_rank=config.num_experts // num_ranks,
        num_tokens=num_tokens,
        top_k=config.top_k,
        hidden=hidden,
        capacity=config.capacity_rows(num_ranks, num_tokens),
        slots_per_source=config.max_tokens or num_tokens,
        num_sms=int(num_sms) if num_sms is not None else config.num_sms,
    )


def fp8_scale_cols(hidden: int) -> int:
    """Float32 scales per fp8 row of `hidden` channels (one per FP8_BLOCK channels)."""
    return -(-hidden // FP8_BLOCK)
