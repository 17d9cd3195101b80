"""N processes on this machine, one JAX program of several processes (jax.distributed on
127.0.0.1): each runs `python -m <module> --rank R --world N --port P <args>`, sharing this
machine's GPU(s); their exit codes and output are collected. The tests, the benchmarks and the
multi-process examples start their worlds with it.

A worker calls jax.distributed.initialize(f"127.0.0.1:{port}", world, rank)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, world: int, args: list[str], timeout_s: float = 600,
           mem_fraction: float | None = None,
           env: dict[str, str] | None = None,
           one_gpu_each: bool = False,
           nccl_host_per_process: bool = False,
           root: str | None = None) -> list[tuple[int, str]]:
    """Runs `world` ranks of `module`; returns [(exit code, output)] in rank order. A rank still
    running after timeout_s is killed (exit code -9). `env` is added to the workers'
    environment last (e.g. XLA_FLAGS for emulated CPU devices). one_gpu_each: rank r sees only
    GPU r (CUDA_VISIBLE_DEVICES), the one-process-per-GPU layout; otherwise every rank sees
    every GPU and they share them (on one GPU: N processes on the same device).
    nccl_host_per_process: each rank tells NCCL it is a host of its own (NCCL_HOSTID), so XLA
    collectives between processes that share a GPU pass NCCL's one-rank-per-GPU check (which
    only compares ranks of one host) and go through NCCL's socket transport on loopback.
    root: the workers' working directory, put first on their PYTHONPATH (default: the current
    directory), where `module` is found."""
    root = os.path.abspath(root or os.getcwd())
    port = free_port()
    extra_env, env = env, dict(os.environ)
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(mem_fraction or min(0.3, 0.6 / world))
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)  # no emulated CPU devices in the workers
    env.update(extra_env or {})
    procs = []
    for rank in range(world):
        cmd = [sys.executable, "-X", "faulthandler", "-m", module, "--rank", str(rank), "--world", str(world),
               "--port", str(port), *args]
        rank_env = dict(env, CUDA_VISIBLE_DEVICES=str(rank)) if one_gpu_each else dict(env)
        if nccl_host_per_process:
            rank_env.update(NCCL_HOSTID=f"jax-ep-test-{port}-{rank}", NCCL_SOCKET_IFNAME="lo")
        procs.append(subprocess.Popen(cmd, cwd=root, env=rank_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout_s
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            out += f"\n[killed after {timeout_s} s]"
        results.append((p.returncode, out))
    return results
