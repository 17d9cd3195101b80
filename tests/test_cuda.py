"""The cuda backend on a GPU (marker `gpu`; skipped without one): equal to the reference
contract on one GPU and with N = 2, 4, 8 processes sharing the GPU through CUDA IPC."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import jax_ep
from tests import cuda_checks, harness
from jax_ep import local_world

pytestmark = pytest.mark.gpu


def one_gpu_mesh() -> Mesh:
    return Mesh(np.array(jax.devices("gpu")[:1]), ("expert",))


def num_gpus() -> int:
    try:
        return len(jax.devices("gpu"))
    except RuntimeError:  # no GPU backend: the gpu marker skips these tests anyway
        return 0


needs_several_gpus = pytest.mark.skipif(num_gpus() < 2,
                                        reason="needs several GPUs (one process driving them all)")


@pytest.mark.parametrize("case", cuda_checks.CASES, ids=lambda c: c.name)
def test_one_gpu_equals_oracle(case):
    assert cuda_checks.check_case(one_gpu_mesh(), case) == 1


def test_one_gpu_scan_of_20_rounds():
    assert cuda_checks.check_scan_rounds(one_gpu_mesh()) == 1


@pytest.mark.parametrize("case", cuda_checks.CASES[:4], ids=lambda c: c.name)
def test_one_gpu_equals_reference_backend(case):
    names = cuda_checks.check_same_results(one_gpu_mesh(), case,
                                           (("cuda", None), ("reference", None)), seed=5)
    assert "backend='cuda'" in names[0] and "backend='reference'" in names[1], names


def test_auto_picks_cuda_on_gpus():
    group = jax_ep.EPGroup(one_gpu_mesh(), "expert",
                           jax_ep.EPConfig(num_experts=4, top_k=2, max_tokens=8, hidden_size=64))
    assert group.backend_name == "cuda"
    group.close()


def test_hidden_size_that_cannot_be_vectorised_is_a_value_error():
    case = cuda_checks.Case("odd", 4, 2, 2, 36, "bfloat16")  # 72-byte rows
    group = cuda_checks.make_group(one_gpu_mesh(), case)
    x, idx, w, *_ = cuda_checks.inputs_for(case, 1, 0)
    with pytest.raises(ValueError, match="multiple of 8 for bfloat16"):
        harness.dispatch_all(group, x, idx, w)
    group.close()


def test_cuda_config_needs_buffer_sizes():
    with pytest.raises(ValueError, match="max_tokens"):
        jax_ep.EPGroup(one_gpu_mesh(), "expert",
                       jax_ep.EPConfig(num_experts=4, top_k=2, portable=False), backend="cuda")


@needs_several_gpus
@pytest.mark.parametrize("case", cuda_checks.CASES, ids=lambda c: c.name)
def test_one_process_driving_all_gpus(case):
    """N = every local GPU, one process: peers by pointer with peer access."""
    mesh = Mesh(np.array(jax.devices("gpu")), ("expert",))
    assert cuda_checks.check_case(mesh, case) == num_gpus()


@needs_several_gpus
def test_one_process_driving_all_gpus_scan_of_20_rounds():
    mesh = Mesh(np.array(jax.devices("gpu")), ("expert",))
    assert cuda_checks.check_scan_rounds(mesh) == num_gpus()


@needs_several_gpus
def test_one_process_per_gpu():
    """N = every GPU, one process each (CUDA IPC between processes)."""
    world = num_gpus()
    results = local_world.launch("tests.mp_worker", world, ["--mode", "cases"], timeout_s=540,
                               one_gpu_each=True)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{out[-4000:]}"
        assert "scan_20_rounds ok" in out


@pytest.mark.parametrize("world", [2, 4, 8])
def test_processes_sharing_the_gpu(world):
    results = local_world.launch("tests.mp_worker", world, ["--mode", "cases"], timeout_s=540)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{out[-4000:]}"
        assert "scan_20_rounds ok" in out


def test_a_peer_that_never_arrives_is_a_timeout_error():
    results = local_world.launch("tests.mp_worker", 2, ["--mode", "timeout"], timeout_s=240)
    code, out = results[0]
    assert "timeout test ok" in out, out[:3000]
    assert code == 0, out[-3000:]
