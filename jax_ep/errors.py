"""Errors jax_ep raises besides the trace-time ValueErrors."""


class EPRuntimeError(RuntimeError):
    """A failure a kernel reported after the fact: a peer that never arrived within
    EPConfig.timeout_s. The EP group is unusable afterwards."""
