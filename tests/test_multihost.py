"""Multi-process EP through jax.distributed: 2 processes on 127.0.0.1 with 4 (or 2) CPU devices
each (gloo collectives) emulate 2 hosts of 4 (or 2) ranks, and 4 hosts of 2 by an explicit
`hosts=` (and 4 GPU processes 2 hosts of 2, marker gpu). The reference and hierarchical
backends give every process the oracle's results, gradients included; group creation detects a
config mismatch and a missing process; close() waits for the peers. The workers are
tests/mh_worker.py."""

import pytest

from jax_ep import local_world

def _cpu_env(devices: int = 4) -> dict[str, str]:
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu"}


def _run(mode: str, world: int = 2, timeout_s: float = 120, devices: int = 4,
         extra: tuple[str, ...] = ()) -> str:
    results = local_world.launch("tests.mh_worker", world, ["--mode", mode, *extra],
                               timeout_s=timeout_s, env=_cpu_env(devices))
    log = "\n".join(f"--- process {i} (exit {rc}) ---\n{out}" for i, (rc, out) in
                    enumerate(results))
    assert all(rc == 0 for rc, _ in results), log
    for i in range(world):
        assert f"process {i}: {mode} ok" in log, log
    return log


def test_two_processes_match_oracle():
    """Both layouts (the padded one on the hierarchical backend: its inter-host leg and the
    pure-JAX padded intra-host leg, with the per-call checks of CPU groups over processes)."""
    log = _run("cases", extra=("--layouts", "normal,padded"))
    for name in ("reference ok", "hierarchical, 4 hosts given ok (hosts x ranks 4x2",
                 "auto, 2 hosts discovered ok (hosts x ranks 2x4"):
        assert f"process 1: {name}" in log and "layouts normal+padded" in log, log


def test_two_processes_of_two_ranks_match_oracle():
    """Hosts of 2 ranks, one process each (the 4x2 layout above has them inside a process)."""
    log = _run("cases", devices=2, extra=("--setups", "discovered", "--layouts", "normal,padded"))
    assert "process 1: auto, 2 hosts discovered ok (hosts x ranks 2x2, layouts normal+padded" \
        in log, log


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
    hierarchical one (inter-host leg XLA ragged_all_to_all over NCCL, which "auto" picks with
    the XLA flag it needs, hierarchical.RAGGED_XLA_FLAG; intra-host leg the cuda
    kernels over CUDA IPC) give every process the oracle's results. With 4 GPUs each process has its
    own; with fewer the processes share them, each made an NCCL host of its own (NCCL refuses
    two ranks of one host on one GPU), so NCCL runs its socket transport over loopback."""
    import jax

    own = len(jax.devices("gpu")) >= 4
    from jax_ep.backends import hierarchical

    results = local_world.launch("tests.mh_worker", 4, ["--mode", "cases", "--platform", "gpu"],
                                 timeout_s=300, one_gpu_each=own, nccl_host_per_process=not own,
                                 env={"XLA_FLAGS": hierarchical.RAGGED_XLA_FLAG})
    log = "\n".join(f"--- process {i} (exit {rc}) ---\n{out}" for i, (rc, out) in
                    enumerate(results))
    assert all(rc == 0 for rc, _ in results), log
    for i in range(4):
        assert f"process {i}: cases ok" in log, log
