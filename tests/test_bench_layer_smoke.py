"""bench/bench_layer.py runs on CPU devices at tiny shapes (--smoke): every measurement of a
shape is made or recorded with its reason, and the JSON and markdown table are written."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layer_bench_smoke_writes_results(tmp_path):
    out = subprocess.run(
        [sys.executable, "bench/bench_layer.py", "--smoke", "--shapes", "mixtral",
         "--impls", "capacity,cublas", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results_layer.json").read_text())
    rows = {(r["kind"], r["impl"]): r for r in results["rows"]}
    for key in [("step", "capacity"), ("experts", "capacity"), ("identity", "identity"),
                ("router", "router"), ("step", "ragged"), ("maxtext", "ragged"),
                ("maxtext", "capacity")]:
        assert rows[key]["status"] == "ok", (key, rows[key])
        assert rows[key]["time_s"] > 0
    # An unknown implementation is recorded as unavailable, not a crash.
    assert rows[("step", "cublas")]["status"] == "unavailable"
    assert results["meta"]["dense"]["tflops"] > 0
    assert results["meta"]["routing"]["mixtral"]["routed"] == 64 * 2
    table = (tmp_path / "results_layer.md").read_text()
    assert "| mixtral | 64 | 4 | jax_ep | capacity |" in table
    assert "| mixtral | 64 | 4 | maxtext | ragged |" in table
