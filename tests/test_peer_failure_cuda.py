"""The cuda backend with a peer process that dies in the middle of a call (marker `gpu`): the
survivor's kernels time out after EPConfig.timeout_s and the group reports jax_ep's error naming
the rank and the phase, instead of hanging. (A peer that never arrives at all:
tests/test_cuda.py's test_a_peer_that_never_arrives_is_a_timeout_error.) 2 processes share one
GPU through CUDA IPC, as in tests/test_cuda.py."""

import pytest

from jax_ep import local_world

pytestmark = pytest.mark.gpu


def test_processes_peer_dies_mid_call_is_a_timeout_error():
    results = local_world.launch("tests.mp_worker", 2, ["--mode", "dies_mid_call"], timeout_s=240)
    (code, out), (_, out1) = results
    assert "rank 1: dying between dispatch and combine" in out1, out1[-3000:]
    assert "dies mid call test ok" in out, out[-3000:]
    assert code == 0, out[-3000:]
