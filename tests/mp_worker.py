"""One rank of the multi-process GPU tests (tests/test_cuda.py, tests/test_hierarchical_cuda.py):
N processes share one GPU through jax.distributed on 127.0.0.1 and CUDA IPC. In the cuda modes
only jax_ep's custom calls cross ranks; the hierarchical mode adds XLA collectives (NCCL), for
which the launcher makes every process an NCCL host of its own."""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["cases", "timeout", "padded", "hierarchical",
                                           "hierarchical_padded", "mesh2d", "dies_mid_call"],
                        default="cases")
    args = parser.parse_args()

    import jax

    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.world,
                               process_id=args.rank)
    import numpy as np
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()), ("expert",))
    assert mesh.devices.size == args.world, jax.devices()
    if args.mode == "mesh2d":
        mesh = Mesh(np.array(jax.devices()).reshape(2, -1), ("data", "expert"))
    modes = {"cases": cases_mode, "timeout": timeout_mode, "padded": padded_mode,
             "hierarchical": hierarchical_mode, "hierarchical_padded": hierarchical_padded_mode,
             "mesh2d": mesh2d_mode, "dies_mid_call": dies_mid_call_mode}
    code = modes[args.mode](args, mesh)
    # Leave together: a rank that exits while another still talks to the coordination service
    # (hosted by rank 0) makes the survivors abort.
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(f"jax_ep_test_end_{args.mode}", 120_000)
    jax.distributed.shutdown()
    return code


def cases_mode(args, mesh) -> int:
    from tests import cuda_checks

    for case in cuda_checks.CASES:
        t0 = time.perf_counter()
        cuda_checks.check_case(mesh, case, seed=args.world)
        print(f"rank {args.rank}/{args.world}: {case.name} ok ({time.perf_counter() - t0:.1f} s)")
    cuda_checks.check_scan_rounds(mesh)
    print(f"rank {args.rank}/{args.world}: scan_20_rounds ok")
    return 0


