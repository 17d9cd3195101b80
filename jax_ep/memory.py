"""What a group allocates, answered before it exists: `buffer_bytes(config, num_ranks)` is the
bytes of device memory the cuda backend's communication buffer takes on each GPU
(docs/memory.md). It evaluates the one description of that buffer, cuda/buffer_map.h's
ComputeBufferMap, through the compiled extension, which every build has (CPU-only builds
included).
"""

from __future__ import annotations

from typing import Any

from jax_ep import _ext


def _buffer_map_bytes(group_ranks: int, limits: Any) -> int:
    ext = _ext.module()
    if not hasattr(ext, "buffer_map_bytes"):  # a build older than this Python package
        raise ImportError("jax_ep: the compiled extension predates buffer_bytes(); rebuild it with "
                          "`pip install -e .`")
    return int(ext.buffer_map_bytes(group_ranks, limits.num_experts, limits.top_k,
                                    limits.max_tokens, limits.max_capacity,
                                    limits.max_row_bytes, **limits.padded))


def buffer_bytes(config, num_ranks: int, *, num_hosts: int = 1) -> int:
    """Bytes of device memory the cuda backend allocates on each GPU for a group of `config`
    over `num_ranks` ranks, before creating it (one communication buffer per GPU and group).

    With num_hosts=1 (the cuda backend, ranks on one host): the normal layout's buffer, plus the
    padded layout's double-buffered regions when config.padded_layout. With num_hosts > 1 (the
    hierarchical backend with intra_host="cuda"): the buffer of its intra-host leg over the
    num_ranks / num_hosts GPUs of a host, with the same padded regions. The reference backend
    and intra_host="xla" keep no buffers (0 bytes); XLA's own temporaries for a call are not
    counted by either.

    Needs config.max_tokens and config.hidden_size (the sizes the buffers are made for).
    """
    from jax_ep.backends.cuda.state import BufferLimits, require_buffer_sizes
    from jax_ep.config import EPConfig

    if not isinstance(config, EPConfig):
        raise ValueError(f"buffer_bytes: config must be an EPConfig, got {type(config)}")
    require_buffer_sizes(config, "buffer_bytes")
    for name, value in (("num_ranks", num_ranks), ("num_hosts", num_hosts)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"buffer_bytes: {name} must be a positive int, got {value!r}")
    if config.num_experts % num_ranks:
        raise ValueError(f"buffer_bytes: num_experts={config.num_experts} is not divisible by "
                         f"num_ranks={num_ranks}")
    if num_ranks % num_hosts:
        raise ValueError(f"buffer_bytes: num_ranks={num_ranks} is not divisible by "
                         f"num_hosts={num_hosts}")
    per_host = num_ranks // num_hosts
    max_ranks = int(getattr(_ext.module(), "MAX_RANKS", 8))
    if per_host > max_ranks:
        raise ValueError(f"buffer_bytes: the cuda kernels connect at most {max_ranks} GPUs of a "
                         f"host, got {per_host} ranks per host")
    t_max = config.max_tokens
    # The limits each backend sizes its state with (jax_ep/backends/cuda/normal.py and
    # intra_host.py), through the one BufferLimits.of.
    if num_hosts == 1:
        limits = BufferLimits.of(config, t_max, config.capacity_rows(num_ranks, t_max))
    else:
        limits = BufferLimits.of(config, num_hosts * t_max, config.capacity_rows(num_ranks, t_max),
                                 padded_segments=num_hosts)
    return _buffer_map_bytes(per_host, limits)


def group_buffer_bytes(group) -> int | None:
    """Bytes of one local GPU's communication buffer of a live EPGroup; None when its backend
    keeps no buffers (reference, hierarchical over XLA)."""
    backend = getattr(group, "backend", None)
    backend = getattr(backend, "inner", backend)  # coordination.CheckedBackend
    for owner in (backend, getattr(backend, "intra", None)):
        if owner is not None and callable(getattr(owner, "buffer_bytes", None)):
            return int(owner.buffer_bytes())
    return None


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
