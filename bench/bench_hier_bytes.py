"""Bytes that cross hosts in the hierarchical backend, against the bound, on CPU-emulated hosts.

    python bench/bench_hier_bytes.py                  # 8 CPU devices as 2, 4 and 8 hosts
    python bench/bench_hier_bytes.py --accuracy       # also combine's error, both partials dtypes

For each split of the 8 ranks into hosts and each routing (uniform: top-k of random logits;
skewed: top-k drawn with Zipf(1) expert popularity, so host 0's experts are hot), it runs a
dispatch on the hierarchical group and asks jax_ep how many tokens each rank sends to each host
(`hierarchical.inter_host_tokens` of the handle: the ragged engine's send sizes, and the number
of partials combine returns), then multiplies by the records' sizes (`hierarchical.entry_bytes`)
for rows of --hidden elements of bf16 (the routing runs with narrow rows: the counts depend on
the routing only). Per rank and call, mean and max over the ranks:

  bound     tokens x distinct remote hosts holding one of its experts (numpy, from topk_idx),
            times the row's bytes: what DeepEP's internode kernels send
  ragged    rows (the same tokens, times the row's bytes) + metadata (token id, dest rank and
            row per slot, the weights; the count exchange); the engine on GPUs
  all_to_all  a static chunk of T records per remote host: the engine on CPUs
  combine   partials back: bf16 (the default) and float32 (EPConfig.f32_partials)

--accuracy: combine of random bf16 expert outputs (weighted) against a float64 numpy sum: the
reference backend (one rounding), and the hierarchical one with f32 and with bf16 partials.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import jax_ep  # noqa: E402
from jax_ep._cli import FlagParser  # noqa: E402
from jax_ep.backends import hierarchical  # noqa: E402
from jax_ep.per_rank import program  # noqa: E402

RANKS = 8
ROUTINGS = ("uniform", "skewed")


def routing(kind: str, rng, t: int, k: int, e: int) -> tuple[np.ndarray, np.ndarray]:
    """topk_idx [N, T, k] (distinct experts per token), weights [N, T, k]."""
    scores = rng.gumbel(size=(RANKS, t, e))
    if kind == "skewed":  # Gumbel top-k = sampling k experts without replacement, p ~ 1/(e+1)
        scores = scores - np.log(np.arange(1, e + 1))
    idx = np.argsort(-scores, axis=-1)[..., :k].astype(np.int32)
    return idx, rng.random((RANKS, t, k)).astype(np.float32)


def bound_tokens(idx: np.ndarray, host_of: np.ndarray, e: int) -> np.ndarray:
    """[N]: per source rank, sum over its tokens of the distinct remote hosts of its experts."""
    hosts = host_of[idx // (e // RANKS)]  # [N, T, k]
    num_hosts = host_of.max() + 1
    on = np.zeros(idx.shape[:2] + (num_hosts,), bool)
    np.put_along_axis(on, hosts, True, axis=-1)
    on[np.arange(RANKS), :, host_of[np.arange(RANKS)]] = False  # the own host is no crossing
    return on.sum(axis=(1, 2))


def group_for(hosts: list[int], e: int, k: int, t: int, h: int, **cfg) -> jax_ep.EPGroup:
    mesh = Mesh(np.array(jax.devices()[:RANKS]), ("expert",))
    config = jax_ep.EPConfig(num_experts=e, top_k=k, max_tokens=t, hidden_size=h, **cfg)
    return jax_ep.EPGroup(mesh, "expert", config, backend="hierarchical", hosts=hosts)


def sent_tokens(group: jax_ep.EPGroup, idx, w) -> np.ndarray:
    """[N, num_hosts] tokens each rank's dispatch sends to each host, as jax_ep counts them."""
    t = idx.shape[1]
    x = np.zeros((RANKS, t, 8), jnp.bfloat16)
    run = program(group.mesh, lambda a, i, b: hierarchical.inter_host_tokens(
        jax_ep.dispatch(group, a, i, b).handle, group.topology))
    return np.asarray(run(x, idx, w))


