"""One MoE layer step (forward + backward) on one GPU: jax_ep dispatch / grouped-GEMM experts /
combine, each expert-matmul implementation of jax_ep.nn.expert_gemm side by side, against the
MaxText-style XLA layer (sort-based permute, grouped matmuls, unpermute) on the same inputs.

    python bench/bench_layer.py --out bench/out_layer            # GPU: the two shapes
    python bench/bench_layer.py --smoke --out /tmp/smoke         # CPU, tiny shapes (a check)

Shapes (T tokens per step, H, F, E experts, top-k): deepseek_v3 (8192, 7168, 2048, 256, 8) and
mixtral (8192, 4096, 14336, 8, 2), bf16, all experts on the one GPU, router weights random
(the routing they give is roughly balanced). A step is jax.value_and_grad of
sum(y * cot) + 0.01 * aux_loss with respect to every parameter and x, jitted.

Measured (median of --reps timed calls after --warmup, each ended by block_until_ready, wall
clock; every step returns all gradients):
  step         the whole layer step, experts by one implementation (`impl`);
  experts      grouped_swiglu alone, forward + backward (gradients of rows and weights) on the
               rows and group sizes of a real dispatch: its TFLOP/s counts the 9 expert
               matmuls of a step, 2 * R * H * F FLOPs each (R = T * k routed rows; 3 forward,
               6 backward), whatever the implementation computes besides (padding, gathers);
  identity     the step with the experts replaced by the identity (router, dispatch, combine,
               their backward), and `router` the router and aux loss alone: the dispatch +
               combine share of a step is (identity - router) / step;
  maxtext      the MaxText-style layer: argsort of the top-k ids, row gather, bincount group
               sizes, the grouped matmuls (lax.ragged_dot, or an expert_gemm implementation),
               inverse argsort, weighted sum;
  dense        a bf16 [8192, 8192] @ [8192, 8192] matmul, the rate the expert GEMMs are
               measured against.
lax.ragged_dot lowers on GPUs to a dense product over every expert (E times the FLOPs and
memory); where it fails to compile or run at the full shape it is tried at the smaller (T, E)
of RAGGED_FALLBACK (or --ragged-tokens), and the best implementation is timed there too, for
the speedup. --router-skew makes the routing imbalanced (the capacity layout's overflow
passes at work).

Each measurement runs in try/except: a failure (compile error, out of memory) is recorded with
its message and the run goes on; after --budget-s seconds the rest is recorded as skipped.
results_layer.json and results_layer.md (the tables, device, versions) are written to --out
after every measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from jax_ep._cli import FlagParser

# name: (T tokens per step, H, F, E, k)
SHAPES = {
    "deepseek_v3": (8192, 7168, 2048, 256, 8),
    "mixtral": (8192, 4096, 14336, 8, 2),
}
SMOKE_SHAPES = {
    "deepseek_v3": (64, 64, 32, 16, 4),
    "mixtral": (64, 32, 64, 4, 2),
}
# (T, E) at which lax.ragged_dot is tried, in order, when it fails at the shape's own: fewer
# tokens, then fewer experts (its GPU lowering's memory and FLOPs grow with E * T).
RAGGED_FALLBACK = {"deepseek_v3": ((1024, 256), (512, 256), (2048, 64), (512, 64)),
                   "mixtral": ((4096, 8), (2048, 8))}
DEFAULT_IMPLS = "capacity"
AUX_COEF = 0.01


def parse_args(argv=None):
    p = FlagParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--tokens", type=int, default=0, help="override T (tokens per step)")
    p.add_argument("--impls", default=DEFAULT_IMPLS,
                   help="comma-separated expert_gemm implementations for the jax_ep layer at "
                        "the full T (lax.ragged_dot is measured separately, step 4)")
    p.add_argument("--ragged-tokens", default=None,
                   help="comma-separated T or TxE to try lax.ragged_dot at, in order "
                        "(default: the full shape, then RAGGED_FALLBACK)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="start no new measurement after this many seconds")
    p.add_argument("--router-skew", type=float, default=0.0,
                   help="add S * b_e (b_e ~ N(0, 1), fixed per expert) to every token's router "
                        "logits: imbalanced routing (0 = the random router's, about balanced)")
    p.add_argument("--dense-size", type=int, default=8192)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, CPU-friendly")
    p.add_argument("--out", default="bench/out_layer")
    return p.parse_args(argv)


class Bench:
    """Runs measurements, each guarded, and keeps the rows written to --out."""

    def __init__(self, args):
        self.args = args
        self.t_start = time.perf_counter()
        self.rows: list[dict] = []
        self.meta: dict = {}
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t_start > self.args.budget_s

    def measure(self, row: dict, make, args_fn) -> dict:
        """row: labels; make() -> the jitted function; args_fn() -> its arguments."""
        import jax

        row = dict(row)
        if self.over_budget():
            row.update(status="skipped", error=f"time budget of {self.args.budget_s:.0f} s spent")
        else:
            try:
                fn, fn_args = make(), args_fn()
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*fn_args))
                row["first_call_s"] = time.perf_counter() - t0
                for _ in range(self.args.warmup):
                    jax.block_until_ready(fn(*fn_args))
                samples = []
                for _ in range(self.args.reps):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(*fn_args))
                    samples.append(time.perf_counter() - t0)
                row.update(status="ok", time_s=statistics.median(samples), samples_s=samples)
            except Exception as e:  # noqa: BLE001 - every failure is a result here
                lines = [ln for ln in str(e).splitlines() if ln.strip()]
                row.update(status="failed", error=f"{type(e).__name__}: "
                           f"{(lines[0] if lines else '')[:400]}")
                tb = traceback.format_exc().splitlines()
                print("\n".join(tb[-25:]), file=sys.stderr, flush=True)
            gc.collect()
        return self.record(row)

    def record(self, row: dict) -> dict:
        self.rows.append(row)
        shown = (f"{row['time_s'] * 1e3:10.2f} ms" if row["status"] == "ok"
                 else f"{row['status']}: {row.get('error', '')[:150]}")
        print(f"[{time.perf_counter() - self.t_start:7.1f} s] {row.get('shape', '-'):12s} "
              f"{row['kind']:9s} {row.get('impl', '-'):15s} T={row.get('T', '-')}: {shown}",
              flush=True)
        self.write()
        return row

    def write(self) -> None:
        (self.out / "results_layer.json").write_text(
            json.dumps(dict(meta=self.meta, rows=self.rows), indent=1, default=str))
        (self.out / "results_layer.md").write_text("\n".join(markdown(self.meta, self.rows)) + "\n")


# --- the layers ----------------------------------------------------------------------------------

def make_setup(t: int, dims, mesh, dtype, seed=0, skew=0.0):
    """Spec, params (bf16 experts, f32 router), x [T, H], cot [T, H]. With skew, x[:, 0] = 4
    and router[0] = skew * b / 4: every token's logits get the same per-expert offset."""
    import jax
    import jax.numpy as jnp

    from jax_ep.nn import moe_math

    _, h, f, e, k = dims
    spec = moe_math.MoESpec(hidden=h, ffn=f, num_experts=e, top_k=k, mesh=mesh, dtype=dtype,
                            backend="auto")
    keys = jax.random.split(jax.random.key(seed), 6)
    scale = {"router": h, "w_gate": h, "w_up": h, "w_down": f}
    shapes = {"router": (h, e), "w_gate": (e, h, f), "w_up": (e, h, f), "w_down": (e, f, h)}
    params = {n: (jax.random.normal(keys[i], s, jnp.float32 if n == "router" else dtype)
                  / math.sqrt(scale[n])) for i, (n, s) in enumerate(shapes.items())}
    x = jax.random.normal(keys[4], (t, h), dtype)
    cot = jax.random.normal(keys[5], (t, h), dtype)
    if skew:
        x = x.at[:, 0].set(4)
        offsets = skew * jax.random.normal(jax.random.key(seed + 1), (e,), jnp.float32)
        params["router"] = params["router"].at[0].set(offsets / 4)
    return spec, params, x, cot


