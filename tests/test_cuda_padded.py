"""The padded (low-latency) layout and fp8 dispatch: the GPU checks of
tests/cuda_padded_checks.py on the cuda backend (marker `gpu`: one GPU, and N = 2, 4, 8
processes sharing it), and the same checks on the reference backend on CPU."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from tests import cuda_padded_checks as checks
from tests import harness
from jax_ep import local_world


def one_gpu_mesh() -> Mesh:
    return Mesh(np.array(jax.devices("gpu")[:1]), ("expert",))


# --- CPU: the checks themselves are right ------------------------------------------------------


@pytest.mark.parametrize("case", checks.CASES[:3] + checks.CASES[4:8], ids=lambda c: c.name)
def test_checks_pass_on_reference(case):
    assert checks.check_case(harness.make_mesh(4), case, backend="reference") == 4


def test_fp8_check_passes_on_reference():
    assert checks.check_fp8(harness.make_mesh(4), backend="reference") == 4


def test_scan_check_passes_on_reference():
    assert checks.check_scan_rounds(harness.make_mesh(2), rounds=4, backend="reference") == 2


# --- GPU ---------------------------------------------------------------------------------------


def _padded_on_one_gpu(case, seed: int, groups):
    """Padded dispatch and weighted combine of one random routing on one GPU, once per
    (backend, padded_zero_fill) of `groups`; returns [(Dispatched, combined)] as numpy."""
    import jax_ep

    mesh = one_gpu_mesh()
    rng = np.random.default_rng(seed)
    idx, w = checks.routing_for(case, 1, rng)
    x = harness.random_tokens(rng, 1, case.tokens, case.hidden, case.dtype)
    results = []
    for backend, zero_fill in groups:
        group = checks.make_group(mesh, case, backend=backend, padded_zero_fill=zero_fill)

        def fn(a, b, c, group=group):
            d = jax_ep.dispatch(group, a, b, c, layout="padded")
            return d, jax_ep.combine(group, d.x, d.handle, weights=d.weights)

        results.append(jax.tree.map(np.asarray, harness.per_rank(mesh, fn)(x, idx, w)))
        group.close()
    return results


@pytest.mark.gpu
@pytest.mark.parametrize("case", checks.CASES, ids=lambda c: c.name)
def test_one_gpu_padded_equals_oracle(case):
    assert checks.check_case(one_gpu_mesh(), case) == 1


@pytest.mark.gpu
def test_one_gpu_fp8_equals_oracle():
    assert checks.check_fp8(one_gpu_mesh()) == 1


@pytest.mark.gpu
def test_one_gpu_padded_scan_of_20_rounds():
    assert checks.check_scan_rounds(one_gpu_mesh()) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("case", checks.CASES[:4], ids=lambda c: c.name)
def test_one_gpu_padded_equals_reference_backend(case):
    (d, y), (d_ref, y_ref) = _padded_on_one_gpu(case, 5, (("cuda", True), ("reference", True)))
    harness.assert_same_bytes(d, d_ref)
    harness.assert_combine_close(y, np.asarray(y_ref, np.float64), case.dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4, 8])
def test_processes_sharing_the_gpu_padded(world):
    results = local_world.launch("tests.mp_worker", world, ["--mode", "padded"], timeout_s=540)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{out[-4000:]}"
        assert "padded scan_20_rounds ok" in out


@pytest.mark.gpu
@pytest.mark.parametrize("case", checks.CASES[:2], ids=lambda c: c.name)
def test_one_gpu_padded_without_zero_fill(case):
    """EPConfig.padded_zero_fill=False leaves the padding unwritten: the received rows, their
    weights and counts and the combine are still those of the zero-filled reference."""
    (d, y), (d_ref, y_ref) = _padded_on_one_gpu(case, 7, (("cuda", False), ("reference", True)))
    np.testing.assert_array_equal(d.recv_counts, d_ref.recv_counts)
    np.testing.assert_array_equal(d.group_sizes, d_ref.group_sizes)
    counts = d_ref.recv_counts[0]  # [E_local, N]
    m = d_ref.x.shape[2] // counts.shape[1]
    for l in range(counts.shape[0]):
        for s in range(counts.shape[1]):
            rows = slice(s * m, s * m + counts[l, s])
            np.testing.assert_array_equal(d.x[0, l, rows].view(np.uint8),
                                          d_ref.x[0, l, rows].view(np.uint8))
            np.testing.assert_array_equal(d.weights[0, l, rows], d_ref.weights[0, l, rows])
    harness.assert_combine_close(y, np.asarray(y_ref, np.float64), case.dtype)
