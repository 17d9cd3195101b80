"""Decode latency of the padded (low-latency) layout: dispatch and combine under graph replay.

    python bench/bench_padded.py --out bench/out                 # world size 1
    python bench/bench_padded.py --world 8 --out bench/out       # 8 processes sharing the GPU
    python bench/bench_padded.py --world 8 --mps --out bench/out # ... side by side under MPS

For each T (tokens per rank; H=7168, k=8, E=256 by default) it times two jitted programs of
`rounds` rounds unrolled in one lax.scan, which XLA runs as one command buffer (CUDA graph):
dispatch-only, and dispatch + weighted combine. Per-op time = program time / rounds; combine =
(dispatch+combine - dispatch-only) / rounds. Variants: bf16 rows, fp8 rows with their scales
(--fp8), and the normal layout for comparison (--normal). Each round routes with its own
top-k (a rotation of 4 input sets). fp8 programs include quantize_fp8 before each dispatch and
dequantize_fp8 before each combine. Prints a table; writes padded[_worldN].json under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from jax_ep._cli import FlagParser

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = FlagParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", default="1,32,128", help="tokens per rank, comma-separated")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--rounds", type=int, default=50, help="unrolled rounds per program")
    p.add_argument("--trials", type=int, default=7)
    p.add_argument("--num-sms", type=int, default=132, help="EPConfig.num_sms")
    p.add_argument("--fp8", action="store_true", help="also time fp8 dispatch")
    p.add_argument("--normal", action="store_true", help="also time the normal layout")
    p.add_argument("--backend", default="cuda", help="cuda, or reference (a CPU smoke run)")
    p.add_argument("--out", default="bench/out")
    p.add_argument("--world", type=int, default=1, help="processes sharing the GPU")
    p.add_argument("--mps", action="store_true", help="run the processes under an MPS daemon")
    p.add_argument("--rank", type=int, default=-1, help="(set by the launcher)")
    p.add_argument("--port", type=int, default=0, help="(set by the launcher)")
    return p.parse_args(argv)


def launch_world(args, argv) -> int:
    """Starts args.world ranks of this script (jax.distributed on 127.0.0.1)."""
    sys.path.insert(0, str(ROOT))
    from bench import common

    return common.launch("bench.bench_padded", args.world, argv, timeout_s=580)


def host_inputs(rng, world, t, h, k, e, rounds, sets=4):
    """x [world, T, H] bf16 and per-round routing idx/w [world, rounds, T, k]."""
    import ml_dtypes
    import numpy as np

    x = rng.normal(size=(world, t, h)).astype(ml_dtypes.bfloat16)
    idx_sets, w_sets = [], []
    for _ in range(sets):
        logits = rng.normal(size=(world, t, e))
        idx_sets.append(np.argsort(-logits, axis=-1)[..., :k].astype(np.int32))
        w_sets.append(rng.random((world, t, k)).astype(np.float32))
    idx = np.stack([idx_sets[i % sets] for i in range(rounds)], axis=1)
    w = np.stack([w_sets[i % sets] for i in range(rounds)], axis=1)
    return x, idx, w


def programs(group, mesh, layout: str, fp8: bool, rounds: int):
    """(dispatch-only, dispatch+combine) programs of `rounds` unrolled rounds."""
    import jax
    import jax.numpy as jnp

    import jax_ep
    from jax_ep import per_rank

    def dispatch(x, i, w):
        if fp8:
            q, s = jax_ep.quantize_fp8(x)
            return jax_ep.dispatch(group, q, i, w, layout=layout, x_scales=s)
        return jax_ep.dispatch(group, x, i, w, layout=layout)

    def only_dispatch(x0, idx_r, w_r):
        def step(acc, inputs):
            d = dispatch(x0, *inputs)
            # Depend on every round's outputs so none is dropped.
            return acc + jnp.sum(d.group_sizes) + d.x[..., 0, 0].astype(jnp.float32).sum(), None
        acc0 = jnp.zeros((), jnp.float32) * x0[0, 0].astype(jnp.float32)  # varying, like acc
        return jax.lax.scan(step, acc0, (idx_r, w_r), unroll=rounds)[0][None]

    def dispatch_combine(x0, idx_r, w_r):
        def step(y, inputs):
            d = dispatch(y, *inputs)
            rows = jax_ep.dequantize_fp8(d.x, d.scales, y.dtype) if fp8 else d.x
            return jax_ep.combine(group, rows, d.handle, weights=d.weights), None
        return jax.lax.scan(step, x0, (idx_r, w_r), unroll=rounds)[0]

    return (per_rank.program(mesh, only_dispatch), per_rank.program(mesh, dispatch_combine))


def bench_tokens(t, args, mesh, to_global):
    import numpy as np

    import jax_ep
    from bench.common import span, timed

    world, h, k, e, rounds = args.world, args.hidden, args.top_k, args.experts, args.rounds
    rng = np.random.default_rng(t)
    inputs = tuple(to_global(a) for a in host_inputs(rng, world, t, h, k, e, rounds))
    rows = []
    # (layout, fp8 rows, zero-filled padding): the padded layout with and without zeroing the
    # E_local * N * M - received rows (EPConfig.padded_zero_fill).
    variants = [("padded", False, True), ("padded", False, False)] + (
        [("padded", True, False)] if args.fp8 else []) + (
        [("normal", False, True)] + ([("normal", True, True)] if args.fp8 else [])
        if args.normal else [])
    for layout, fp8, zero_fill in variants:
        cfg = jax_ep.EPConfig(num_experts=e, top_k=k, max_tokens=t, hidden_size=h,
                              num_sms=args.num_sms, padded_layout=layout == "padded",
                              padded_zero_fill=zero_fill)
        group = jax_ep.EPGroup(mesh, "expert", cfg, backend=args.backend)
        try:
            only_d, d_and_c = programs(group, mesh, layout, fp8, rounds)
            t_d = timed(only_d, [inputs], 1, args.trials)
            t_dc = timed(d_and_c, [inputs], 1, args.trials)
            s_d, s_dc = span(only_d, [inputs], 1), span(d_and_c, [inputs], 1)
            group.check()
        finally:
            group.close()
        rows.append(dict(T=t, H=h, k=k, E=e, world=world, layout=layout, zero_fill=zero_fill,
                         rows_dtype="float8_e4m3fn" if fp8 else "bfloat16", rounds=rounds,
                         dispatch_us=t_d / rounds * 1e6, combine_us=(t_dc - t_d) / rounds * 1e6,
                         round_us=t_dc / rounds * 1e6,
                         # On the GPU timeline (bench_ep.span), None without device events.
                         dispatch_span_us=s_d / rounds * 1e6 if s_d else None,
                         combine_span_us=(s_dc - s_d) / rounds * 1e6 if s_d and s_dc else None,
                         round_span_us=s_dc / rounds * 1e6 if s_dc else None))
        print(f"[rank {args.rank}] T={t} {layout} {'fp8' if fp8 else 'bf16'} "
              f"zero_fill={zero_fill} done", flush=True)
    return rows


def print_table(rows):
    """Per round, wall clock (with JAX's per-program launch cost spread over the rounds) and, in
    the span columns, on the GPU timeline ("-" without device events)."""
    print(f"\n{'world':>5s} {'T':>5s} {'layout':8s} {'rows':6s} {'zeros':5s} {'dispatch us':>12s} "
          f"{'combine us':>11s} {'round us':>9s} {'d span':>7s} {'c span':>7s} {'r span':>7s}")

    def us(v):
        return f"{v:7.1f}" if v is not None else f"{'-':>7s}"

    for r in rows:
        dt = "fp8" if r["rows_dtype"].startswith("float8") else "bf16"
        zeros = "yes" if r["zero_fill"] else "no"
        print(f"{r['world']:5d} {r['T']:5d} {r['layout']:8s} {dt:6s} {zeros:5s} {r['dispatch_us']:12.1f} "
              f"{r['combine_us']:11.1f} {r['round_us']:9.1f} {us(r['dispatch_span_us'])} "
              f"{us(r['combine_span_us'])} {us(r['round_span_us'])}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.world > 1 and args.rank < 0:
        return launch_world(args, argv)
    sys.path.insert(0, str(ROOT))
    import jax

    if args.world > 1:
        jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.world,
                                   process_id=args.rank)
    import numpy as np
    from jax.sharding import Mesh

    from jax_ep import per_rank

    args.rank = max(args.rank, 0)
    mesh = Mesh(np.array(jax.devices()[: args.world]), ("expert",))
    rows = []
    for t in (int(v) for v in args.tokens.split(",") if v):
        rows += bench_tokens(t, args, mesh, lambda a: per_rank.to_global(a, mesh))
    if args.rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                    date=time.strftime("%Y-%m-%d"), world=args.world, mps=args.mps,
                    num_sms=args.num_sms, backend=args.backend)
        suffix = f"_world{args.world}" if args.world > 1 else ""
        (out / f"padded{suffix}.json").write_text(json.dumps(dict(meta=meta, rows=rows),
                                                             indent=1))
        print_table(rows)
    if args.world > 1:
        from jax._src import distributed

        distributed.global_state.client.wait_at_barrier("jax_ep_bench_padded_end", 120_000)
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
