"""What every benchmark script here shares: the shapes, the input sets, the two timings (wall
clock of a jitted multi-call program, and its span on the GPU timeline from a profiler trace),
the copy ceiling, and the launcher of N processes sharing the GPU. Scripts import this module and
jax_ep only (never the tests).
"""

from __future__ import annotations

import glob
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from jax_ep import local_world

SHAPES = {
    # name: (T tokens per rank, H, k, E)
    "deepseek_v3": (4096, 7168, 8, 256),
    "mixtral": (8192, 4096, 2, 8),
    "decode": (128, 7168, 8, 256),
}


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


_programs: dict = {}


def _program(fn, reps: int):
    """The jitted program of `reps` calls of fn, one per input set (compiled once per fn)."""
    import jax

    if (fn, reps) not in _programs:
        _programs[(fn, reps)] = jax.jit(lambda *sets: [fn(*s) for s in sets])
    return _programs[(fn, reps)]


def timed(fn, input_sets, reps: int, trials: int) -> float:
    """Per-call seconds of `fn` run as one program: `reps` calls, each on its own input set
    (distinct sets, so XLA cannot merge equal calls and each set is read from HBM, not L2), in
    one jitted program that returns every output. Wall clock from the Python call to the
    outputs being ready, median over `trials` runs, divided by `reps`: device time, the gaps
    between kernels, and JAX's cost of launching the program (paid once per run, growing with
    its arguments and outputs; `span` leaves it out)."""
    import jax

    reps = min(reps, len(input_sets))
    program = _program(fn, reps)
    chosen = input_sets[:reps]
    jax.block_until_ready(program(*chosen))  # compile and warm up
    samples = []
    for _ in range(trials):
        sync_processes()
        t0 = time.perf_counter()
        jax.block_until_ready(program(*chosen))
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples)


def span(fn, input_sets, reps: int) -> float | None:
    """Per-call seconds of the same program as `timed` on the GPU timeline (bench/trace_ops.py:
    a profiler trace, first kernel start to last kernel end of a warm run, divided by reps):
    device time plus the gaps between kernels, without the host's per-program launch cost."""
    reps = min(reps, len(input_sets))
    program = _program(fn, reps)
    return steady_span_s(program, input_sets[:reps], reps, before_run=sync_processes)


def copy_time(nbytes: int, reps: int, trials: int) -> tuple[float, float | None]:
    """Per-copy seconds (wall as in `timed`, and span) of a device-to-device copy moving
    `nbytes` (read + write): a chain of `reps` elementwise passes over an array of nbytes / 2,
    each materialised (optimization_barrier keeps XLA from fusing the chain into one pass)."""
    import jax
    import jax.numpy as jnp

    n = nbytes // 2 // 2  # bf16 elements read (and as many written) per pass

    def chain(a):
        for _ in range(reps):
            a = jax.lax.optimization_barrier(a + jnp.ones((), a.dtype))
        return a

    program = jax.jit(chain)
    a = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    jax.block_until_ready(program(a))
    samples = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready(program(a))
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples), steady_span_s(program, [a], reps)


def make_inputs(rng, world, t, h, k, e, sets=4):
    import numpy as np
    import ml_dtypes

    out = []
    for _ in range(sets):
        logits = rng.normal(size=(world, t, e)).astype(np.float32)
        idx = np.argsort(-logits, axis=-1)[..., :k].astype(np.int32)
        w = rng.random((world, t, k)).astype(np.float32)
        x = rng.normal(size=(world, t, h)).astype(ml_dtypes.bfloat16)
        out.append((x, idx, w))
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
