"""Errors jax_ep raises besides the trace-time ValueErrors."""


class EPRuntimeError(RuntimeError):
    """A failure a kernel reported after the fact: a peer that never arrived within
    EPConfig.timeout_s. The EP group is unusable afterwards."""


class InvalidExpertIdError(ValueError):
    """EPConfig(debug=True) found expert ids outside [-1, E) in topk_idx; the message names the
    first one, its token, slot and rank. It is raised in a host callback on every rank (so none
    waits in a collective for the others), hence it reaches the caller inside JAX's runtime
    error, with this message. `echo` marks the ranks whose copy is not logged."""

    echo: bool = False


class EPPeerError(EPRuntimeError, TimeoutError):
    """A peer process of an EP group did not take part in time: it died, stalls, or skipped a
    jax_ep call (or created a different sequence of groups). The message names jax_ep, the
    group, the peer process and the phase (creation, call n's dispatch / redispatch / combine,
    close). Raised at group creation it is the TimeoutError EPGroup documents; raised during a
    call of a CPU backend it comes from a host callback, so it reaches the caller inside JAX's
    runtime error with this message, and group.check() raises it afterwards. The group is
    unusable afterwards."""
