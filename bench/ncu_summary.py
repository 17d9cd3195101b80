"""Per-operation device time from an Nsight Compute CSV (bench/profile_ops.py under ncu with
--metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum --csv).

    python bench/ncu_summary.py ncu_decode.log [--json out.json]

Kernels are listed in launch order; those from the first one up to the last dispatch-side
kernel (layout, notify, send, finalize, and XLA's own kernels between them) are dispatch's, the
rest combine's. Device time is the sum of the kernels' durations: it leaves out launch gaps,
which a CUDA graph mostly hides.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import defaultdict
from jax_ep._cli import FlagParser

# Dispatch's kernels (normal and padded layouts); a name must not merely end in one of these
# (CombineSendKernel is combine's).
DISPATCH_KERNELS = re.compile(r"(?<![A-Za-z])(RoutingChunksKernel|RoutingNotifyKernel|SendKernel|"
                              r"FinalizeKernel|DispatchSendKernel|DispatchRecvKernel)\b")


def read_kernels(path: str) -> list[dict]:
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    kernels: dict[str, dict] = defaultdict(dict)
    for row in csv.DictReader(lines):
        k = kernels[row["ID"]]
        k["name"] = row["Kernel Name"]
        k[row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
    return [kernels[i] for i in sorted(kernels, key=int)]


def summarise(kernels: list[dict]) -> dict:
    last_dispatch = max((i for i, k in enumerate(kernels)
                         if DISPATCH_KERNELS.search(k["name"])), default=-1)
    ops: dict[str, dict] = {}
    for i, k in enumerate(kernels):
        op = ops.setdefault("dispatch" if i <= last_dispatch else "combine",
                            {"us": 0.0, "dram_bytes": 0.0, "kernels": []})
        us = k.get("gpu__time_duration.sum", 0.0) / 1e3
        dram = k.get("dram__bytes_read.sum", 0.0) + k.get("dram__bytes_write.sum", 0.0)
        op["us"] += us
        op["dram_bytes"] += dram
        op["kernels"].append({"name": k["name"].split("(")[0], "us": us, "dram_bytes": dram})
    return ops


def main(argv=None) -> int:
    p = FlagParser(description=__doc__)
    p.add_argument("log")
    p.add_argument("--json")
    args = p.parse_args(argv)
    ops = summarise(read_kernels(args.log))
    for op, v in ops.items():
        print(f"{op:9s} {v['us']:8.1f} us device time in {len(v['kernels'])} kernels: " + ", ".join(
            f"{k['name'][-28:]} {k['us']:.1f}" for k in v["kernels"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ops, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
