"""Static configuration of an EP group and the static sizes derived from it.

Every static size (experts per rank, receive capacity, buffer sizes) is computed here and
nowhere else, so the reference backend, the CUDA backend and the buffer allocation agree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")
MAX_TOP_K = 32
FP8_DTYPE = "float8_e4m3fn"  # dispatch may move rows in this dtype, with per-block scales
FP8_BLOCK = 128  # channels per float32 scale of an fp8 row


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class EPConfig:
    """What an EP group needs to know ahead of the first call.

    Attributes:
      num_experts: E, experts over the whole group; expert e lives on rank e // (E / N).
      top_k: k, routed slots per token (`topk_idx.shape[1]`).
      max_tokens: the largest T (tokens per rank) a call may pass. Required by the cuda backend,
        which sizes its communication buffers from it; the reference backend only checks it.
      hidden_size: H. When set, calls must pass rows of this width; the cuda backend sizes its
        staging buffers with it.
      dtype: the widest dtype that will be moved (bf16 activations with f32 gradients: float32).
      capacity_factor: receive capacity C = ceil(capacity_factor * T * k) rows per rank (at most
        the dropless bound N * T * k). None (default) is dropless.
      capacity: an exact C instead of capacity_factor (at most the dropless bound).
      num_sms: the most SMs (thread blocks) a cuda kernel occupies, so expert compute can overlap.
      timeout_s: how long a cuda kernel waits for a peer before it reports a timeout.
      debug: raise an error naming the bad value when topk_idx holds ids outside [-1, E).
      low_latency: enables `dispatch(..., layout="padded")` (the static decode layout, one round
        trip). Needs max_tokens; the cuda backend then also allocates the padded-layout buffers,
        2 * E * max_tokens rows for dispatch and as many for combine (double-buffered halves).
      padded_zero_fill: the padded layout's rows past each (expert, source) count are zero
        (True, the contract of every layout), or left unwritten (False: the decode fast path; at
        E_local * N * max_tokens rows, zeroing the padding costs far more than moving the data).
        combine and the gradients never read those rows either way; a grouped GEMM over the
        padded rows must then mask by Dispatched.recv_counts. The reference backend always
        writes zeros.
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
    low_latency: bool = False
    padded_zero_fill: bool = True

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any) -> None:
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EPConfig.{name} must be a positive int, got {value!r}")

        positive_int("num_experts", self.num_experts)
        positive_int("top_k", self.top_k)
        if self.top_k > MAX_TOP_K:
            raise ValueError(f"EPConfig.top_k={self.top_k} is above the supported {MAX_TOP_K}")
        if self.max_tokens is not None:
            positive_int("max_tokens", self.max_tokens)
        if self.hidden_size is not None:
            positive_int("hidden_size", self.hidden_size)
        if dtype_name(self.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(
                f"EPConfig.dtype must be one of {SUPPORTED_DTYPES}, got {dtype_name(self.dtype)}")
        if self.capacity_factor is not None and self.capacity is not None:
            raise ValueError("EPConfig: set capacity_factor or capacity, not both")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"EPConfig.capacity_factor must be > 0, got {self.capacity_factor}")
        if self.capacity is not None:
            positive_int("capacity", self.capacity)
        positive_int("num_sms", self.num_sms)
        if not self.timeout_s > 0:
            raise ValueError(f"EPConfig.timeout_s must be > 0, got {self.timeout_s}")
        if self.low_latency and self.max_tokens is None:
            raise ValueError("EPConfig(low_latency=True) needs max_tokens: the padded layout "
                             "holds max_tokens rows per (local expert, source rank)")

    def capacity_rows(self, num_ranks: int, num_tokens: int) -> int:
        """C: receive rows per rank for T = num_tokens tokens per rank on num_ranks ranks."""
        dropless = num_ranks * num_tokens * self.top_k
        if self.capacity is not None:
            return min(dropless, self.capacity)
        if self.capacity_factor is not None:
            return min(dropless, math.ceil(self.capacity_factor * num_tokens * self.top_k))
        return dropless


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The static sizes of one call on one rank (DESIGN's notation)."""

    num_ranks: int  # N
    num_experts: int  # E
    experts_per_rank: int  # E_local
    num_tokens: int  # T
    top_k: int  # k
    hidden: int  # H
    capacity: int  # C
    slots_per_source: int = 0  # M: padded-layout rows per (local expert, source rank)

    @property
    def num_slots(self) -> int:
        """T * k: routed slots sent by one rank (the stream length to each peer)."""
        return self.num_tokens * self.top_k


def sizes_for(config: EPConfig, num_ranks: int, num_tokens: int, hidden: int) -> Sizes:
    return Sizes(
        num_ranks=num_ranks,
        num_experts=config.num_experts,
        experts_per_rank=config.num_experts // num_ranks,
        num_tokens=num_tokens,
        top_k=config.top_k,
        hidden=hidden,
        capacity=config.capacity_rows(num_ranks, num_tokens),
        slots_per_source=config.max_tokens or num_tokens,
    )


def fp8_scale_cols(hidden: int) -> int:
    """Float32 scales per fp8 row of `hidden` channels (one per FP8_BLOCK channels)."""
    return -(-hidden // FP8_BLOCK)