def _aux_loss(routing, num_experts: int, tokens: int, top_k: int):
    """Switch load-balancing loss over this shard (1 device: all tokens)."""
    import jax
    import jax.numpy as jnp

    counts = jnp.zeros(num_experts, jnp.float32).at[routing.experts.reshape(-1)].add(1.0)
    f = jax.lax.stop_gradient(counts) / (tokens * top_k)
    return num_experts * jnp.sum(f * jnp.sum(routing.scores, axis=0) / tokens)


def experts_fn(impl: str, expected_rows: int):
    """rows, group_sizes, w -> expert outputs, by `impl` ("identity": the rows themselves)."""
    from jax_ep.nn import expert_gemm

    def run(rows, group_sizes, w_gate, w_up, w_down):
        if impl == "identity":
            return rows
        return expert_gemm.grouped_swiglu(rows, group_sizes, w_gate, w_up, w_down, impl=impl,
                                          expected_rows=expected_rows)

    return run


def ep_step(spec, mesh, impl: str):
    """jit(value_and_grad) of the jax_ep layer: router, dispatch, experts, combine, aux loss;
    impl "router" leaves out dispatch / experts / combine (y = the routing weights' sum * x)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jax_ep
    from jax_ep.nn import moe_math

    k, e = spec.top_k, spec.num_experts

    def body(x, params, cot):
        t = x.shape[0]
        routing = moe_math.route(x, params["router"], spec)
        if impl == "router":
            y = (jnp.sum(routing.weights, axis=1, keepdims=True) * x.astype(jnp.float32))
        else:
            group = moe_math.group_for(spec, t)
            d = jax_ep.dispatch(group, x, routing.experts, routing.weights)
            rows = experts_fn(impl, t * k)(d.x, d.group_sizes, params["w_gate"], params["w_up"],
                                           params["w_down"])
            y = jax_ep.combine(group, rows, d.handle, weights=d.weights)
        loss = jnp.sum(y.astype(jnp.float32) * cot.astype(jnp.float32))
        return (loss + AUX_COEF * _aux_loss(routing, e, t, k))[None]

    specs = {n: P("expert") if n in moe_math.EXPERT_PARAMS else P()
             for n in ("router", *moe_math.EXPERT_PARAMS)}
    per_rank = jax.shard_map(body, mesh=mesh, in_specs=(P("expert"), specs, P("expert")),
                             out_specs=P("expert"))
    return jax.jit(jax.value_and_grad(lambda params, x, cot: jnp.sum(per_rank(x, params, cot)),
                                      argnums=(0, 1)))


def maxtext_step(spec, impl: str):
    """jit(value_and_grad) of the MaxText-style layer (no jax_ep): sort-based permute, grouped
    matmuls by `impl` ("ragged" = lax.ragged_dot), unpermute."""
    import jax
    import jax.numpy as jnp

    from jax_ep.nn import moe_math

    k, e = spec.top_k, spec.num_experts

    def loss_fn(params, x, cot):
        t, h = x.shape
        routing = moe_math.route(x, params["router"], spec)
        flat = routing.experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        rows = x[order // k]
        group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
        out = experts_fn(impl, t * k)(rows, group_sizes, params["w_gate"], params["w_up"],
                                      params["w_down"])
        unsort = jnp.argsort(order)
        y = jnp.einsum("tkh,tk->th", out[unsort].reshape(t, k, h).astype(jnp.float32),
                       routing.weights)
        loss = jnp.sum(y * cot.astype(jnp.float32))
        return loss + AUX_COEF * _aux_loss(routing, e, t, k)

    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))


def experts_only(impl: str, expected_rows: int):
    """jit of grouped_swiglu's forward + backward (cotangents of rows and the three weights)."""
    import jax
    import jax.numpy as jnp

    run = experts_fn(impl, expected_rows)

    def loss(rows, weights, group_sizes, cot):
        return jnp.sum(run(rows, group_sizes, *weights).astype(jnp.float32) * cot)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def dispatched_rows(spec, mesh, params, x):
    """The rows [C, H] and group sizes [E] a dispatch of x gives (forward only)."""
    import jax
    from jax.sharding import PartitionSpec as P

    import jax_ep
    from jax_ep.nn import moe_math

    def body(x, router):
        routing = moe_math.route(x, router, spec)
        d = jax_ep.dispatch(moe_math.group_for(spec, x.shape[0]), x, routing.experts,
                            routing.weights)
        return d.x, d.group_sizes[None]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("expert"), P()),
                              out_specs=(P("expert"), P("expert"))))
    rows, sizes = f(x, params["router"])
    return rows, sizes[0]


