"""Runs bench/bench_ep.py as N processes sharing the GPU (jax.distributed on 127.0.0.1); `launch`
starts any benchmark script that way.

    python bench/run_world.py 8 --shapes decode --out bench/out
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import mp_launch  # noqa: E402

import os  # noqa: E402
import subprocess  # noqa: E402


def start_mps() -> dict:
    """An MPS daemon with its pipe and log folders under /tmp, so the ranks' kernels run side
    by side instead of time-slicing the GPU."""
    env = {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/jax_ep_mps/pipe",
           "CUDA_MPS_LOG_DIRECTORY": "/tmp/jax_ep_mps/log"}
    for d in env.values():
        os.makedirs(d, exist_ok=True)
    os.environ.update(env)
    subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True)
    return env


def stop_mps() -> None:
    subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True)


def launch(module: str, world: int, argv: list[str], timeout_s: float = 540,
           tail: int = 6000) -> int:
    """Runs `world` ranks of `python -m module argv` sharing the GPU (under MPS when argv holds
    --mps, which is taken out); prints rank 0's output and that of any rank that failed (its
    last `tail` characters); returns the worst exit code."""
    mps = "--mps" in argv
    argv = [a for a in argv if a != "--mps"]
    if mps:
        start_mps()
    try:
        # Each process its own NCCL host: the XLA collectives of the runs that use them
        # (bench_ep --hosts) pass NCCL's one-rank-per-GPU check (tests/mp_launch.py).
        results = mp_launch.launch(module, world, argv, timeout_s=timeout_s,
                                   nccl_host_per_process=True)
    finally:
        if mps:
            stop_mps()
    for rank, (code, out) in enumerate(results):
        if code != 0 or rank == 0:
            print(f"--- rank {rank} exit {code}\n{out[-tail:]}")
    return max(abs(c) for c, _ in results)


if __name__ == "__main__":
    sys.exit(launch("bench.bench_ep", int(sys.argv[1]), sys.argv[2:]))
