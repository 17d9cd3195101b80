"""Per-kernel view of one dispatch + combine at world size 1, for ncu:

    ncu --metrics gpu__time_duration.sum --csv python bench/profile_ops.py --shape mixtral

Runs warm-up calls outside the profiled range (cudaProfilerStart/Stop through cupy when
present), then `--calls` profiled dispatch+combine pairs. Without ncu it prints wall times.
"""

import sys
import time
from pathlib import Path
from jax_ep._cli import FlagParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = FlagParser()
    p.add_argument("--shape", default="decode")
    p.add_argument("--num-sms", type=int, default=24)
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--layout", default="normal", choices=["normal", "padded"])
    p.add_argument("--zero-fill", type=int, default=0, help="padded: EPConfig.padded_zero_fill")
    p.add_argument("--side-effect", type=int, default=1)
    args = p.parse_args()
    import jax
    import numpy as np
    from jax.sharding import Mesh

    import jax_ep
    from bench.common import SHAPES, make_inputs
    from jax_ep import per_rank

    t, h, k, e = SHAPES[args.shape]
    mesh = Mesh(np.array(jax.devices()[:1]), ("expert",))
    cfg = jax_ep.EPConfig(num_experts=e, top_k=k, max_tokens=t, hidden_size=h,
                          num_sms=args.num_sms, padded_layout=args.layout == "padded",
                          padded_zero_fill=bool(args.zero_fill))
    group = jax_ep.EPGroup(mesh, "expert", cfg)
    sets = [tuple(per_rank.to_global(a, mesh) for a in s)
            for s in make_inputs(np.random.default_rng(0), 1, t, h, k, e, sets=2)]
    dispatch = per_rank.program(mesh, lambda x, i, w: (
        lambda d: (d.x, d.weights, d.handle))(jax_ep.dispatch(group, x, i, w, layout=args.layout)))
    combine = per_rank.program(mesh, lambda r, rw, hd: jax_ep.combine(group, r, hd, weights=rw))
    for s in sets:
        jax.block_until_ready(combine(*dispatch(*s)))
    try:
        import cupy

        profiler = cupy.cuda.profiler
    except Exception:  # noqa: BLE001
        profiler = None
    if profiler:
        profiler.start()
    t0 = time.perf_counter()
    for i in range(args.calls):
        out = dispatch(*sets[i % 2])
        jax.block_until_ready(out)
        t1 = time.perf_counter()
        jax.block_until_ready(combine(*out))
        t2 = time.perf_counter()
        print(f"call {i}: dispatch {1e6 * (t1 - t0):.0f} us, combine {1e6 * (t2 - t1):.0f} us "
              "(wall, blocking)")
        t0 = time.perf_counter()
    if profiler:
        profiler.stop()
    group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
