"""Dispatch / combine benchmarks: jax_ep's cuda backend against the XLA pipelines a JAX user has
today and against a device-to-device copy of the same bytes, measured in the same run.

    python bench/bench_ep.py --out bench/out                # world size 1, all shapes
    python bench/bench_ep.py --world 8 --out bench/out      # 8 processes sharing the GPU

Prints a table; writes results.json, results.md (the table with device, driver, jax version and
date, for bench/RESULTS.md) and a PNG plot under --out. Each time is per call, from one jitted
program of `reps` calls on distinct input sets (so XLA can merge none and inputs come from HBM),
two ways: wall clock, median over `trials` runs divided by `reps` (`timed`: it includes JAX's
cost of launching the program, paid once per run and growing with its arguments), and the span
on the GPU timeline of a warm run from a profiler trace (`span`: device time plus the gaps
between kernels). The decode shape is also timed as `rounds` dependent dispatch+combine rounds
unrolled in one program, which XLA runs as one command buffer (CUDA graph), per round.

Bytes that must move (inputs read once, outputs written once): dispatch T*H + C*H elements,
combine C*H + T*H elements (weights and indices are under 0.1% at these shapes and not counted).
The copy ceiling is `a + 1` over an array of half that byte count (it reads and writes), and
(world size 1, where a GPU and nvcc are at hand) `copy(S)`: the copy kernel of bench/copy_kernel
on S blocks of 1024 threads, one per SM of the budget, moving the same bytes, timed the same
way; `x copy(S)` = the cuda backend's span at num_sms = S over the copy kernel's span at S. The
copy kernel is timed at every budget of --num-sms and --copy-sms; bench/bench_copy.py times it
alone (SMs x TB/s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from jax_ep._cli import FlagParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (SHAPES, copy_kernel_times, copy_time, make_inputs, span,  # noqa: E402
                          timed)
from jax_ep.bench import must_move_bytes  # noqa: E402


def parse_args(argv=None):
    p = FlagParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--out", default="bench/out")
    p.add_argument("--num-sms", default="24,132", help="SM budgets to run the cuda backend at")
    p.add_argument("--copy-sms", default="8,16,24,32,132",
                   help="SM budgets to time the copy kernel at, besides those of --num-sms "
                        "(world size 1; '' for --num-sms only)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--trials", type=int, default=7)
    p.add_argument("--rounds", type=int, default=50, help="unrolled rounds for the graph timing")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--tokens", type=int, default=0, help="override T (tokens per rank)")
    p.add_argument("--world", type=int, default=1, help="processes sharing the GPU")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--hosts", type=int, default=1,
                   help="also time the hierarchical backend (both intra-host legs) with the "
                        "ranks split into this many emulated hosts")
    return p.parse_args(argv)


def copy_budgets(args) -> list[int]:
    """The SM budgets the copy kernel is timed at: those of --num-sms and of --copy-sms."""
    return sorted({int(s) for s in f"{args.num_sms},{args.copy_sms}".split(",") if s})


def bench_shape(name, args, mesh, results, to_global, world, copy_kernel_ok=False):
    import numpy as np

    import jax_ep
    from jax_ep import per_rank

    t, h, k, e = SHAPES[name]
    t = args.tokens or t
    rng = np.random.default_rng(0)
    host_sets = make_inputs(rng, world, t, h, k, e, sets=args.reps)
    sets = [tuple(to_global(a) for a in s) for s in host_sets]
    c = world * t * k
    # Dispatch and combine move the same bytes (one reads what the other writes): the copy
    # baselines are timed once and stand beside both.
    nbytes = must_move_bytes(world, t, h, k)
    row = dict(shape=name, T=t, H=h, k=k, E=e, world=world, C=c,
               bytes_dispatch=nbytes, bytes_combine=nbytes)

    if world == 1:
        copy_s, copy_span_s = copy_time(nbytes, args.reps, args.trials)
        for op in ("dispatch", "combine"):
            row[f"copy_{op}_s"], row[f"copy_{op}_span_s"] = copy_s, copy_span_s
    if world == 1 and copy_kernel_ok:
        kernel_times = copy_kernel_times(nbytes, copy_budgets(args), args.reps, args.trials)
        for op in ("dispatch", "combine"):
            for sms, (wall, on_gpu) in kernel_times.items():
                row[f"copy_kernel_sms{sms}_{op}_s"] = wall
                row[f"copy_kernel_sms{sms}_{op}_span_s"] = on_gpu

    def ep_programs(group):
        dispatch = per_rank.program(mesh, lambda x, i, w: (
            lambda d: (d.x, d.weights, d.handle))(jax_ep.dispatch(group, x, i, w)))
        combine = per_rank.program(
            mesh, lambda rows, rw, hd: jax_ep.combine(group, rows, hd, weights=rw))
        return dispatch, combine

    budgets = [int(s) for s in args.num_sms.split(",") if s]
    backends = [("cuda", b, {}) for b in budgets]  # (backend, SM budget, EPGroup keywords)
    if args.hosts > 1:
        # The ranks split into emulated hosts: inter-host leg XLA all_to_all, intra-host leg
        # the cuda kernels or XLA.
        hosts = [args.hosts * r // world for r in range(world)]
        backends += [("hierarchical", budgets[0], dict(hosts=hosts, intra_host=leg))
                     for leg in ("cuda", "xla")]
    if not args.skip_reference and world == 1:
        backends.append(("reference", None, {}))
    for backend, sms, group_kwargs in backends:
        cfg = jax_ep.EPConfig(num_experts=e, top_k=k, max_tokens=t, hidden_size=h,
                              num_sms=sms or 24)
        group = jax_ep.EPGroup(mesh, "expert", cfg, backend=backend, **group_kwargs)
        dispatch, combine = ep_programs(group)
        key = backend if sms is None else f"{backend}_sms{sms}"
        if "intra_host" in group_kwargs:
            key = f"{backend}_{group_kwargs['intra_host']}_sms{sms}"
        row[f"{key}_dispatch_s"] = timed(dispatch, sets, args.reps, args.trials)
        row[f"{key}_dispatch_span_s"] = span(dispatch, sets, args.reps)
        dispatched = [dispatch(*s) for s in sets]
        row[f"{key}_combine_s"] = timed(combine, dispatched, args.reps, args.trials)
        row[f"{key}_combine_span_s"] = span(combine, dispatched, args.reps)
        del dispatched
        if name == "decode" and backend != "reference":
            row[f"{key}_graph_round_s"], row[f"{key}_graph_round_span_s"] = graph_round_time(
                group, mesh, host_sets, to_global, args)
        group.close()

    if world == 1:
        row.update(xla_baselines(sets, t, h, k, e, args))
    results.append(row)
    return row


def graph_round_time(group, mesh, host_sets, to_global, args) -> tuple[float, float | None]:
    """dispatch + combine per round (wall, span), `rounds` rounds unrolled in one program
    (command buffer)."""
    import jax
    import numpy as np

    import jax_ep
    from jax_ep import per_rank

    r = args.rounds
    x = to_global(host_sets[0][0])
    idx = to_global(np.stack([host_sets[i % 4][1] for i in range(r)], axis=1))
    w = to_global(np.stack([host_sets[i % 4][2] for i in range(r)], axis=1))

    def body(x0, idx_r, w_r):
        def step(y, inputs):
            i, wt = inputs
            d = jax_ep.dispatch(group, y, i, wt)
            return jax_ep.combine(group, d.x, d.handle, weights=d.weights), None
        return jax.lax.scan(step, x0, (idx_r, w_r), unroll=r)[0]

    program = per_rank.program(mesh, body)
    wall = timed(program, [(x, idx, w)], 1, args.trials) / r
    on_gpu = span(program, [(x, idx, w)], 1)
    return wall, (on_gpu / r if on_gpu is not None else None)


def xla_baselines(sets, t, h, k, e, args) -> dict:
    """MaxText-style sort-based permute / weighted unpermute (world size 1)."""
    import jax
    import jax.numpy as jnp

    def permute(x, idx, w):
        x, idx, w = x[0], idx[0], w[0]
        flat = idx.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        rows = x[order // k]
        group_sizes = jnp.bincount(flat, length=e)
        return rows, w.reshape(-1)[order], group_sizes, order

    def unpermute(rows, row_w, order):
        unsort = jnp.argsort(order)
        y = rows[unsort].reshape(t, k, h).astype(jnp.float32)
        wt = row_w[unsort].reshape(t, k)
        return jnp.einsum("tkh,tk->th", y, wt).astype(rows.dtype)

    permute_j, unpermute_j = jax.jit(permute), jax.jit(unpermute)
    out = {"xla_permute_s": timed(permute_j, sets, args.reps, args.trials),
           "xla_permute_span_s": span(permute_j, sets, args.reps)}
    permuted = [(p[0], p[1], p[3]) for p in (permute_j(*s) for s in sets)]
    out["xla_unpermute_s"] = timed(unpermute_j, permuted, args.reps, args.trials)
    out["xla_unpermute_span_s"] = span(unpermute_j, permuted, args.reps)
    return out


def natural_key(name: str):
    """Sort key putting cuda_sms24 before cuda_sms132."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def table_lines(results) -> list[str]:
    """wall: `timed` (with JAX's per-program launch cost); span: on the GPU timeline (`span`,
    "-" where the trace has no device events); GB/s and "x copy" against the copy's own span
    (wall where there is no span); "x copy(S)" against the copy kernel's span at the impl's SM
    budget S ("-" where the copy kernel was not timed); then the copy kernel's TB/s per S."""
    lines = [f"{'shape':12s} {'op':9s} {'impl':22s} {'wall us':>9s} {'span us':>9s} "
             f"{'GB/s':>6s} {'x copy':>7s} {'x copy(S)':>9s}"]
    print = lines.append  # noqa: A001 - the table is built line by line

    def us(v):
        return f"{v * 1e6:9.1f}" if v is not None else f"{'-':>9s}"

    for row in results:
        for op in ("dispatch", "combine"):
            nbytes = row[f"bytes_{op}"]
            copy = row.get(f"copy_{op}_span_s") or row.get(f"copy_{op}_s")
            impls = sorted((k[: -len(f"_{op}_s")] for k in row if k.endswith(f"_{op}_s")),
                           key=natural_key)
            if op == "dispatch" and "xla_permute_s" in row:
                impls.append("xla_permute")
            if op == "combine" and "xla_unpermute_s" in row:
                impls.append("xla_unpermute")
            for impl in impls:
                key = f"{impl}_{op}" if f"{impl}_{op}_s" in row else impl
                wall, on_gpu = row[f"{key}_s"], row.get(f"{key}_span_s")
                best = on_gpu or wall
                ratio = f"{best / copy:7.2f}" if copy else "      -"
                budget = re.search(r"_sms(\d+)$", impl)
                copy_s = budget and (row.get(f"copy_kernel_sms{budget[1]}_{op}_span_s")
                                     or row.get(f"copy_kernel_sms{budget[1]}_{op}_s"))
                ratio_s = f"{best / copy_s:9.2f}" if copy_s else f"{'-':>9s}"
                print(f"{row['shape']:12s} {op:9s} {impl:22s} {us(wall)} {us(on_gpu)} "
                      f"{nbytes / best / 1e9:6.0f} {ratio} {ratio_s}")
        for key in [k for k in row if k.endswith("_graph_round_s")]:
            print(f"{row['shape']:12s} {'d+c round':9s} {key[:-14]:22s} {us(row[key])} "
                  f"{us(row.get(key[:-2] + '_span_s'))}")
        copies = sorted(((int(m[1]), row.get(k[:-2] + "_span_s") or row[k]) for k in row
                         if (m := re.fullmatch(r"copy_kernel_sms(\d+)_dispatch_s", k))))
        if copies:  # bytes read + written over the span (wall where there is no span)
            print(f"{row['shape']:12s} copy(S) TB/s: " + "  ".join(
                f"S={sms} {row['bytes_dispatch'] / s / 1e12:.2f}" for sms, s in copies))
    return lines


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, op in zip(axes, ("dispatch", "combine")):
        labels, values = [], []
        for row in results:
            impls = {k[: -len(f"_{op}_s")]: row.get(k[:-2] + "_span_s") or v
                     for k, v in row.items() if k.endswith(f"_{op}_s")}
            base_key = "xla_permute" if op == "dispatch" else "xla_unpermute"
            base = row.get(base_key + "_span_s") or row.get(base_key + "_s")
            if base:
                impls["xla"] = base
            for impl, s in sorted(impls.items()):
                labels.append(f"{row['shape']}\n{impl}")
                values.append(row[f"bytes_{op}"] / s / 1e9)
        ax.barh(range(len(values)), values)
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.set_xlabel("GB/s (bytes that must move / time on the GPU timeline)")
        ax.set_title(op)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    if args.world > 1:
        jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.world,
                                   process_id=args.rank)
    import numpy as np
    from jax.sharding import Mesh

    from jax_ep import per_rank

    mesh = Mesh(np.array(jax.devices()[: args.world]), ("expert",))
    copy_kernel_skipped = None
    if args.world == 1:
        from bench.copy_kernel import unavailable

        copy_kernel_skipped = unavailable()
        if copy_kernel_skipped:
            print(f"copy kernel: skipped, no copy(S) column ({copy_kernel_skipped})", flush=True)
    results = []
    for name in args.shapes.split(","):
        bench_shape(name, args, mesh, results, lambda a: per_rank.to_global(a, mesh),
                    args.world, copy_kernel_ok=args.world == 1 and not copy_kernel_skipped)
        print(f"[rank {args.rank}] {name} done", flush=True)
    if args.rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                    date=time.strftime("%Y-%m-%d"), world=args.world)
        if args.world == 1:  # the copy kernel's budgets, or why it was skipped
            meta["copy_kernel_sms"] = [] if copy_kernel_skipped else copy_budgets(args)
            meta["copy_kernel_skipped"] = copy_kernel_skipped
        suffix = (f"_world{args.world}" if args.world > 1 else "") + args.tag
        (out / f"results{suffix}.json").write_text(json.dumps(dict(meta=meta, rows=results),
                                                              indent=1))
        lines = table_lines(results)
        print("\n" + "\n".join(lines))
        driver = os.popen("nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null").read()
        (out / f"results{suffix}.md").write_text(
            f"### {meta['device']}, world {args.world}, jax {meta['jax']}, driver "
            f"{driver.strip() or '?'}, {meta['date']}\n\n"
            f"`python bench/bench_ep.py {' '.join(sys.argv[1:])}`\n\n```\n"
            + "\n".join(lines) + "\n```\n")
        plot(results, out / f"bench{suffix}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
