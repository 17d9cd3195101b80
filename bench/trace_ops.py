"""Where the wall-clock time of bench.common.timed's program goes: a JAX profiler (CUPTI) trace of
one run of the `reps`-call program at world size 1, listed per device event with the gap before
it, and summed per kernel name.

    python bench/trace_ops.py --shape deepseek_v3 --op dispatch --num-sms 132
    python bench/trace_ops.py --shape decode --op round --world 8 --mps --num-sms 8

With --world N, N processes share the GPU (jax.distributed on 127.0.0.1, under MPS with --mps)
and rank 0's timeline is listed: a kernel that waits for its peers shows the wait in its
duration.

The program is bench.common.timed's: `reps` calls on distinct input sets in one jitted program that
returns every output. Device time = sum of the events' durations; the rest of the span between
the first event's start and the last event's end is gaps.
"""

from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path
from jax_ep._cli import FlagParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import device_events  # noqa: E402


def main() -> int:
    p = FlagParser()
    p.add_argument("--shape", default="deepseek_v3")
    p.add_argument("--op", choices=["dispatch", "combine", "round", "copy"], default="dispatch",
                   help="round: dispatch then weighted combine; copy: bench.common's copy-ceiling "
                        "chain, a control with no jax_ep kernel")
    p.add_argument("--num-sms", type=int, default=132)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--runs", type=int, default=1, help="runs of the program inside the trace")
    p.add_argument("--world", type=int, default=1, help="processes sharing the GPU")
    p.add_argument("--mps", action="store_true", help="with --world: under an MPS daemon")
    p.add_argument("--rank", type=int, default=-1)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    if args.world > 1 and args.rank < 0:
        return launch_world(args)
    import jax

    if args.world > 1:
        jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.world,
                                   process_id=args.rank)
    import numpy as np
    from jax.sharding import Mesh

    import jax_ep
    from bench.common import SHAPES, make_inputs, sync_processes
    from jax_ep import per_rank

    t, h, k, e = SHAPES[args.shape]
    mesh = Mesh(np.array(jax.devices()[:args.world]), ("expert",))
    cfg = jax_ep.EPConfig(num_experts=e, top_k=k, max_tokens=t, hidden_size=h,
                          num_sms=args.num_sms)
    group = jax_ep.EPGroup(mesh, "expert", cfg)
    sets = [tuple(per_rank.to_global(a, mesh) for a in s)
            for s in make_inputs(np.random.default_rng(0), args.world, t, h, k, e,
                                 sets=args.reps)]
    dispatch = per_rank.program(mesh, lambda x, i, w: (
        lambda d: (d.x, d.weights, d.handle))(jax_ep.dispatch(group, x, i, w)))
    combine = per_rank.program(mesh, lambda r, rw, hd: jax_ep.combine(group, r, hd, weights=rw))
    fn = dispatch
    if args.op == "combine":
        sets = [dispatch(*s) for s in sets]
        fn = combine
    if args.op == "round":
        fn = per_rank.program(mesh, lambda x, i, w: (lambda d: jax_ep.combine(
            group, d.x, d.handle, weights=d.weights))(jax_ep.dispatch(group, x, i, w)))
    program = jax.jit(lambda *ss: [fn(*s) for s in ss])
    if args.op == "copy":
        import jax.numpy as jnp

        def chain(a):
            for _ in range(args.reps):
                a = jax.lax.optimization_barrier(a + jnp.ones((), a.dtype))
            return a

        program = jax.jit(chain)
        sets = [jax.random.normal(jax.random.key(0), (t * h * (k + 1) // 2,), jnp.bfloat16)]
    for _ in range(3):
        sync_processes()
        jax.block_until_ready(program(*sets))
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir):
        for _ in range(args.runs):
            sync_processes()
            jax.block_until_ready(program(*sets))
    events = device_events(trace_dir)
    group.close()
    if args.world > 1:  # leave together (rank 0 hosts the coordination service); rank 0 reports
        from jax._src import distributed

        distributed.global_state.client.wait_at_barrier("jax_ep_trace_end", 120_000)
        jax.distributed.shutdown()
        if args.rank > 0:
            return 0
    if not events:
        print("no device events in the trace")
        return 1
    first, last = events[0][1], max(s + d for _, s, d, _ in events)
    print(f"{args.shape} {args.op} sms={args.num_sms} reps={args.reps} runs={args.runs}: span "
          f"{(last - first) / 1e3:.1f} us, device busy {sum(d for _, _, d, _ in events) / 1e3:.1f}"
          f" us, per call {(last - first) / 1e3 / args.reps / args.runs:.1f} us")
    end = first
    for name, start, dur, line in events:
        print(f"  +{(start - first) / 1e3:9.1f} us  gap {(start - end) / 1e3:7.1f}  "
              f"dur {dur / 1e3:8.1f}  [{line[:18]}] {name[:90]}")
        end = max(end, start + dur)
    per_name = collections.defaultdict(lambda: [0, 0])
    for name, _, dur, _ in events:
        per_name[name[:60]][0] += 1
        per_name[name[:60]][1] += dur
    print("  per kernel: " + "; ".join(f"{n} x{c} {d / 1e3:.1f} us"
                                      for n, (c, d) in sorted(per_name.items(),
                                                               key=lambda kv: -kv[1][1])))
    return 0


def launch_world(args) -> int:
    """Starts args.world ranks of this script sharing the GPU; prints rank 0's report."""
    from bench import common

    return common.launch("bench.trace_ops", args.world, sys.argv[1:], timeout_s=300,
                            tail=12000)


if __name__ == "__main__":
    sys.exit(main())