def hierarchical_mode(args, mesh) -> int:
    """The hierarchical backend with the ranks split into 2 emulated hosts: the inter-host leg
    is XLA all_to_all (NCCL), the intra-host leg the cuda kernels (CUDA IPC) or XLA."""
    from tests import cuda_checks

    hosts = [2 * r // args.world for r in range(args.world)]
    for leg in ("cuda", "xla"):
        kwargs = dict(hosts=hosts, intra_host=leg)
        for case in cuda_checks.CASES:
            t0 = time.perf_counter()
            cuda_checks.check_case(mesh, case, seed=args.world, backend="hierarchical",
                                   group_kwargs=kwargs)
            print(f"rank {args.rank}/{args.world}: hierarchical/{leg} {case.name} ok "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    cuda_checks.check_scan_rounds(mesh, backend="hierarchical",
                                  group_kwargs=dict(hosts=hosts, intra_host="cuda"))
    print(f"rank {args.rank}/{args.world}: hierarchical/cuda scan_20_rounds ok", flush=True)
    return 0


def hierarchical_padded_mode(args, mesh) -> int:
    """The padded layout on the hierarchical backend, the ranks split into 2 emulated hosts
    (inter-host leg XLA all_to_all over NCCL): every padded case on the cuda intra-host leg (the
    padded kernels, each rank forwarding 2 segments; CUDA IPC between a host's processes), fp8
    and a 20-round scan there; the first cases on the XLA leg, and with interleaved hosts (a
    sources table that is not the identity) when there are 4 or more processes."""
    from tests import cuda_padded_checks as checks

    halves = [2 * r // args.world for r in range(args.world)]
    runs = [("cuda", halves, checks.CASES), ("xla", halves, checks.CASES[:2])]
    if args.world >= 4:
        runs.append(("cuda", [r % 2 for r in range(args.world)], checks.CASES[:3]))
    for leg, hosts, cases in runs:
        kwargs = dict(hosts=hosts, intra_host=leg)
        for case in cases:
            t0 = time.perf_counter()
            checks.check_case(mesh, case, seed=args.world, backend="hierarchical",
                              group_kwargs=kwargs)
            print(f"rank {args.rank}/{args.world}: hierarchical_padded/{leg} hosts {hosts} "
                  f"{case.name} ok ({time.perf_counter() - t0:.1f} s)", flush=True)
    kwargs = dict(hosts=halves, intra_host="cuda")
    checks.check_fp8(mesh, seed=args.world, backend="hierarchical", group_kwargs=kwargs)
    print(f"rank {args.rank}/{args.world}: hierarchical_padded/cuda fp8 ok", flush=True)
    checks.check_scan_rounds(mesh, backend="hierarchical", group_kwargs=kwargs)
    print(f"rank {args.rank}/{args.world}: hierarchical_padded/cuda scan_20_rounds ok",
          flush=True)
    return 0


def mesh2d_mode(args, mesh) -> int:
    """EP over 'expert' of a ('data', 'expert') mesh of the processes: the cuda backend and the
    hierarchical one (its cuda intra-host leg) with one EP group per data slice."""
    from tests import cuda_checks

    n = mesh.shape["expert"]
    setups = [("cuda", None),
              ("hierarchical", dict(hosts=list(range(n)), intra_host="cuda")),
              ("hierarchical", dict(hosts=[0] * n, intra_host="cuda"))]
    for backend, kwargs in setups:
        cuda_checks.check_2d_mesh(mesh, backend=backend, group_kwargs=kwargs)
        print(f"rank {args.rank}/{args.world}: mesh2d {backend} {kwargs} ok", flush=True)
    return 0


def padded_mode(args, mesh) -> int:
    """The padded (low-latency) layout and fp8 dispatch (tests/cuda_padded_checks.py)."""
    from tests import cuda_padded_checks as checks

    for case in checks.CASES:
        t0 = time.perf_counter()
        checks.check_case(mesh, case, seed=args.world)
        print(f"rank {args.rank}/{args.world}: padded {case.name} ok "
              f"({time.perf_counter() - t0:.1f} s)")
    checks.check_fp8(mesh, seed=args.world)
    print(f"rank {args.rank}/{args.world}: fp8 ok")
    checks.check_scan_rounds(mesh)
    print(f"rank {args.rank}/{args.world}: padded scan_20_rounds ok")
    return 0


def timeout_mode(args, mesh) -> int:
    """Rank 0 dispatches; rank 1 never does. Rank 0 must get a timeout error naming rank 1 and
    the phase, not hang; rank 1 keeps its buffer alive until rank 0 is done."""
    import jax
    from jax._src import distributed

    import jax_ep
    from tests import cuda_checks

    client = distributed.global_state.client
    case = cuda_checks.Case("timeout", 8, 2, 2, 64, "float32")
    group = cuda_checks.make_group(mesh, case, timeout_s=3.0)
    print(f"rank {args.rank}: group created", flush=True)
    if args.rank != 0:
        client.blocking_key_value_get("jax_ep_test/timeout_done", 60_000)
        group.close()  # collective: rank 0 closes after setting timeout_done
        return 0
    x, idx, w, *_ = cuda_checks.inputs_for(case, args.world, 0)
    run = cuda_checks.harness.per_rank(mesh, lambda a, b, c: jax_ep.dispatch(group, a, b, c).x)
    inputs = [cuda_checks.to_global(a, mesh) for a in (x, idx, w)]
    t0 = time.perf_counter()
    out = run(*inputs)
    print("rank 0: dispatch enqueued", flush=True)
    jax.block_until_ready(out)
    waited = time.perf_counter() - t0
    ok = True
    try:
        group.check()
        print("rank 0: no error recorded after a peer never arrived")
        ok = False
    except jax_ep.EPRuntimeError as e:
        print(f"rank 0: check() raised after {waited:.1f} s: {e}")
        ok &= "waiting for rank 1" in str(e) and "dispatch/notify" in str(e)
    try:
        jax.block_until_ready(run(*inputs))
        print("rank 0: the next call did not fail")
        ok = False
    except Exception as e:  # XLA wraps the FFI error
        print(f"rank 0: next call raised {type(e).__name__}: {str(e)[:200]}")
        ok &= "timed out" in str(e)
    client.key_value_set("jax_ep_test/timeout_done", "1")
    group.close()
    print("rank 0: timeout test " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


def dies_mid_call_mode(args, mesh) -> int:
    """Rank 1 dies inside a jitted dispatch + combine step, after its dispatch (os._exit in a
    host callback between the two): rank 0's combine waits for it, times out after timeout_s
    and the group reports the jax_ep error naming rank 1 and the phase; rank 0 does not hang.
    Rank 0 leaves with os._exit: jax.distributed would wait for its dead peer."""
    import os

    import jax
    import numpy as np
    from jax._src import distributed
    from jax.experimental import io_callback

    import jax_ep
    from tests import cuda_checks, harness

    timeout_s = 3.0
    case = cuda_checks.Case("dies_mid_call", 8, 2, 2, 64, "float32")
    group = cuda_checks.make_group(mesh, case, timeout_s=timeout_s)
    x, idx, w, *_ = cuda_checks.inputs_for(case, args.world, 0)

    def die(probe):
        del probe  # it orders the callback after dispatch
        if args.rank == 1:
            print("rank 1: dying between dispatch and combine", flush=True)
            os._exit(0)
        return np.int32(0)

    def step(a, b, c):
        d = jax_ep.dispatch(group, a, b, c)
        # Data dependencies both ways, so the callback runs after dispatch, before combine.
        token = io_callback(die, jax.ShapeDtypeStruct((), np.int32),
                            d.x.reshape(-1)[:1].sum().astype(np.float32))
        rows = d.x + token.astype(d.x.dtype)
        return jax_ep.combine(group, rows, d.handle, weights=d.weights)

    inputs = [cuda_checks.to_global(a, mesh) for a in (x, idx, w)]
    compiled = harness.per_rank(mesh, step).lower(*inputs).compile()
    distributed.global_state.client.wait_at_barrier("jax_ep_test_dies_compiled", 120_000)
    t0 = time.perf_counter()
    try:
        jax.block_until_ready(compiled(*inputs))
        print("rank 0: the step returned (the kernels record the timeout)", flush=True)
    except Exception as e:  # XLA may also surface the FFI error right away
        print(f"rank 0: the step raised {type(e).__name__}: {str(e)[:300]}", flush=True)
    waited = time.perf_counter() - t0
    ok = waited < timeout_s + 30
    try:
        group.check()
        print(f"rank 0: no error recorded {waited:.1f} s after rank 1 died", flush=True)
        ok = False
    except jax_ep.EPRuntimeError as e:
        print(f"rank 0: check() raised after {waited:.1f} s: {e}", flush=True)
        ok &= "jax_ep" in str(e) and "waiting for rank 1" in str(e)
        ok &= "combine" in str(e) or "barrier" in str(e)
    print("rank 0: dies mid call test " + ("ok" if ok else "FAILED"), flush=True)
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