def dense_rate(n: int, reps: int = 8, trials: int = 5) -> dict:
    """bf16 [n, n] @ [n, n]: `reps` products on distinct operands in one program, median of
    `trials` runs. TFLOP/s."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(7), reps + 1)
    a = jax.random.normal(keys[0], (n, n), jnp.bfloat16)
    bs = [jax.random.normal(kk, (n, n), jnp.bfloat16) for kk in keys[1:]]
    prog = jax.jit(lambda a, bs: [a @ b for b in bs])
    jax.block_until_ready(prog(a, bs))
    samples = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready(prog(a, bs))
        samples.append((time.perf_counter() - t0) / reps)
    s = statistics.median(samples)
    return dict(n=n, time_s=s, tflops=2 * n ** 3 / s / 1e12)


# --- one shape -----------------------------------------------------------------------------------

def expert_flops(t: int, h: int, f: int, k: int) -> float:
    """The 9 matmuls of a forward + backward of the routed experts (R = T * k rows)."""
    return 9 * 2.0 * t * k * h * f


def bench_shape(bench: Bench, name: str, dims, mesh, args) -> None:
    """Measurements in order of importance (a spent budget skips the last): the jax_ep layer
    step by each implementation, their experts alone, identity / router steps, the MaxText-style
    layer with the best implementation, lax.ragged_dot (at the full shape, else the first of
    RAGGED_FALLBACK that runs), and at that shape the MaxText-style layer with ragged_dot and
    the best implementation in both layers."""
    t_full, h, f, e_full, k = dims
    t_full = args.tokens or t_full
    full = (t_full, e_full)
    impls = [i for i in args.impls.split(",") if i]
    state: dict = {}

    def row(kind, impl, at, **extra):
        t, e = at
        return dict(shape=name, H=h, F=f, E=e, k=k, kind=kind, impl=impl, T=t,
                    expert_flops=expert_flops(t, h, f, k), **extra)

    def setup(at):
        if state.get("at") != at:
            state.clear()
            gc.collect()
            t, e = at
            state["at"] = at
            state["spec"], state["params"], state["x"], state["cot"] = make_setup(
                t, (t, h, f, e, k), mesh, "bfloat16", skew=args.router_skew)
        return state

    def step(kind, impl, at):
        if kind in ("step", "identity", "router"):
            def make():
                return ep_step(setup(at)["spec"], mesh, impl)
        else:
            def make():
                return maxtext_step(setup(at)["spec"], impl)
        return bench.measure(row(kind, impl, at), make,
                             lambda: (setup(at)["params"], setup(at)["x"], setup(at)["cot"]))

    # 1. The jax_ep layer at the full shape by each implementation.
    timed = {}
    for impl in impls:
        why = _unavailable(impl)
        if why:
            bench.record(row("step", impl, full, status="unavailable", error=why))
            continue
        r = step("step", impl, full)
        if r["status"] == "ok":
            timed[impl] = r["time_s"]
    best = min(timed, key=timed.get) if timed else None

    # 2. Their experts alone, on the rows and group sizes of a real dispatch.
    _experts_alone(bench, row, setup(full), mesh, list(timed), full, k)

    # 3. Dispatch + combine share: identity experts, and the router alone; the MaxText-style
    # layer with the best implementation.
    step("identity", "identity", full)
    step("router", "router", full)
    if best:
        step("maxtext", best, full)

    # 4. lax.ragged_dot in the jax_ep layer: the full shape, else the largest that runs.
    if args.ragged_tokens is not None:
        candidates = [_parse_at(v, e_full) for v in args.ragged_tokens.split(",") if v]
    elif args.smoke:
        candidates = [full]
    else:
        candidates = [full] + [at for at in RAGGED_FALLBACK.get(name, ()) if at != full]
    at_ragged = None
    for at in candidates:
        r = step("step", "ragged", at)
        if r["status"] == "ok":
            at_ragged = at
            break
        if r["status"] == "skipped":
            break

    # 5. At ragged_dot's shape: the MaxText-style layer with ragged_dot, and the best
    # implementation in both layers.
    if at_ragged is not None:
        step("maxtext", "ragged", at_ragged)
        if best and at_ragged != full:
            step("step", best, at_ragged)
            step("maxtext", best, at_ragged)
    state.clear()
    gc.collect()


def _parse_at(text: str, num_experts: int) -> tuple[int, int]:
    """"T" or "TxE" -> (T, E)."""
    t, _, e = text.partition("x")
    return int(t), int(e) if e else num_experts


def _unavailable(impl: str) -> str | None:
    from jax_ep.nn import expert_gemm

    if impl not in expert_gemm.IMPLS:
        return f"not an expert_gemm implementation (one of {expert_gemm.IMPLS})"
    return None


def _experts_alone(bench: Bench, row, state, mesh, impls, at, k) -> None:
    """grouped_swiglu forward + backward alone on a real dispatch's rows, per implementation;
    the routing's balance and the capacity layout for it go to the meta data."""
    import jax
    import jax.numpy as jnp

    from jax_ep.nn import expert_gemm

    t, e = at
    try:
        rows, sizes = dispatched_rows(state["spec"], mesh, state["params"], state["x"])
        sizes_np = jax.device_get(sizes)
        plan = expert_gemm.capacity_plan(rows.shape[0], e, expected_rows=t * k)
        balance = dict(rows_buffer=int(rows.shape[0]), routed=int(sizes_np.sum()),
                       max_group=int(sizes_np.max()), min_group=int(sizes_np.min()),
                       mean_group=float(sizes_np.mean()), capacity=plan.capacity,
                       overflow_passes=int(expert_gemm._overflow_passes(sizes, plan)))
        bench.meta.setdefault("routing", {})[row("", "", at)["shape"]] = balance
        print(f"routing: {balance}", flush=True)
        weights = tuple(state["params"][n] for n in ("w_gate", "w_up", "w_down"))
        cot = jax.random.normal(jax.random.key(3), rows.shape, jnp.float32).astype(rows.dtype)
    except Exception as ex:  # noqa: BLE001
        print(f"dispatched rows failed: {type(ex).__name__}: {ex}", file=sys.stderr, flush=True)
        return
    for impl in impls:
        bench.measure(row("experts", impl, at), lambda impl=impl: experts_only(impl, t * k),
                      lambda: (rows, weights, sizes, cot))


