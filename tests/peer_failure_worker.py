"""One process of tests/test_peer_failure.py: 2 processes on 127.0.0.1 with 4 CPU devices each
(gloo collectives), one of which dies, stalls, skips a call or comes late. Each process prints
one `RESULT {json}` line per thing it tried (what it raised, after how long) for the test to
judge; the survivors leave with os._exit when their peer is dead (jax.distributed.shutdown
would wait for it)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--backend", default="reference")
    parser.add_argument("--layout", default="normal", choices=["normal", "padded"])
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    os.environ["JAX_EP_HOSTNAME"] = f"emulated-host-{args.rank}"

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.world,
                               process_id=args.rank)
    peers_alive = globals()[f"{args.scenario}_scenario"](Context(args))
    sys.stdout.flush()
    if not peers_alive:
        os._exit(0)
    client().wait_at_barrier(f"peer_failure_end_{args.scenario}", 60_000)
    jax.distributed.shutdown()
    return 0


def client():
    from jax._src import distributed

    return distributed.global_state.client


def report(name: str, **fields) -> None:
    print("RESULT " + json.dumps(dict(name=name, **fields)), flush=True)


def attempt(name: str, fn, group=None) -> None:
    """Runs fn() to completion; reports whether it raised, what and after how long, and what
    group.check() raises afterwards."""
    import jax

    t0 = time.monotonic()
    try:
        jax.block_until_ready(fn())
        fields = dict(raised=None, message="")
    except Exception as e:
        fields = dict(raised=type(e).__name__, message=str(e)[-6000:])
    fields["elapsed"] = time.monotonic() - t0
    if group is not None:
        try:
            group.check()
            fields.update(check_raised=None, check_message="")
        except Exception as e:
            fields.update(check_raised=type(e).__name__, check_message=str(e))
    report(name, **fields)


class Context:
    """The mesh, a group factory and a compiled dispatch + combine step."""

    def __init__(self, args):
        import jax
        import numpy as np
        from jax.sharding import Mesh

        self.args = args
        self.rank = args.rank
        self.mesh = Mesh(np.array(jax.devices()), ("expert",))
        self.steps = 0

    def group(self, **overrides):
        import jax_ep

        n = self.mesh.size
        hosts = [r * self.args.world // n for r in range(n)]
        kwargs = dict(hosts=hosts) if self.args.backend == "hierarchical" else {}
        cfg = dict(num_experts=2 * n, top_k=2, max_tokens=4, hidden_size=8, dtype="float32",
                   timeout_s=self.args.timeout, padded_layout=self.args.layout == "padded")
        cfg.update(overrides)
        return jax_ep.EPGroup(self.mesh, "expert", jax_ep.EPConfig(**cfg),
                              backend=self.args.backend, **kwargs)

    def inputs(self):
        """x, topk_idx, topk_weights as global arrays, one row per rank."""
        import numpy as np

        from tests import harness
        from tests.mh_worker import _global

        n, t, k, h = self.mesh.size, 4, 2, 8
        rng = np.random.default_rng(1)
        idx, w = harness.random_routing(rng, n, t, k, 2 * n)
        x = harness.random_tokens(rng, n, t, h, np.float32)
        return [_global(self.mesh, a) for a in (x, idx, w)]

    def dispatch_only(self, group):
        """A dispatch alone (compiled on the first run, in this process only)."""
        import jax_ep
        from tests import harness

        run = harness.per_rank(self.mesh, lambda a, i, b: jax_ep.dispatch(group, a, i, b).x)
        inputs = self.inputs()
        return lambda: run(*inputs)

    def step(self, group, die_between: bool = False, remat: bool = False):
        """A compiled dispatch + combine (two jax_ep calls, in --layout) over fixed inputs; with
        die_between process 1 exits in a host callback between the two; with remat the step is
        the gradient of the sum of its output through jax.checkpoint (the per-call checks run
        under remat, and again in the backward pass)."""
        import jax
        import numpy as np
        from jax.experimental import io_callback

        import jax_ep
        from tests import harness

        inputs = self.inputs()
        rank = self.rank

        def die(probe):
            del probe  # it orders the callback after dispatch
            if rank == 1:
                print("process 1: dying between dispatch and combine", flush=True)
                os._exit(0)
            return np.int32(0)

        def per(a, i, b):
            d = jax_ep.dispatch(group, a, i, b, layout=self.args.layout)
            rows = d.x
            if die_between:  # data dependencies both ways: XLA:CPU drops optimization barriers
                token = io_callback(die, jax.ShapeDtypeStruct((), np.int32),
                                    rows.reshape(-1)[:1].sum())
                rows = rows + token.astype(rows.dtype)
            return jax_ep.combine(group, rows, d.handle, weights=d.weights)

        if remat:
            forward = per
            per = lambda a, i, b: jax.grad(  # noqa: E731
                lambda t: jax.checkpoint(forward)(t, i, b).sum())(a)
        compiled = harness.per_rank(self.mesh, per).lower(*inputs).compile()
        # Compilation is not a jax_ep call: start the timed part together.
        self.steps += 1
        client().wait_at_barrier(f"peer_failure_compiled_{self.steps}", 60_000)
        return lambda: compiled(*inputs)


def dies_after_create_scenario(ctx: Context) -> bool:
    """Process 1 exits abruptly right after creating the group; process 0's first dispatch
    fails after timeout_s naming process 1."""
    group = ctx.group()
    if ctx.rank == 1:
        os._exit(0)
    run = ctx.dispatch_only(group)
    attempt("first_dispatch", run, group)
    attempt("next_dispatch", run, group)
    return False


def closes_after_create_scenario(ctx: Context) -> bool:
    """Process 1 closes its group (as interpreter exit does) instead of calling it: process 0's
    dispatch fails at once naming it."""
    group = ctx.group(timeout_s=20.0)
    if ctx.rank == 1:
        group.close()
        return True
    attempt("dispatch", ctx.dispatch_only(group), group)
    group.close()
    return True


def _step_then_killed(ctx: Context, victim: int, remat: bool = False) -> bool:
    """One step together, then process `victim` is SIGKILLed and the survivors step again."""
    group = ctx.group()
    step = ctx.step(group, remat=remat)
    attempt("first_step", step, group)
    client().wait_at_barrier("first_step_done", 60_000)
    if ctx.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    attempt("next_step", step, group)
    return False


def killed_between_calls_scenario(ctx: Context) -> bool:
    """One step together (a rematerialised gradient step), then process 1 is SIGKILLed;
    process 0's next step fails."""
    return _step_then_killed(ctx, victim=1, remat=True)


