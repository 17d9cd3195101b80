"""The hierarchical backend with its intra-host leg on the cuda kernels (marker `gpu`): every
check of the cuda backend (tests/cuda_checks.py: dispatch bit-exact with the numpy oracle,
both combines, both VJPs, bitwise repeatability, 20 rounds in a lax.scan), on one GPU, on all
GPUs of one process, and on N processes sharing the GPU split into 2 emulated hosts (inter-host
leg XLA ragged_all_to_all over NCCL, intra-host leg CUDA IPC); and EP over one axis of a 2-D mesh
(with the cuda backend too); both inter-host engines across processes. The padded layout
(`*hierarchical_padded*`: the padded kernels inside each host, tests/cuda_padded_checks.py's
checks, fp8 and a scan) the same ways."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import jax_ep
from jax_ep import local_world
from jax_ep.backends import hierarchical
from tests import cuda_checks, cuda_padded_checks
from tests.test_cuda import needs_several_gpus, num_gpus, one_gpu_mesh

pytestmark = pytest.mark.gpu

CUDA_LEG = dict(hosts=None, intra_host="cuda")


@pytest.mark.parametrize("case", cuda_checks.CASES, ids=lambda c: c.name)
def test_one_gpu_cuda_leg_equals_oracle(case):
    assert cuda_checks.check_case(one_gpu_mesh(), case, backend="hierarchical",
                                  group_kwargs=CUDA_LEG) == 1


def test_one_gpu_cuda_leg_scan_of_20_rounds():
    assert cuda_checks.check_scan_rounds(one_gpu_mesh(), backend="hierarchical",
                                         group_kwargs=CUDA_LEG) == 1


@pytest.mark.parametrize("case", cuda_checks.CASES[:4], ids=lambda c: c.name)
def test_one_gpu_cuda_leg_equals_xla_leg(case):
    """Same dispatch bytes as the pure-JAX leg; combine equal up to float32 summation order."""
    names = cuda_checks.check_same_results(
        one_gpu_mesh(), case, [("hierarchical", dict(intra_host=leg)) for leg in ("cuda", "xla")],
        seed=7)
    assert "intra_host='cuda'" in names[0] and "intra_host='xla'" in names[1], names


def test_auto_picks_the_cuda_leg_on_gpus():
    group = jax_ep.EPGroup(one_gpu_mesh(), "expert",
                           jax_ep.EPConfig(num_experts=4, top_k=2, max_tokens=8, hidden_size=64),
                           backend="hierarchical")
    assert group.intra_host == "cuda"
    group.close()


def test_cuda_leg_needs_buffer_sizes():
    with pytest.raises(ValueError, match="intra_host='xla' needs no sizes"):
        jax_ep.EPGroup(one_gpu_mesh(), "expert",
                       jax_ep.EPConfig(num_experts=4, top_k=2, portable=False),
                       backend="hierarchical")


@needs_several_gpus
@pytest.mark.parametrize("case", cuda_checks.CASES, ids=lambda c: c.name)
def test_one_process_driving_all_gpus_as_two_hosts(case):
    n = num_gpus()
    mesh = Mesh(np.array(jax.devices("gpu")), ("expert",))
    hosts = [2 * r // n for r in range(n)]
    assert cuda_checks.check_case(mesh, case, backend="hierarchical",
                                  group_kwargs=dict(hosts=hosts, intra_host="cuda")) == n


@pytest.mark.parametrize("world", [2, 4])
def test_processes_sharing_the_gpu_as_two_hosts(world):
    """world 2: one rank per host (the intra-host leg stays on one device); world 4: two per
    host (CUDA IPC between a host's processes). Both legs, every case, and a scan."""
    results = local_world.launch("tests.mp_worker", world, ["--mode", "hierarchical"],
                               timeout_s=540, nccl_host_per_process=True)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{out[-4000:]}"
        assert "hierarchical/cuda scan_20_rounds ok" in out
        for leg in ("cuda", "xla"):
            for case in cuda_checks.CASES:
                assert f"hierarchical/{leg} {case.name} ok" in out, out[-4000:]


@pytest.mark.parametrize("inter_host", ["ragged", "all_to_all"])
def test_processes_sharing_the_gpu_inter_host_engines(inter_host):
    """4 processes sharing the GPU as 2 emulated hosts of 2 ranks (and 4 hosts of 1), with each
    inter-host engine forced (XLA ragged_all_to_all, with the XLA flag it needs, or all_to_all,
    over NCCL)
    and the cuda intra-host leg: dispatch bit-exact, combine and both gradients against the
    numpy oracle on every process (tests/mh_worker.py, as tests/test_multihost.py on CPUs)."""
    results = local_world.launch(
        "tests.mh_worker", 4, ["--mode", "cases", "--platform", "gpu", "--inter-host", inter_host,
                               "--setups", "given,discovered"],
        timeout_s=300, nccl_host_per_process=True,
        env={"XLA_FLAGS": hierarchical.RAGGED_XLA_FLAG} if inter_host == "ragged" else None)
    log = "\n".join(f"--- process {i} (exit {rc}) ---\n{out}" for i, (rc, out) in
                    enumerate(results))
    assert all(rc == 0 for rc, _ in results), log
    for i in range(4):
        assert f"process {i}: auto, 2 hosts discovered ok (hosts x ranks 2x2" in log, log
        assert f"process {i}: cases ok" in log, log


def test_processes_sharing_the_gpu_2d_mesh():
    """4 processes as a ('data', 'expert') = (2, 2) mesh: one EP group per data slice, for the
    cuda backend and the hierarchical one (2 hosts of one rank, and 1 host of two)."""
    results = local_world.launch("tests.mp_worker", 4, ["--mode", "mesh2d"], timeout_s=300,
                               nccl_host_per_process=True)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{out[-4000:]}"
        assert out.count("mesh2d") >= 3 and out.count(" ok") >= 3, out[-4000:]


@pytest.mark.skipif(num_gpus() < 4, reason="needs 4 GPUs (one process driving them all)")
def test_one_process_driving_four_gpus_2d_mesh():
    mesh = Mesh(np.array(jax.devices("gpu")[:4]).reshape(2, 2), ("data", "expert"))
    for backend, kwargs in (("cuda", None), ("hierarchical", dict(hosts=[0, 1]))):
        assert cuda_checks.check_2d_mesh(mesh, backend=backend, group_kwargs=kwargs) == 4


# --- the padded layout: the padded kernels inside each host ------------------------------------


@pytest.mark.parametrize("case", cuda_padded_checks.CASES, ids=lambda c: c.name)
def test_one_gpu_hierarchical_padded_equals_oracle(case):
    assert cuda_padded_checks.check_case(one_gpu_mesh(), case, backend="hierarchical",
                                         group_kwargs=CUDA_LEG) == 1


def test_one_gpu_hierarchical_padded_fp8_and_scan():
    assert cuda_padded_checks.check_fp8(one_gpu_mesh(), backend="hierarchical",
                                        group_kwargs=CUDA_LEG) == 1
    assert cuda_padded_checks.check_scan_rounds(one_gpu_mesh(), backend="hierarchical",
                                                group_kwargs=CUDA_LEG) == 1


def test_one_gpu_hierarchical_padded_runs_the_padded_kernels():
    """The padded operations of a hierarchical group with the cuda leg are the padded kernels'
    (not the pure-JAX reference), on the leg's buffers, which hold the padded regions."""
    from jax_ep.backends.cuda import CudaIntraHostPaddedLeg
    from jax_ep.backends.hierarchical_padded import HierarchicalPaddedOps

    case = cuda_padded_checks.CASES[0]
    group = cuda_padded_checks.make_group(one_gpu_mesh(), case, backend="hierarchical",
                                          group_kwargs=CUDA_LEG)
    try:
        ops = group.ops["padded"]
        assert isinstance(ops, HierarchicalPaddedOps), ops
        assert isinstance(ops.intra, CudaIntraHostPaddedLeg), ops.intra
        assert group.backend.intra.buffer_bytes() == jax_ep.buffer_bytes(group.config, 1)
    finally:
        group.close()


@needs_several_gpus
@pytest.mark.parametrize("case", cuda_padded_checks.CASES, ids=lambda c: c.name)
def test_one_process_driving_all_gpus_hierarchical_padded(case):
    n = num_gpus()
    mesh = Mesh(np.array(jax.devices("gpu")), ("expert",))
    hosts = [2 * r // n for r in range(n)]
    assert cuda_padded_checks.check_case(
        mesh, case, backend="hierarchical", group_kwargs=dict(hosts=hosts, intra_host="cuda")) == n


@pytest.mark.parametrize("world", [2, 4])
def test_processes_sharing_the_gpu_hierarchical_padded(world):
    """world 2: 2 hosts of one rank (each rank forwards both segments to itself); world 4: 2
    hosts of 2 (CUDA IPC between a host's processes), and interleaved hosts. Every padded case on
    the cuda leg, fp8 and a scan there, the first cases on the XLA leg (tests/mp_worker.py)."""
    results = local_world.launch("tests.mp_worker", world, ["--mode", "hierarchical_padded"],
                                 timeout_s=540, nccl_host_per_process=True)
    halves = [2 * r // world for r in range(world)]
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{out[-4000:]}"
        for name in ("fp8", "scan_20_rounds"):
            assert f"hierarchical_padded/cuda {name} ok" in out, out[-4000:]
        for case in cuda_padded_checks.CASES:
            assert f"hierarchical_padded/cuda hosts {halves} {case.name} ok" in out, out[-4000:]


@pytest.mark.parametrize("inter_host", ["ragged", "all_to_all"])
def test_processes_sharing_the_gpu_hierarchical_padded_inter_host_engines(inter_host):
    """4 processes sharing the GPU as 2 emulated hosts of 2 ranks and 4 hosts of 1, each
    inter-host engine forced, the padded layout on the cuda leg: dispatch bit-exact, weighted
    combine and both gradients against the numpy oracle (tests/mh_worker.py --layouts padded)."""
    results = local_world.launch(
        "tests.mh_worker", 4, ["--mode", "cases", "--platform", "gpu", "--inter-host", inter_host,
                               "--setups", "given,discovered", "--layouts", "padded"],
        timeout_s=300, nccl_host_per_process=True,
        env={"XLA_FLAGS": hierarchical.RAGGED_XLA_FLAG} if inter_host == "ragged" else None)
    log = "\n".join(f"--- process {i} (exit {rc}) ---\n{out}" for i, (rc, out) in
                    enumerate(results))
    assert all(rc == 0 for rc, _ in results), log
    for i in range(4):
        assert f"process {i}: hierarchical, 4 hosts given ok (hosts x ranks 4x1, layouts " \
            "padded" in log, log
        assert f"process {i}: auto, 2 hosts discovered ok (hosts x ranks 2x2, layouts " \
            "padded" in log, log
