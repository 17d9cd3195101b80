"""The GPU test program (tests/cuda_checks.py) run on the reference backend: the harness and
its gradient oracles are right, so a GPU failure points at the kernels."""

import pytest

from tests import cuda_checks, harness


@pytest.mark.parametrize("case", cuda_checks.CASES, ids=lambda c: c.name)
def test_cuda_checks_pass_on_reference(case):
    assert cuda_checks.check_case(harness.make_mesh(4), case, backend="reference") == 4


def test_scan_rounds_on_reference():
    assert cuda_checks.check_scan_rounds(harness.make_mesh(2), rounds=5,
                                         backend="reference") == 2
