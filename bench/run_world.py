"""Runs bench/bench_ep.py as N processes sharing the GPU (jax.distributed on 127.0.0.1).

    python bench/run_world.py 8 --shapes decode --out bench/out
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import launch  # noqa: E402

if __name__ == "__main__":
    sys.exit(launch("bench.bench_ep", int(sys.argv[1]), sys.argv[2:]))
