"""The demo under jax.distributed, as docs/launch.md runs it: 2 processes on 127.0.0.1 with 4
emulated CPU devices each (gloo collectives) train one model over all 8 devices (one host:
backend="auto" picks the reference backend)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "4", "--log-every", "2", "--batch", "8", "--seq-len", "16", "--d-model", "32",
        "--heads", "2", "--layers", "1", "--ffn", "32", "--experts", "8", "--top-k", "2",
        "--cpu-devices", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_model(tmp_path):
    port = free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("XLA_FLAGS", None)  # --cpu-devices sets the device count
        cmd = [sys.executable, "-m", "jax_ep.demo", *TINY, "--plot", str(tmp_path / "loss.png"),
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
               "--process-id", str(i)]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out = p.communicate()[0] + "\n[killed after 240 s]"
        outs.append((p.returncode, out))
    log = "\n".join(f"--- process {i} (exit {rc}) ---\n{out}" for i, (rc, out) in enumerate(outs))
    assert all(rc == 0 for rc, _ in outs), log
    lead, other = outs[0][1], outs[1][1]
    assert "8 cpu devices in 2 processes" in lead, log
    assert "jax_ep backend: reference" in lead, log
    assert "step    4" in lead and "jax_ep demo" not in other, log
    # One program: both processes end with the same loss.
    last = lead.split("last loss ")[-1].split()[0]
    assert f"process 1 of 2: 4 steps, last loss {last}" in other, log
    assert (tmp_path / "loss.png").stat().st_size > 10_000