def byte_rows(args) -> list[dict]:
    k, e, t, h = args.top_k, args.experts, args.tokens, args.hidden
    row = h * 2  # bf16
    disp = hierarchical.entry_bytes("dispatch", k, h, jnp.bfloat16, with_values=True)
    back = {dt: hierarchical.entry_bytes("combine", k, h, dt, with_values=False)
            for dt in (jnp.bfloat16, jnp.float32)}
    out = []
    for num_hosts in (2, 4, 8):
        hosts = [r * num_hosts // RANKS for r in range(RANKS)]
        host_of = np.asarray(hosts)
        group = group_for(hosts, e, k, t, 8)
        for kind in ROUTINGS:
            idx, w = routing(kind, np.random.default_rng(args.seed), t, k, e)
            counts = sent_tokens(group, idx, w)
            remote = counts.sum(axis=1) - counts[np.arange(RANKS), host_of]  # [N]
            bound = bound_tokens(idx, host_of, e)
            counts_meta = (num_hosts - 1) * 4  # the count exchange before the ragged engine
            cols = {
                "bound": bound * row,
                "ragged rows": remote * row,
                "ragged total": remote * disp + counts_meta,
                "all_to_all": np.full(RANKS, (num_hosts - 1) * t * disp),
                "combine bf16": remote * back[jnp.bfloat16],
                "combine f32": remote * back[jnp.float32],
            }
            out.append(dict(hosts=num_hosts, routing=kind, tokens_ratio=remote.sum() / bound.sum(),
                            **{name: (v.mean(), v.max()) for name, v in cols.items()}))
    return out


def print_bytes(rows: list[dict], args) -> None:
    mb = 1e6
    print(f"T={args.tokens} tokens per rank, k={args.top_k}, E={args.experts}, H={args.hidden} "
          f"bf16, {RANKS} ranks; MB per rank and call, mean / max over ranks")
    names = ["bound", "ragged rows", "ragged total", "all_to_all", "combine bf16", "combine f32"]
    print("| hosts | routing | " + " | ".join(names) + " | ragged total / bound |")
    print("|" + " --- |" * (len(names) + 3))
    for r in rows:
        cells = " | ".join(f"{r[n][0] / mb:.2f} / {r[n][1] / mb:.2f}" for n in names)
        ratio = r["ragged total"][0] / r["bound"][0]
        print(f"| {r['hosts']} | {r['routing']} | {cells} | {ratio:.4f} |")
        assert r["tokens_ratio"] == 1.0, r  # dropless: the ragged engine sends the bound's tokens


def accuracy(args) -> None:
    """Max and RMS error of bf16 combine against float64, relative to max |y| and RMS y."""
    k, e, t, h = args.top_k, args.experts, args.acc_tokens, args.acc_hidden
    rng = np.random.default_rng(args.seed)
    idx, w = routing("uniform", rng, t, k, e)
    x = rng.normal(size=(RANKS, t, h)).astype(jnp.bfloat16)
    c = RANKS * t * k
    rows = rng.normal(size=(RANKS, c, h)).astype(jnp.bfloat16)  # the experts' outputs
    print(f"\ncombine error vs float64, bf16 rows, T={t}, H={h}, k={k}, E={e}, {RANKS} ranks "
          f"(weighted combine of random expert outputs)")
    print("| backend | hosts | partials | max abs err | max abs err / max abs y | "
          "RMS err / RMS y |")
    print("| --- | --- | --- | --- | --- | --- |")
    setups = [("reference", [0] * RANKS, False)]
    for num_hosts in (2, 8):
        hosts = [r * num_hosts // RANKS for r in range(RANKS)]
        setups += [("hierarchical", hosts, True), ("hierarchical", hosts, False)]
    for backend, hosts, f32 in setups:
        mesh = Mesh(np.array(jax.devices()[:RANKS]), ("expert",))
        cfg = jax_ep.EPConfig(num_experts=e, top_k=k, max_tokens=t, hidden_size=h,
                              f32_partials=f32)
        group = jax_ep.EPGroup(mesh, "expert", cfg, backend=backend,
                               hosts=hosts if backend == "hierarchical" else None)

        def per(a, i, b, r):
            d = jax_ep.dispatch(group, a, i, b)
            return d.handle, jax_ep.combine(group, r, d.handle, weights=d.weights)

        handle, y = jax.tree.map(np.asarray, program(mesh, per)(x, idx, w, rows))
        dr, drow = handle.dest_rank, handle.dest_row
        terms = rows.astype(np.float64)[np.maximum(dr, 0), np.maximum(drow, 0)]  # [N, T, k, H]
        exact = np.sum(np.where((dr >= 0)[..., None], w[..., None] * terms, 0.0), axis=2)
        err = np.abs(y.astype(np.float64) - exact)
        rms = np.sqrt(np.mean(err ** 2)) / np.sqrt(np.mean(exact ** 2))
        label = "-" if backend == "reference" else ("float32" if f32 else "bf16")
        nh = len(set(hosts))
        print(f"| {backend} | {nh} | {label} | {err.max():.3e} | "
              f"{err.max() / np.abs(exact).max():.3e} | {rms:.3e} |")


def main(argv=None) -> int:
    p = FlagParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096, help="T, tokens per rank")
    p.add_argument("--hidden", type=int, default=7168, help="H of the rows counted (bf16)")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accuracy", action="store_true", help="also measure combine's error")
    p.add_argument("--acc-tokens", type=int, default=256, help="T of the accuracy run")
    p.add_argument("--acc-hidden", type=int, default=1024, help="H of the accuracy run")
    args = p.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices")
    print_bytes(byte_rows(args), args)
    if args.accuracy:
        accuracy(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
