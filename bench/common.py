"""What every benchmark script here shares: the shapes, the input sets and the wall-clock
timing (from jax_ep.bench, which `python -m jax_ep.bench` runs), the span on the GPU timeline
from a profiler trace, the copy ceilings, and the launcher of N processes sharing the GPU.
Scripts import this module and jax_ep only (never the tests).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time

from jax_ep import local_world
from jax_ep.bench import SHAPES, copy_program, make_inputs  # noqa: F401
from jax_ep.bench import multi_call_program, wall_time
from jax_ep.bench import timed as _timed

_barrier_count = 0


def sync_processes() -> None:
    """With several processes, start each timed trial together: otherwise a rank that launches
    first waits inside the kernels for the others, and its time counts their host-side lag."""
    import jax

    global _barrier_count
    if jax.process_count() > 1:
        from jax._src import distributed

        _barrier_count += 1
        distributed.global_state.client.wait_at_barrier(f"jax_ep_bench_{_barrier_count}", 120_000)


def timed(fn, input_sets, reps: int, trials: int) -> float:
    """jax_ep.bench.timed with every timed run started together across processes."""
    return _timed(fn, input_sets, reps, trials, before_run=sync_processes)


def span(fn, input_sets, reps: int) -> float | None:
    """Per-call seconds of the same program as `timed` on the GPU timeline (bench/trace_ops.py:
    a profiler trace, first kernel start to last kernel end of a warm run, divided by reps):
    device time plus the gaps between kernels, without the host's per-program launch cost."""
    reps = min(reps, len(input_sets))
    program = multi_call_program(fn, reps)
    return steady_span_s(program, input_sets[:reps], reps, before_run=sync_processes)


def copy_time(nbytes: int, reps: int, trials: int) -> tuple[float, float | None]:
    """Per-copy seconds (wall as in `timed`, and span) of jax_ep.bench.copy_program: an XLA
    device-to-device copy moving `nbytes` (read + write)."""
    program, a = copy_program(nbytes, reps)
    return wall_time(program, [a], reps, trials), steady_span_s(program, [a], reps)


def copy_kernel_times(nbytes: int, budgets, reps: int,
                      trials: int) -> dict[int, tuple[float, float | None]]:
    """{S: per-copy seconds (wall as in `timed`, span as in `span`)} of the copy kernel
    (bench/copy_kernel) on S blocks, one per SM of the budget, moving `nbytes` (read + write):
    one program of `reps` calls, each copying its own array of nbytes / 2 (rounded down to
    16 bytes), timed exactly as jax_ep's calls are. Callers check
    bench.copy_kernel.unavailable() first."""
    import jax
    import jax.numpy as jnp

    from bench.copy_kernel import copy_kernel

    words = nbytes // 2 // 16 * 4  # uint32 words per array
    sets = [(jax.random.bits(jax.random.key(i), (words,), jnp.uint32),) for i in range(reps)]
    out = {}
    for s in budgets:
        def fn(a, s=s):
            return copy_kernel(a, s)
        out[s] = (timed(fn, sets, reps, trials), span(fn, sets, reps))
    del sets
    return out


def device_events(trace_dir: str):
    """[(name, start_ns, duration_ns, line name)] of the GPU planes of the trace in trace_dir."""
    from jax.profiler import ProfileData

    paths = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    if not paths:
        raise SystemExit(f"no xplane.pb under {trace_dir}")
    data = ProfileData.from_file(paths[0])
    out = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            for ev in line.events:
                out.append((ev.name, ev.start_ns, ev.duration_ns, line.name))
    return sorted(out, key=lambda e: e[1])


def steady_span_s(program, args, reps: int, runs: int = 2, before_run=None,
                  pause_s: float = 0.005):
    """Seconds per call on the GPU timeline of `program(*args)`, which makes `reps` calls: the
    last of `runs` traced runs (a pause of pause_s before each marks them apart), from its first
    device event's start to its last one's end, divided by reps. It leaves out what the host
    spends launching the program (JAX's per-program cost, which grows with the number of
    arguments and outputs and is paid before the first kernel); None without device events."""
    import jax

    trace_dir = tempfile.mkdtemp()
    try:
        with jax.profiler.trace(trace_dir):
            for _ in range(runs):
                time.sleep(pause_s)
                if before_run:
                    before_run()
                jax.block_until_ready(program(*args))
        events = device_events(trace_dir)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    if not events:
        return None
    start = events[0][1]
    end = start + events[0][2]
    for _, s, d, _ in events[1:]:
        if s - end > pause_s * 1e9 / 2:  # the pause before the next run
            start = s
        end = max(end, s + d)
    return (end - start) / 1e9 / reps


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
        # (bench_ep --hosts) pass NCCL's one-rank-per-GPU check (jax_ep/local_world.py).
        results = local_world.launch(module, world, argv, timeout_s=timeout_s,
                                   nccl_host_per_process=True)
    finally:
        if mps:
            stop_mps()
    for rank, (code, out) in enumerate(results):
        if code != 0 or rank == 0:
            print(f"--- rank {rank} exit {code}\n{out[-tail:]}")
    return max(abs(c) for c, _ in results)
