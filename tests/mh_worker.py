"""One process of the multi-process tests (tests/test_multihost.py): `world` processes on
127.0.0.1 joined by jax.distributed, each with 4 CPU devices (gloo collectives) or one GPU, so
that 2 processes emulate 2 hosts of 4 ranks. Every process computes the expected results with
the numpy oracle and checks its own ranks; exit code 0 means every check passed."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["cases", "mismatch", "missing", "close"],
                        required=True)
    parser.add_argument("--platform", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--inter-host", choices=["auto", "ragged", "all_to_all"], default="auto")
    parser.add_argument("--intra-host", choices=["auto", "cuda", "xla"], default="auto")
    parser.add_argument("--setups", default="reference,given,discovered",
                        help="cases mode: which of its group setups to check")
    parser.add_argument("--layouts", default="normal",
                        help="cases mode: the layouts to check (normal, padded)")
    args = parser.parse_args()
    # Discovery sees two host names: the first and second half of the processes are two
    # emulated hosts of one machine.
    os.environ["JAX_EP_HOSTNAME"] = f"emulated-host-{2 * args.rank // args.world}"

    import jax

    if args.platform == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.world,
                                   process_id=args.rank)
    else:  # one GPU each (CUDA_VISIBLE_DEVICES), or all sharing one as NCCL hosts of their own
        jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.world,
                                   process_id=args.rank)
    import numpy as np
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()), ("expert",))
    code = globals()[f"{args.mode}_mode"](args, mesh)
    # Leave together: a process that exits while another still talks to the coordination
    # service (hosted by process 0) makes the survivors abort.
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(f"jax_ep_mh_end_{args.mode}", 60_000)
    jax.distributed.shutdown()
    print(f"process {args.rank}: {args.mode} " + ("ok" if code == 0 else "FAILED"), flush=True)
    return code


def _global(mesh, value):
    """A global array [N, ...] sharded one row per EP rank, from the same numpy value everywhere."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    return jax.make_array_from_callback(value.shape, NamedSharding(mesh, P("expert")),
                                        lambda index: value[index])


def _mine(tree):
    """The rows of this process's ranks of every global array [N, ...], with their rank range."""
    import jax
    import numpy as np

    def local(a):
        shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start)
        return np.concatenate([np.asarray(s.data) for s in shards])

    first = min(s.index[0].start for s in jax.tree.leaves(tree)[0].addressable_shards)
    return jax.tree.map(local, tree), first