def dies_mid_step_scenario(ctx: Context) -> bool:
    """Process 1 exits inside a jitted step, after dispatch and before combine."""
    group = ctx.group()
    step = ctx.step(group, die_between=True)
    attempt("step", step, group)
    return False


def skips_a_call_scenario(ctx: Context) -> bool:
    """Process 1 stays alive but skips a step; both processes fail, each naming the other."""
    group = ctx.group()
    step = ctx.step(group)
    attempt("first_step", step, group)
    if ctx.rank == 0:
        attempt("second_step", step, group)
        client().key_value_set("peer_failure/second_step_done", "1")
    else:
        client().blocking_key_value_get("peer_failure/second_step_done", 60_000)
        attempt("late_step", step, group)
    group.close()
    return True


def late_creation_scenario(ctx: Context) -> bool:
    """Process 1 creates the group after process 0 gave up on it: both fail."""
    from jax_ep.errors import EPPeerError

    if ctx.rank == 1:
        time.sleep(ctx.args.timeout + 2.0)
    t0 = time.monotonic()
    try:
        ctx.group()
        report("create", raised=None, message="", elapsed=time.monotonic() - t0)
    except Exception as e:
        report("create", raised=type(e).__name__, message=str(e),
               is_timeout=isinstance(e, TimeoutError),
               is_peer_error=isinstance(e, EPPeerError), elapsed=time.monotonic() - t0)
    return True


def close_with_dead_peer_scenario(ctx: Context) -> bool:
    """Three open groups, process 1 dies; process 0's exit-time close of all of them waits
    about one timeout_s in all."""
    from jax_ep import group as group_module

    groups = [ctx.group() for _ in range(3)]
    if ctx.rank == 1:
        os._exit(0)
    time.sleep(0.5)
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        group_module._close_all()
    report("close_all", elapsed=time.monotonic() - t0, closed=[g._closed for g in groups],
           warnings=[str(c.message) for c in caught])
    return False


def gloo_flag_scenario(ctx: Context) -> bool:
    """Not jax_ep: a plain all_to_all that process 1 never joins, with XLA's
    --xla_cpu_collective_timeout_seconds set by the test. Pins down what docs/multihost.md says
    a collective that jax_ep cannot check looks like."""
    import jax
    import numpy as np
    from jax import lax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    f = jax.jit(jax.shard_map(lambda a: lax.all_to_all(a, "expert", 0, 0, tiled=True),
                              mesh=ctx.mesh, in_specs=P("expert"), out_specs=P("expert")))
    n = ctx.mesh.size
    x = jax.make_array_from_callback((n * n,), NamedSharding(ctx.mesh, P("expert")),
                                     lambda i: np.arange(n * n, dtype=np.float32)[i])
    attempt("first_all_to_all", lambda: f(x))
    if ctx.rank == 0:
        attempt("lonely_all_to_all", lambda: f(x))
        client().key_value_set("peer_failure/lonely_done", "1")
    else:
        client().blocking_key_value_get("peer_failure/lonely_done", 60_000)
    return True


def service_host_killed_scenario(ctx: Context) -> bool:
    """One step together, then process 0 (which runs the coordination service) is SIGKILLed."""
    return _step_then_killed(ctx, victim=0)


if __name__ == "__main__":
    sys.exit(main())
