"""Dispatch / combine across several GPUs of one host, one process driving them all

    python bench/bench_multigpu.py --out bench/out                 # every local GPU
    python bench/bench_multigpu.py --backend reference --cpu 8     # smoke run on 8 CPU devices

For each shape, per operation: time (wall clock, bench.common.timed, and the span on the GPU
timeline, bench.common.span), bandwidth in two metrics (from the span), and the
XLA pipelines a JAX user has today:
  - logical (DeepEP's): bytes of the tokens each rank receives, one copy per (token, rank),
    its own tokens included;
  - wire: the same without a rank's own tokens, i.e. what crosses NVLink;
  - xla_a2a: permute by destination rank into fixed [N, T*k] slabs, all_to_all, permute by
    local expert (GShard-style, dropless capacity); combine the reverse, weighted sum in f32;
  - xla_ragged: sort slots by expert, ragged_all_to_all of the contiguous runs, sort by local
    expert on arrival; combine the reverse (GPU only: XLA:CPU lacks ragged-all-to-all);
  - peer copy: cudaMemcpyPeerAsync of a large buffer between GPU 0 and GPU 1 (cupy, CUDA
    events), the NVLink ceiling the wire bandwidth is compared with.
Prints a table; writes results_multigpu.json and .md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from jax_ep._cli import FlagParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = FlagParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="deepseek_v3,decode")
    p.add_argument("--out", default="bench/out")
    p.add_argument("--num-sms", type=int, default=24)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--tokens", type=int, default=0, help="override T (tokens per rank)")
    p.add_argument("--backend", default="cuda", help="jax_ep backend (reference for a smoke run)")
    p.add_argument("--cpu", type=int, default=0, help="run on this many emulated CPU devices")
    return p.parse_args(argv)


def routing_bytes(idx, experts_per_rank: int, row_bytes: int) -> tuple[float, float]:
    """Mean over ranks of (logical, wire) bytes received by dispatch: one row per (source token,
    destination rank) with a routed slot there; wire leaves out a rank's own tokens."""
    import numpy as np

    n = idx.shape[0]
    dest = np.where(idx >= 0, idx // experts_per_rank, -1)  # [N, T, k]
    logical = wire = 0
    for d in range(n):
        hits = (dest == d).any(axis=2)  # [N src, T]
        logical += hits.sum()
        wire += hits.sum() - hits[d].sum()
    return logical * row_bytes / n, wire * row_bytes / n


def xla_pipelines(mesh, t: int, k: int, e: int, ragged: bool):
    """(dispatch, combine) of the all_to_all pipeline, or of the ragged_all_to_all one."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    n = mesh.shape["expert"]
    el = e // n
    s = t * k

    def dispatch(x, idx, w):
        flat = idx.reshape(-1)
        dest = flat // el
        if ragged:
            order = jnp.argsort(flat, stable=True)  # by expert, so by destination rank
            rows = x[order // k]
            send = jnp.bincount(dest, length=n).astype(jnp.int32)
            all_send = lax.all_gather(send, "expert")  # [src, dst]
            me = lax.axis_index("expert")
            out_off = (jnp.cumsum(all_send, axis=0) - all_send)[me]
            recv = all_send[:, me]
            got = lax.ragged_all_to_all(rows, jnp.zeros((n * s, x.shape[1]), x.dtype),
                                        jnp.cumsum(send) - send, send, out_off, recv,
                                        axis_name="expert")
            got_e = lax.ragged_all_to_all(flat[order], jnp.full((n * s,), e, flat.dtype),
                                          jnp.cumsum(send) - send, send, out_off, recv,
                                          axis_name="expert")
            back = jnp.argsort(got_e, stable=True)
            return got[back], (order, send, out_off, recv, back)
        # Slot f goes to slab dest[f] at its rank among the slots for that rank.
        onehot = jax.nn.one_hot(dest, n, dtype=jnp.int32)
        pos = jnp.sum((jnp.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
        slab = jnp.zeros((n, s, x.shape[1]), x.dtype).at[dest, pos].set(jnp.repeat(x, k, axis=0))
        ids = jnp.full((n, s), e, flat.dtype).at[dest, pos].set(flat)
        got = lax.all_to_all(slab, "expert", 0, 0).reshape(n * s, x.shape[1])
        got_e = lax.all_to_all(ids, "expert", 0, 0).reshape(-1)
        back = jnp.argsort(got_e, stable=True)
        return got[back], (dest, pos, back)

    def combine(rows, w, state):
        h = rows.shape[1]
        if ragged:
            order, send, out_off, recv, back = state
            unsorted = jnp.zeros_like(rows).at[back].set(rows)
            # The reverse exchange: what arrived from rank r at out_off[r] goes back to r.
            me = lax.axis_index("expert")
            all_recv_off = lax.all_gather(out_off, "expert")[:, me]  # where r's rows sit here
            returned = lax.ragged_all_to_all(unsorted, jnp.zeros((s, h), rows.dtype),
                                             all_recv_off, recv, jnp.cumsum(send) - send, send,
                                             axis_name="expert")
            per_slot = jnp.zeros((s, h), rows.dtype).at[order].set(returned)
        else:
            dest, pos, back = state
            unsorted = jnp.zeros_like(rows).at[back].set(rows).reshape(n, s, h)
            returned = lax.all_to_all(unsorted, "expert", 0, 0)
            per_slot = returned[dest, pos]
        y = per_slot.reshape(t, k, h).astype(jnp.float32) * w[..., None]
        return jnp.sum(y, axis=1).astype(rows.dtype)

    return dispatch, combine


def check_baseline(label, d_prog, c_prog, inputs, reference, reference_out) -> None:
    """A baseline must compute what jax_ep does: the same expert-major rows (both orders are
    (local expert, source rank, token, slot), zero rows last) and the same weighted combine."""
    import numpy as np

    rows, state = d_prog(*inputs)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(reference[0]), err_msg=label)
    out = c_prog(rows, inputs[2], state)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(reference_out, np.float32),
                               rtol=2e-2, atol=2e-2, err_msg=label)


def peer_copy_gbps(nbytes: int, trials: int) -> float | None:
    """One-way GPU 0 -> GPU 1 copy bandwidth (cudaMemcpyPeerAsync, CUDA events), or None."""
    try:
        import cupy
    except ImportError:
        return None
    if cupy.cuda.runtime.getDeviceCount() < 2:
        return None
    with cupy.cuda.Device(0):
        src = cupy.ones(nbytes // 4, cupy.float32)
    with cupy.cuda.Device(1):
        dst = cupy.empty(nbytes // 4, cupy.float32)
    with cupy.cuda.Device(0):
        stream = cupy.cuda.Stream(non_blocking=True)
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        samples = []
        for i in range(trials + 1):
            start.record(stream)
            cupy.cuda.runtime.memcpyPeerAsync(dst.data.ptr, 1, src.data.ptr, 0, nbytes, stream.ptr)
            stop.record(stream)
            stop.synchronize()
            if i:  # the first copy warms up the peer mapping
                samples.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    samples.sort()
    return nbytes / samples[len(samples) // 2] / 1e9


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.cpu}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    from jax.sharding import Mesh

    import jax_ep
    from bench.common import SHAPES, make_inputs, span, timed
    from jax_ep import per_rank

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("expert",))
    n = len(devices)
    rows_out = []
    for name in args.shapes.split(","):
        t, h, k, e = SHAPES[name]
        t = args.tokens or t
        host_sets = make_inputs(np.random.default_rng(0), n, t, h, k, e, sets=args.reps)
        sets = [tuple(per_rank.to_global(a, mesh) for a in s) for s in host_sets]
        logical, wire = routing_bytes(host_sets[0][1], e // n, h * 2)
        row = dict(shape=name, N=n, T=t, H=h, k=k, E=e, logical_bytes=logical, wire_bytes=wire)
        cfg = jax_ep.EPConfig(num_experts=e, top_k=k, max_tokens=t, hidden_size=h,
                              num_sms=args.num_sms)
        with jax_ep.EPGroup(mesh, "expert", cfg, backend=args.backend) as group:
            dispatch = per_rank.program(mesh, lambda x, i, w: (
                lambda d: (d.x, d.weights, d.handle))(jax_ep.dispatch(group, x, i, w)))
            combine = per_rank.program(
                mesh, lambda r, rw, hd: jax_ep.combine(group, r, hd, weights=rw))
            row["jax_ep_dispatch_s"] = timed(dispatch, sets, args.reps, args.trials)
            row["jax_ep_dispatch_span_s"] = span(dispatch, sets, args.reps)
            dispatched = [dispatch(*s) for s in sets]
            row["jax_ep_combine_s"] = timed(combine, dispatched, args.reps, args.trials)
            row["jax_ep_combine_span_s"] = span(combine, dispatched, args.reps)
            del dispatched
            reference = dispatch(*sets[0])
            reference_out = combine(reference[0], reference[1], reference[2])
        pipelines = ["xla_a2a"] + ([] if args.cpu else ["xla_ragged"])
        for label in pipelines:
            d_fn, c_fn = xla_pipelines(mesh, t, k, e, ragged=label == "xla_ragged")
            d_prog = per_rank.program(mesh, d_fn)
            check_baseline(label, d_prog, per_rank.program(mesh, c_fn), sets[0], reference,
                           reference_out)
            row[f"{label}_dispatch_s"] = timed(d_prog, sets, args.reps, args.trials)
            row[f"{label}_dispatch_span_s"] = span(d_prog, sets, args.reps)
            outs = [d_prog(*s) for s in sets]
            c_prog = per_rank.program(mesh, lambda r, w, st: c_fn(r, w, st))
            c_sets = [(o[0], s[2], o[1]) for o, s in zip(outs, sets)]
            row[f"{label}_combine_s"] = timed(c_prog, c_sets, args.reps, args.trials)
            row[f"{label}_combine_span_s"] = span(c_prog, c_sets, args.reps)
            del outs
        rows_out.append(row)
        print(f"{name} done", flush=True)

    peer = None if args.cpu else peer_copy_gbps(1 << 30, args.trials)
    lines = [f"peer copy GPU0->GPU1 (cudaMemcpyPeerAsync, 1 GiB): "
             f"{'n/a' if peer is None else f'{peer:.0f} GB/s'}",
             f"{'shape':12s} {'op':9s} {'impl':12s} {'wall us':>9s} {'span us':>9s} "
             f"{'logical GB/s':>13s} {'wire GB/s':>10s} {'wire/peer':>9s}"]
    for row in rows_out:
        for op in ("dispatch", "combine"):
            for impl in ("jax_ep", "xla_a2a", "xla_ragged"):
                wall = row.get(f"{impl}_{op}_s")
                if wall is None:
                    continue
                on_gpu = row.get(f"{impl}_{op}_span_s")
                sec = on_gpu or wall  # bandwidths from the GPU timeline where there is one
                wire_gbps = row["wire_bytes"] / sec / 1e9
                ratio = f"{wire_gbps / peer:9.2f}" if peer else "        -"
                span_us = f"{on_gpu * 1e6:9.1f}" if on_gpu else f"{'-':>9s}"
                lines.append(f"{row['shape']:12s} {op:9s} {impl:12s} {wall * 1e6:9.1f} {span_us} "
                             f"{row['logical_bytes'] / sec / 1e9:13.0f} {wire_gbps:10.0f} {ratio}")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=str(devices[0].device_kind), n=n, jax=jax.__version__,
                date=time.strftime("%Y-%m-%d"), peer_copy_gbps=peer, num_sms=args.num_sms)
    (out / "results_multigpu.json").write_text(json.dumps(dict(meta=meta, rows=rows_out), indent=1))
    (out / "results_multigpu.md").write_text(
        f"### {meta['device']} x{n}, one process, jax {meta['jax']}, {meta['date']}\n\n```\n"
        + "\n".join(lines) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