def cases_mode(args, mesh) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_ep
    from jax_ep.backends import hierarchical
    from tests import harness, oracle

    layouts = args.layouts.split(",")
    n, t, k, e, h = mesh.size, 4, 2, 2 * mesh.size, 8
    rng = np.random.default_rng(5)
    idx, w = harness.random_routing(rng, n, t, k, e, unrouted=0.15, invalid=0.05)
    x = harness.random_tokens(rng, n, t, h, np.float32)
    r = rng.normal(size=(n, t, h)).astype(np.float32)
    # Per layout: the oracle's dispatch, its check, the weighted combine, and the slots that
    # carry a gradient (the padded layout does not deliver a token's repeated experts).
    normal = oracle.dispatch(x, idx, w, e, n * t * k)
    padded = oracle.padded_dispatch(x, idx, w, e, t)
    wanted = {
        "normal": (normal, harness.assert_dispatch_matches,
                   oracle.combine(normal.rows, normal.dest_rank, normal.dest_row,
                                  normal.row_weights), (idx >= 0) & (idx < e)),
        "padded": (padded, harness.assert_padded_matches,
                   oracle.padded_combine(padded.rows, padded.slot_expert, padded.slot_pos,
                                         padded.row_weights), padded.slot_expert >= 0)}
    inputs = [_global(mesh, a) for a in (x, idx, w, r)]
    # Buffer sizes for the cuda intra-host leg (the default on GPUs); unused on CPUs.
    cfg = jax_ep.EPConfig(num_experts=e, top_k=k, max_tokens=t, hidden_size=h, dtype="float32",
                          padded_layout="padded" in layouts)
    discovered = tuple(2 * d.process_index // args.world for d in mesh.devices.flat)
    setups = {"reference": ("reference", "reference", None, None),
              "given": ("hierarchical, 4 hosts given", "hierarchical",
                        [4 * i // n for i in range(n)], 4),
              "discovered": ("auto, 2 hosts discovered", "auto", None, 2)}
    setups = [setups[name] for name in args.setups.split(",")]
    for name, backend, hosts, num_hosts in setups:
        t0 = time.perf_counter()
        group = jax_ep.EPGroup(mesh, "expert", cfg, backend=backend, hosts=hosts,
                               intra_host=args.intra_host, inter_host=args.inter_host)
        if num_hosts is not None:
            assert group.backend_name == "hierarchical", group
            assert group.topology.num_hosts == num_hosts, group.topology
            on_gpu = args.platform == "gpu"
            intra = {"auto": "cuda" if on_gpu else "xla"}.get(args.intra_host, args.intra_host)
            ragged = on_gpu and hierarchical.RAGGED_XLA_FLAG in os.environ.get("XLA_FLAGS", "")
            inter = {"auto": "ragged" if ragged else "all_to_all"}.get(args.inter_host,
                                                                       args.inter_host)
            assert (group.intra_host, group.inter_host) == (intra, inter), group
        if hosts is None and num_hosts == 2:
            assert group.topology.host_of == discovered, (group.topology, discovered)
        for layout in layouts:
            want, assert_dispatch, want_y, delivered = wanted[layout]
            run = harness.per_rank(mesh, lambda a, i, b, layout=layout: (
                lambda dd: (dd, jax_ep.combine(group, dd.x, dd.handle, weights=dd.weights)))(
                    jax_ep.dispatch(group, a, i, b, layout=layout)))
            (d, yw), first = _mine(run(*inputs[:3]))
            sl = slice(first, first + d.x.shape[0])
            assert_dispatch(d, oracle.ranks(want, sl))
            harness.assert_combine_close(yw, want_y[sl], np.float32)

            def loss(xg, wg, layout=layout):
                def per(a, i, b, rr):
                    dd = jax_ep.dispatch(group, a, i, b, layout=layout)
                    y = jax_ep.combine(group, 2 * dd.x, dd.handle, weights=dd.weights)
                    return jnp.sum(y * rr)
                return jnp.sum(harness.per_rank(mesh, per)(xg, inputs[1], wg, inputs[3]))

            # loss = sum_t sum_j w[t, j] * 2 <x[t], r[t]> over the delivered slots
            want_gx = 2 * np.where(delivered, w, 0).sum(-1)[..., None] * r
            want_gw = np.where(delivered, 2 * np.einsum("nth,nth->nt", x, r)[..., None], 0)
            (gx, gw), _ = _mine(jax.grad(loss, argnums=(0, 1))(inputs[0], inputs[2]))
            np.testing.assert_allclose(gx, want_gx[sl], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(gw, want_gw[sl], rtol=1e-5, atol=1e-5)
        group.close()
        shape = f"{group.topology.num_hosts}x{n // group.topology.num_hosts}"
        print(f"process {args.rank}: {name} ok (hosts x ranks {shape}, layouts "
              f"{'+'.join(layouts)}, {time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


def mismatch_mode(args, mesh) -> int:
    """Process 1 asks for top_k=3, the others for 2: everyone gets a ValueError naming a
    process that differs and the field."""
    import jax_ep

    top_k = 3 if args.rank == 1 else 2
    try:
        jax_ep.EPGroup(mesh, "expert", jax_ep.EPConfig(num_experts=16, top_k=top_k,
                                                       max_tokens=8, hidden_size=64,
                                                       timeout_s=20.0))
    except ValueError as e:
        print(f"process {args.rank}: {e}", flush=True)
        other = 0 if args.rank == 1 else 1
        ok = f"process {other} created it" in str(e) and f"config.top_k: {top_k} here" in str(e)
        return 0 if ok else 1
    print(f"process {args.rank}: no error for different configs", flush=True)
    return 1


def missing_mode(args, mesh) -> int:
    """Process 1 never creates the group: process 0 gets a TimeoutError naming it after
    EPConfig.timeout_s, not a hang."""
    from jax._src import distributed

    import jax_ep

    client = distributed.global_state.client
    if args.rank != 0:
        client.blocking_key_value_get("jax_ep_mh/missing_done", 60_000)
        return 0
    t0 = time.perf_counter()
    try:
        jax_ep.EPGroup(mesh, "expert", jax_ep.EPConfig(num_experts=16, top_k=2, max_tokens=8,
                                                       hidden_size=64, timeout_s=2.0))
        ok = False
        print("process 0: the group was created without process 1", flush=True)
    except TimeoutError as e:
        waited = time.perf_counter() - t0
        print(f"process 0: after {waited:.1f} s: {e}", flush=True)
        ok = "process 1 did not create this EPGroup" in str(e) and waited < 15
    client.key_value_set("jax_ep_mh/missing_done", "1")
    return 0 if ok else 1


def close_mode(args, mesh) -> int:
    """close() waits for the peers: process 0's close returns only once process 1 closed too;
    a peer that never closes makes close() warn after timeout_s and free anyway."""
    from jax._src import distributed

    import jax_ep

    client = distributed.global_state.client
    cfg = jax_ep.EPConfig(num_experts=16, top_k=2, max_tokens=8, hidden_size=64, timeout_s=20.0)
    group = jax_ep.EPGroup(mesh, "expert", cfg)
    ok = True
    t0 = time.perf_counter()
    if args.rank == 1:
        time.sleep(2.0)
    group.close()
    waited = time.perf_counter() - t0
    print(f"process {args.rank}: close took {waited:.1f} s", flush=True)
    if args.rank == 0:
        ok &= waited > 1.5
    late = jax_ep.EPGroup(mesh, "expert", jax_ep.EPConfig(num_experts=16, top_k=2, max_tokens=8,
                                                          hidden_size=64, timeout_s=1.5))
    if args.rank == 1:
        client.blocking_key_value_get("jax_ep_mh/close_done", 60_000)
        late.close()
        return 0 if ok else 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        late.close()
    messages = [str(c.message) for c in caught]
    print(f"process 0: warnings {messages}", flush=True)
    ok &= any("process 1 did not reach 'close'" in m for m in messages)
    client.key_value_set("jax_ep_mh/close_done", "1")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
