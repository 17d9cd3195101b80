"""The copy kernel alone (bench/copy_kernel: S blocks of 1024 threads, one per SM of the budget,
16-byte loads, 8 in flight per thread): TB/s per SM budget and size, the copy(S) ceiling of
bench/bench_ep.py's `x copy(S)` column.

    python bench/bench_copy.py --num-sms 8,16,24,32,48,132 --mb 16,64,256,1024 --out bench/out

Each cell: one jitted program of `reps` copies, each of its own array of MB megabytes (10^6
bytes read, as many written), timed as bench_ep times jax_ep (common.span: first kernel start
to last kernel end of a warm run under the profiler, over reps; the wall clock of
common.timed where the trace has no device events). TB/s = (bytes read + bytes written) /
time. Prints an SMs x size table; writes results_copy_kernel.json and .md under --out. Where
there is no GPU or no nvcc it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from jax_ep._cli import FlagParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import copy_kernel_times  # noqa: E402


def parse_args(argv=None):
    p = FlagParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-sms", default="8,16,24,32,48,132", help="SM budgets (blocks)")
    p.add_argument("--mb", default="16,64,256,1024", help="MB read per copy (as many written)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--out", default="bench/out")
    return p.parse_args(argv)


def table_lines(rows, budgets, sizes) -> list[str]:
    """TB/s per (SMs, MB): span where there is one, else wall."""
    cell = {(r["num_sms"], r["mb"]): r for r in rows}
    lines = [f"{'SMs':>5s} " + " ".join(f"{f'{mb} MB':>9s}" for mb in sizes) + "   (TB/s)"]
    for sms in budgets:
        vals = []
        for mb in sizes:
            r = cell[(sms, mb)]
            vals.append(f"{(r['span_TBps'] or r['wall_TBps']):9.2f}")
        lines.append(f"{sms:5d} " + " ".join(vals))
    return lines


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import jax

    from bench.copy_kernel import unavailable

    reason = unavailable()
    if reason:
        print(f"copy kernel: skipped ({reason})")
        return 0
    budgets = [int(s) for s in args.num_sms.split(",") if s]
    sizes = [int(s) for s in args.mb.split(",") if s]
    rows = []
    for mb in sizes:
        moved = 2 * mb * 10**6  # read + written
        for sms, (wall, on_gpu) in copy_kernel_times(moved, budgets, args.reps,
                                                     args.trials).items():
            rows.append(dict(num_sms=sms, mb=mb, bytes_moved=moved, wall_s=wall, span_s=on_gpu,
                             wall_TBps=moved / wall / 1e12,
                             span_TBps=moved / on_gpu / 1e12 if on_gpu else None))
        print(f"{mb} MB done", flush=True)
    lines = table_lines(rows, budgets, sizes)
    print("\n" + "\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                date=time.strftime("%Y-%m-%d"), reps=args.reps, trials=args.trials)
    (out / "results_copy_kernel.json").write_text(json.dumps(dict(meta=meta, rows=rows),
                                                             indent=1))
    (out / "results_copy_kernel.md").write_text(
        f"### copy kernel, {meta['device']}, jax {meta['jax']}, {meta['date']}\n\n"
        f"`python bench/bench_copy.py {' '.join(argv)}`\n\n```\n"
        + "\n".join(lines) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
