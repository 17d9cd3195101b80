"""bench/probe/bandwidth_probe.cu, the standalone probe of what fan-out / fan-in traffic reaches per
SM budget: it compiles with nvcc (skipped without nvcc), and (marker `gpu`) its copy-engine
variants write the same bytes as the ordinary ones on a small shape."""

import subprocess
from pathlib import Path

import pytest

from bench.copy_kernel import find_nvcc, has_gpu

SOURCE = Path(__file__).resolve().parents[1] / "bench" / "probe" / "bandwidth_probe.cu"


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    exe = tmp_path_factory.mktemp("probe") / "bandwidth_probe"
    proc = subprocess.run([nvcc, "-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90",
                           str(SOURCE), "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return exe


def test_probe_compiles(probe):
    assert probe.exists()


@pytest.mark.gpu
def test_probe_copy_engine_variants_match_ordinary_ones(probe):
    if not has_gpu():
        pytest.skip("no GPU")
    out = subprocess.run([str(probe), "256", "1024", "4", "4", "copy regs x8"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    checks = [ln for ln in out.stdout.splitlines() if "==" in ln]
    assert len(checks) == 4 and all(ln.endswith("yes") for ln in checks), out.stdout
    assert "copy regs x8 (1024 thr)" in out.stdout
