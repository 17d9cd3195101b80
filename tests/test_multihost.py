"""Multi-process EP through jax.distributed: 2 processes on 127.0.0.1 with 4 CPU devices each
(gloo collectives) emulate 2 hosts of 4 ranks (and 4 GPU processes 2 hosts of 2, marker gpu). The reference and hierarchical backends give
every process the oracle's results; group creation detects a config mismatch and a missing
process; close() waits for the peers. The workers are tests/mh_worker.py."""

import pytest

from jax_ep import local_world

CPU_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}


def _run(mode: str, world: int = 2, timeout_s: float = 120) -> str:
    results = local_world.launch("tests.mh_worker", world, ["--mode", mode], timeout_s=timeout_s,
                               env=CPU_ENV)
    log = "\n".join(f"--- process {i} (exit {rc}) ---\n{out}" for i, (rc, out) in
                    enumerate(results))
    assert all(rc == 0 for rc, _ in results), log
    for i in range(world):
        assert f"process {i}: {mode} ok" in log, log
    return log


def test_two_processes_match_oracle():
    log = _run("cases")
    for name in ("reference", "hierarchical, 4 hosts given", "auto, 2 hosts discovered"):
        assert f"process 1: {name} ok" in log, log


def test_config_mismatch_names_process_and_field():
    log = _run("mismatch")
    assert "config.top_k: 3 here vs 2 on process 0" in log, log


def test_missing_process_times_out_with_its_name():
    log = _run("missing")
    assert "process 1 did not create this EPGroup within 2 s" in log, log


def test_close_waits_for_peers():
    _run("close")


@pytest.mark.gpu
def test_hierarchical_processes_on_gpus():
    """4 processes as 2 emulated hosts of 2 ranks, on GPUs: the reference backend and the
    hierarchical one (inter-host leg XLA all_to_all over NCCL, intra-host leg the cuda kernels
    over CUDA IPC) give every process the oracle's results. With 4 GPUs each process has its
    own; with fewer the processes share them, each made an NCCL host of its own (NCCL refuses
    two ranks of one host on one GPU), so NCCL runs its socket transport over loopback."""
    import jax

    own = len(jax.devices("gpu")) >= 4
    results = local_world.launch("tests.mh_worker", 4, ["--mode", "cases", "--platform", "gpu"],
                               timeout_s=300, one_gpu_each=own, nccl_host_per_process=not own)
    log = "\n".join(f"--- process {i} (exit {rc}) ---\n{out}" for i, (rc, out) in
                    enumerate(results))
    assert all(rc == 0 for rc, _ in results), log
    for i in range(4):
        assert f"process {i}: cases ok" in log, log
