"""`python -m jax_ep.bench`, the benchmark shipped with the package (CPU smoke run)."""

import json
import os
import subprocess
import sys

import numpy as np

from jax_ep import bench


def test_cli_times_both_ops_on_every_device():
    out = subprocess.run([sys.executable, "-m", "jax_ep.bench", "--shape", "mixtral",
                          "--tokens", "8", "--reps", "2", "--trials", "1", "--json",
                          "--backend", "reference"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ,
                              "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert (row["backend"], row["N"], row["T"], row["num_sms"]) == ("reference", 4, 8, None)
    # dispatch reads T*H and writes one row per (token, slot) of every rank: N*T*k rows.
    assert row["bytes"] == 2 * (8 * 4096 + 4 * 8 * 2 * 4096)
    assert row["dispatch_s"] > 0 and row["combine_s"] > 0 and row["copy_s"] > 0


def test_bad_flags_are_usage_errors():
    out = subprocess.run([sys.executable, "-m", "jax_ep.bench", "--num_sms", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--num-sms" in out.stderr


def test_inputs_route_each_token_to_distinct_experts():
    x, idx, w = bench.make_inputs(np.random.default_rng(0), 2, 16, 32, 4, 8, sets=1)[0]
    assert x.shape == (2, 16, 32) and w.shape == (2, 16, 4)
    assert all(len(set(row)) == 4 for row in idx.reshape(-1, 4))
    assert idx.min() >= 0 and idx.max() < 8
