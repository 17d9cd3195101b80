"""The benchmark scripts run on CPU devices, and their XLA baselines compute what jax_ep does
(bench_multigpu checks the baseline's rows and combine against jax_ep before timing it)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(args, tmp_path):
    out = subprocess.run([sys.executable, *args, "--out", str(tmp_path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                              "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_multigpu_bench_baseline_matches_jax_ep(tmp_path):
    stdout = run_script(["bench/bench_multigpu.py", "--backend", "reference", "--cpu", "4",
                         "--shapes", "decode", "--tokens", "8", "--reps", "2", "--trials", "1"],
                        tmp_path)
    assert "xla_a2a" in stdout
    rows = json.loads((tmp_path / "results_multigpu.json").read_text())["rows"]
    # 4 ranks, 8 tokens, top-8 of 256 experts: every token reaches at least one rank, and the
    # wire bytes are the logical ones less each rank's own tokens.
    assert rows[0]["wire_bytes"] < rows[0]["logical_bytes"] <= 4 * 8 * 7168 * 2


def test_single_device_bench_writes_table(tmp_path):
    stdout = run_script(["bench/bench_ep.py", "--shapes", "decode", "--tokens", "8",
                         "--num-sms", "", "--reps", "2", "--trials", "1", "--rounds", "2"],
                        tmp_path)
    assert "xla_permute" in stdout and "reference" in stdout
    assert (tmp_path / "results.md").read_text().count("decode") >= 6
