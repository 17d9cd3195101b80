"""The GPU test program (tests/cuda_checks.py) run on the reference backend and the hierarchical
one's pure-JAX leg: the harness and its gradient oracles are right, so a GPU failure points at
the kernels."""

import pytest

from tests import cuda_checks, harness


@pytest.mark.parametrize("case", cuda_checks.CASES, ids=lambda c: c.name)
def test_cuda_checks_pass_on_reference(case):
    assert cuda_checks.check_case(harness.make_mesh(4), case, backend="reference") == 4


def test_scan_rounds_on_reference():
    assert cuda_checks.check_scan_rounds(harness.make_mesh(2), rounds=5,
                                         backend="reference") == 2


@pytest.mark.parametrize("case", cuda_checks.CASES[:3], ids=lambda c: c.name)
def test_cuda_checks_pass_on_hierarchical_xla_leg(case):
    """The hierarchical GPU tests' program (tests/test_hierarchical_cuda.py) on 2 emulated hosts."""
    assert cuda_checks.check_case(harness.make_mesh(4), case, backend="hierarchical",
                                  group_kwargs=dict(hosts=[0, 0, 1, 1], intra_host="xla")) == 4


@pytest.mark.parametrize("backend,group_kwargs", [
    ("reference", None), ("hierarchical", dict(hosts=[0, 1], intra_host="xla"))])
def test_2d_mesh_check_passes_on_cpu_backends(backend, group_kwargs):
    assert cuda_checks.check_2d_mesh(harness.make_mesh(2, data=2), backend=backend,
                                     group_kwargs=group_kwargs) == 4


def test_same_results_check_on_cpu_backends():
    """The GPU tests' backend-against-backend check, on the reference and hierarchical ones."""
    names = cuda_checks.check_same_results(
        harness.make_mesh(4), cuda_checks.CASES[1],
        (("reference", None), ("hierarchical", dict(hosts=[0, 0, 1, 1], intra_host="xla"))),
        seed=5)
    assert "backend='hierarchical'" in names[1], names