# --- the report ----------------------------------------------------------------------------------

def _find(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()) and r.get("status") == "ok":
            return r
    return None


def summary(meta, rows) -> list[dict]:
    """Per (shape, T, layer, impl) step: time, expert TFLOP/s, d+c share, speedup."""
    dense = (meta.get("dense") or {}).get("tflops")
    out = []
    for r in rows:
        if r["kind"] not in ("step", "maxtext"):
            continue
        at = dict(shape=r["shape"], T=r["T"], E=r["E"])
        s = dict(at, layer="jax_ep" if r["kind"] == "step" else "maxtext", impl=r["impl"],
                 status=r["status"], error=r.get("error"))
        if r["status"] == "ok":
            s["step_ms"] = r["time_s"] * 1e3
            alone = _find(rows, **at, kind="experts", impl=r["impl"])
            if alone:
                s["experts_ms"] = alone["time_s"] * 1e3
                s["expert_tflops"] = r["expert_flops"] / alone["time_s"] / 1e12
                if dense:
                    s["of_dense"] = s["expert_tflops"] / dense
            ident = _find(rows, **at, kind="identity")
            router = _find(rows, **at, kind="router")
            if ident and r["kind"] == "step":
                in_step = r["time_s"] - ident["time_s"]
                if in_step > 0:
                    s["expert_tflops_in_step"] = r["expert_flops"] / in_step / 1e12
                if router:
                    s["dc_share"] = max(ident["time_s"] - router["time_s"], 0) / r["time_s"]
            rag = _find(rows, **at, kind="step", impl="ragged")
            if rag:
                s["vs_jax_ep_ragged"] = rag["time_s"] / r["time_s"]
            mt = _find(rows, **at, kind="maxtext", impl="ragged")
            if mt:
                s["vs_maxtext_ragged"] = mt["time_s"] / r["time_s"]
        out.append(s)
    return out


