"""`jax.lax.ragged_all_to_all` written from its documented semantics with all_to_all, for CPUs
(XLA:CPU: "UNIMPLEMENTED: ragged-all-to-all"), so that the hierarchical backend's ragged
inter-host engine and the offsets and sizes it passes are tested without a GPU.

Like the real collective it writes recv_sizes[i] rows of the i-th peer's slice and nothing
else, and rows a sender did not send (past its send_sizes) arrive as junk, so sizes that do
not agree on both sides corrupt the result instead of going unnoticed."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from jax import lax

from jax_ep.backends import hierarchical

JUNK = 7  # what a row past the sender's send_sizes holds on arrival


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                      *, axis_name, axis_index_groups=None):
    """operand [M, ...], output [M', ...], the four [G] int32 arrays (entry i for the i-th rank
    of the group) -> output with each peer's slice written at the offset that peer chose."""
    g, m = input_offsets.shape[0], operand.shape[0]
    rows = jnp.arange(m)
    slices = jnp.take(operand, jnp.minimum(input_offsets[:, None] + rows, m - 1), axis=0)
    sent = (rows[None] < send_sizes[:, None]).reshape((g, m) + (1,) * (operand.ndim - 1))
    slices = jnp.where(sent, slices, jnp.asarray(JUNK, operand.dtype))  # [G, M, ...]
    slices = lax.all_to_all(slices, axis_name, 0, 0, axis_index_groups=axis_index_groups)
    offsets = lax.all_to_all(output_offsets[:, None], axis_name, 0, 0,
                             axis_index_groups=axis_index_groups)[:, 0]
    out = output
    for i in range(g):
        at = jnp.where(rows < recv_sizes[i], offsets[i] + rows, output.shape[0])
        out = out.at[at].set(slices[i], mode="drop")
    return out


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """For the rest of a test: lax.ragged_all_to_all is the emulation above and CPU groups may
    pick inter_host='ragged'."""
    monkeypatch.setattr(lax, "ragged_all_to_all", ragged_all_to_all)
    monkeypatch.setattr(hierarchical, "RAGGED_PLATFORMS", ("gpu", "cpu"))
    monkeypatch.setattr(hierarchical, "ragged_flag_set", lambda xla_flags=None: True)
