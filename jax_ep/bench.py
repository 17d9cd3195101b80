"""A quick benchmark of dispatch and combine on this machine's devices, shipped with the package:

    python -m jax_ep.bench                                   # DeepSeek-V3 shape, backend "auto"
    python -m jax_ep.bench --shape mixtral --num-sms 24,132  # SM budgets (cuda backend)
    python -m jax_ep.bench --shape decode --tokens 64 --json

One process, an EP group over every local device (N ranks), T tokens per rank. Per call: the
wall clock of one jitted program of `--reps` calls on distinct input sets (so XLA merges none and
every input comes from HBM), median over `--trials` runs, divided by reps; GB/s = the bytes that
must move (dispatch reads T*H and writes C*H elements, combine the reverse; C = N*T*k) over that
time; `x copy` = the time over that of an XLA device copy of the same bytes. The wall clock
includes JAX's launch cost of the program (tens of microseconds); the repository's bench/
scripts add the span on the GPU timeline, the XLA baselines, a copy kernel per SM budget and
several processes (bench/RESULTS.md). The timing functions here are the ones they use.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable, Sequence

from jax_ep._cli import FlagParser

SHAPES = {
    # name: (T tokens per rank, H, k, E)
    "deepseek_v3": (4096, 7168, 8, 256),
    "mixtral": (8192, 4096, 2, 8),
    "decode": (128, 7168, 8, 256),
}

_programs: dict = {}


def multi_call_program(fn: Callable, reps: int) -> Callable:
    """The jitted program of `reps` calls of fn, one per input set, returning every output
    (compiled once per (fn, reps))."""
    import jax

    if (fn, reps) not in _programs:
        _programs[(fn, reps)] = jax.jit(lambda *sets: [fn(*s) for s in sets])
    return _programs[(fn, reps)]


def wall_time(program: Callable, args: Sequence, reps: int, trials: int,
              before_run: Callable[[], None] | None = None) -> float:
    """Per-call seconds of `program(*args)`, which makes `reps` calls: wall clock from the
    Python call to the outputs being ready, median over `trials` runs after one warm-up (and
    compilation) run, divided by `reps`. `before_run` runs before each timed run (e.g. a
    barrier across processes)."""
    import jax

    jax.block_until_ready(program(*args))  # compile and warm up
    samples = []
    for _ in range(trials):
        if before_run is not None:
            before_run()
        t0 = time.perf_counter()
        jax.block_until_ready(program(*args))
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples)


def timed(fn: Callable, input_sets: Sequence[tuple], reps: int, trials: int,
          before_run: Callable[[], None] | None = None) -> float:
    """Per-call seconds of `fn` run as one program: `reps` calls, each on its own input set, in
    one jitted program that returns every output (wall_time of multi_call_program): device
    time, the gaps between kernels, and JAX's cost of launching the program (paid once per
    run)."""
    reps = min(reps, len(input_sets))
    return wall_time(multi_call_program(fn, reps), input_sets[:reps], reps, trials, before_run)


def copy_program(nbytes: int, reps: int) -> tuple[Callable, Any]:
    """(program, its argument): `reps` device-to-device copies moving `nbytes` each (read +
    write), as a chain of elementwise passes over a bf16 array of nbytes / 2, each materialised
    (optimization_barrier keeps XLA from fusing the chain into one pass)."""
    import jax
    import jax.numpy as jnp

    n = nbytes // 2 // 2  # bf16 elements read (and as many written) per pass

    def chain(a):
        for _ in range(reps):
            a = jax.lax.optimization_barrier(a + jnp.ones((), a.dtype))
        return a

    return jax.jit(chain), jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)


def make_inputs(rng, world: int, t: int, h: int, k: int, e: int, sets: int = 4) -> list[tuple]:
    """`sets` host input sets (x [world, T, H] bf16, topk_idx [world, T, k] int32 from random
    logits, topk_weights [world, T, k] f32), one [T, ...] block per rank."""
    import ml_dtypes
    import numpy as np

    out = []
    for _ in range(sets):
        logits = rng.normal(size=(world, t, e)).astype(np.float32)
        idx = np.argsort(-logits, axis=-1)[..., :k].astype(np.int32)
        w = rng.random((world, t, k)).astype(np.float32)
        x = rng.normal(size=(world, t, h)).astype(ml_dtypes.bfloat16)
        out.append((x, idx, w))
    return out


def must_move_bytes(world: int, t: int, h: int, k: int, itemsize: int = 2) -> int:
    """Bytes one dispatch (or one combine) must read + write per rank, dropless: T*H + C*H
    elements, C = world*T*k."""
    return (t * h + world * t * k * h) * itemsize


def run(shape: str = "deepseek_v3", tokens: int = 0, backend: str = "auto",
        num_sms: Sequence[int] = (24,), reps: int = 10, trials: int = 5) -> list[dict]:
    """Times dispatch and combine on every local device; one dict per (backend, SM budget):
    {"backend", "num_sms", "N", "T", "H", "k", "E", "bytes", "copy_s", "dispatch_s",
    "combine_s"}."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    import jax_ep
    from jax_ep import per_rank

    t, h, k, e = SHAPES[shape]
    t = tokens or t
    devices = jax.local_devices()
    world = len(devices)
    while e % world:  # experts must split evenly over the ranks
        world -= 1
    mesh = Mesh(np.array(devices[:world]), ("expert",))
    reps = max(1, reps)
    host_sets = make_inputs(np.random.default_rng(0), world, t, h, k, e, sets=reps)
    sets = [tuple(per_rank.to_global(a, mesh) for a in s) for s in host_sets]
    nbytes = must_move_bytes(world, t, h, k)
    copy, copy_arg = copy_program(nbytes, reps)
    copy_s = wall_time(copy, [copy_arg], reps, trials)
    del copy_arg
    rows = []
    for sms in num_sms:
        cfg = jax_ep.EPConfig(num_experts=e, top_k=k, max_tokens=t, hidden_size=h,
                              num_sms=int(sms))
        with jax_ep.EPGroup(mesh, "expert", cfg, backend=backend) as group:
            dispatch = per_rank.program(mesh, lambda x, i, w: (
                lambda d: (d.x, d.weights, d.handle))(jax_ep.dispatch(group, x, i, w)))
            combine = per_rank.program(
                mesh, lambda rows_, rw, hd: jax_ep.combine(group, rows_, hd, weights=rw))
            dispatch_s = timed(dispatch, sets, reps, trials)
            dispatched = [dispatch(*s) for s in sets]
            combine_s = timed(combine, dispatched, reps, trials)
            del dispatched
            on_cuda = group.backend_name == "cuda"
            rows.append(dict(backend=group.backend_name, num_sms=int(sms) if on_cuda else None,
                             N=world, T=t, H=h,
                             k=k, E=e, bytes=nbytes, copy_s=copy_s, dispatch_s=dispatch_s,
                             combine_s=combine_s))
        if rows[-1]["num_sms"] is None:
            break  # the SM budget means nothing to the other backends
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'backend':<12} {'num_sms':>7} {'op':<9} {'us/call':>9} {'GB/s':>7} {'x copy':>7}"]
    for r in rows:
        for op in ("dispatch", "combine"):
            s = r[f"{op}_s"]
            sms = "-" if r["num_sms"] is None else r["num_sms"]
            lines.append(f"{r['backend']:<12} {sms:>7} {op:<9} {s * 1e6:>9.1f} "
                         f"{r['bytes'] / s / 1e9:>7.0f} {s / r['copy_s']:>7.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = FlagParser(prog="python -m jax_ep.bench", description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=tuple(SHAPES), default="deepseek_v3",
                   help="(T tokens per rank, H, k, E): " + ", ".join(
                       f"{n} {v}" for n, v in SHAPES.items()))
    p.add_argument("--tokens", type=int, default=0, help="override T (tokens per rank); 0: the "
                   "shape's")
    p.add_argument("--backend", choices=("auto", "reference", "cuda", "hierarchical"),
                   default="auto", help="jax_ep backend (python -m jax_ep.info says what auto "
                   "picks)")
    p.add_argument("--num-sms", default="24",
                   help="comma-separated SM budgets (EPConfig.num_sms; cuda backend only)")
    p.add_argument("--reps", type=int, default=10, help="calls per timed program")
    p.add_argument("--trials", type=int, default=5, help="timed runs (the median is kept)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    try:
        budgets = [int(s) for s in args.num_sms.split(",") if s]
    except ValueError:
        p.error(f"--num-sms must be comma-separated integers, got {args.num_sms!r}")
    if not budgets or min(budgets) < 1 or args.reps < 1 or args.trials < 1 or args.tokens < 0:
        p.error("--num-sms, --reps and --trials must be positive, --tokens >= 0")
    rows = run(args.shape, args.tokens, args.backend, budgets, args.reps, args.trials)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    r = rows[0]
    print(f"jax_ep.bench: {args.shape}: N={r['N']} ranks, T={r['T']} tokens per rank, H={r['H']}, "
          f"top-{r['k']}, E={r['E']}, bf16; {r['bytes'] / 1e6:.1f} MB must move per call; XLA "
          f"copy of those bytes {r['copy_s'] * 1e6:.1f} us")
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