def markdown(meta, rows) -> list[str]:
    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    lines = [f"### MoE layer step, {meta.get('device', '?')}, jax {meta.get('jax', '?')}, "
             f"{meta.get('date', '')}", "",
             f"`python bench/bench_layer.py {meta.get('argv', '')}`", ""]
    dense = meta.get("dense") or {}
    if dense:
        lines += [f"Dense bf16 matmul {dense.get('n')}^3: {f(dense.get('tflops'), '.3g')} "
                  f"TFLOP/s (the rate `% dense` is against).", ""]
    lines += ["| shape | T | E | layer | experts by | step ms | experts alone ms | expert TFLOP/s "
              "(alone) | % of dense | expert TFLOP/s (in step) | d+c share | x vs jax_ep "
              "ragged | x vs MaxText ragged |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary(meta, rows):
        if s["status"] != "ok":
            lines.append(f"| {s['shape']} | {s['T']} | {s['E']} | {s['layer']} | {s['impl']} | "
                         f"{s['status']}: {(s.get('error') or '')[:120]} | | | | | | | |")
            continue
        own = s["layer"] == "jax_ep"  # the experts-alone columns belong to the jax_ep rows
        pct = f(100 * s["of_dense"], ".0f") + "%" if own and "of_dense" in s else "-"
        share = f(100 * s["dc_share"], ".1f") + "%" if "dc_share" in s else "-"
        lines.append(f"| {s['shape']} | {s['T']} | {s['E']} | {s['layer']} | {s['impl']} | "
                     f"{f(s['step_ms'], '.2f')} | "
                     f"{f(s.get('experts_ms') if own else None, '.2f')} | "
                     f"{f(s.get('expert_tflops') if own else None, '.3g')} | {pct} | "
                     f"{f(s.get('expert_tflops_in_step'), '.3g')} | {share} | "
                     f"{f(s.get('vs_jax_ep_ragged'), '.1f')} | "
                     f"{f(s.get('vs_maxtext_ragged'), '.1f')} |")
    lines += ["", "Other measurements (ms):", ""]
    for r in rows:
        if r["kind"] in ("identity", "router", "experts"):
            val = (f(r["time_s"] * 1e3, ".2f") if r["status"] == "ok"
                   else f"{r['status']}: {(r.get('error') or '')[:150]}")
            lines.append(f"- {r['shape']} T={r['T']} E={r['E']} {r['kind']} {r['impl']}: {val}")
    if meta.get("routing"):
        lines += ["", "Routing of the timed inputs (rows per expert; capacity layout):", ""]
        lines += [f"- {n}: {v}" for n, v in meta["routing"].items()]
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.smoke:
        args.reps, args.warmup = min(args.reps, 2), 0
        args.dense_size = min(args.dense_size, 256)
    import jax
    import jaxlib
    import numpy as np
    from jax.sharding import Mesh

    bench = Bench(args)
    device = jax.devices()[0]
    bench.meta = dict(device=str(device.device_kind), platform=device.platform,
                      jax=jax.__version__, jaxlib=jaxlib.__version__,
                      date=time.strftime("%Y-%m-%d"),
                      argv=" ".join(sys.argv[1:] if argv is None else argv),
                      smoke=args.smoke, router_skew=args.router_skew,
                      xla_flags=os.environ.get("XLA_FLAGS", ""))
    try:
        bench.meta["dense"] = dense_rate(args.dense_size)
        print(f"dense bf16 {args.dense_size}^3: {bench.meta['dense']['tflops']:.0f} TFLOP/s",
              flush=True)
    except Exception as e:  # noqa: BLE001
        bench.meta["dense"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    mesh = Mesh(np.array(jax.devices()[:1]), ("expert",))
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    for name in args.shapes.split(","):
        bench_shape(bench, name, shapes[name], mesh, args)
    bench.meta["total_s"] = time.perf_counter() - bench.t_start
    bench.write()
    print("\n".join(markdown(bench.meta, bench.rows)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
