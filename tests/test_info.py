"""python -m jax_ep.info reports the build and what backend="auto" picks; group creation is
logged through the standard logger "jax_ep"."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

import jax_ep
from jax_ep import info, memory

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "jax_ep.info", *args], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_text_report_names_build_devices_and_auto_backend():
    text = _run()
    from jax_ep import _ext

    ext = _ext.module()
    assert f"jax_ep {jax_ep.__version__}" in text
    assert f"jax {jax.__version__}, jaxlib " in text
    assert f"(ABI {ext.ABI_VERSION})" in text
    if ext.WITH_CUDA:
        archs = ext.CUDA_ARCHITECTURES.replace(",", ", ")
        assert f"WITH_CUDA: yes; CUDA architectures built: {archs}" in text
    else:
        assert "WITH_CUDA: no" in text
    assert f"cuda_available(): {jax_ep.cuda_available()}" in text
    assert "devices: 4 local (cpu)" in text
    assert "backend 'auto' on a mesh of these 4 devices: reference (the devices are cpu" in text


def test_json_report():
    report = json.loads(_run("--json"))
    for key in ("jax_ep", "jax", "jaxlib", "abi_version", "with_cuda", "cuda_architectures",
                "cuda_available", "devices", "auto_backend", "auto_backend_reason"):
        assert key in report, key
    assert report["auto_backend"] == "reference"
    assert len(report["devices"]) == 4 and report["devices"][0]["platform"] == "cpu"
    assert isinstance(report["cuda_architectures"], list)


def test_architectures_match_device_capabilities():
    assert info._built_for("9.0", ["80", "90"])
    assert info._built_for("9.0", ["90a"])
    assert info._built_for("10.0", ["all-major"])
    assert not info._built_for("10.0", ["80", "90"])
    assert not info._built_for("8.6", ["80-real"])


def test_group_creation_is_logged(caplog):
    mesh = Mesh(np.array(jax.devices()[:4]), ("expert",))
    cfg = jax_ep.EPConfig(num_experts=8, top_k=2, max_tokens=16, hidden_size=32,
                          capacity_factor=1.5)
    with caplog.at_level(logging.INFO, logger="jax_ep"):
        with jax_ep.EPGroup(mesh, "expert", cfg, backend="reference"):
            pass
    messages = [r.getMessage() for r in caplog.records if r.name == "jax_ep"]
    assert any("backend=reference N=4 E=8 top_k=2 max_tokens=16 hidden_size=32" in m and
               "capacity_factor=1.5" in m and "no persistent device buffers" in m
               for m in messages), messages
    assert memory.format_bytes(3 << 30) == "3.00 GiB"
    assert memory.format_bytes(1536 << 10) == "1.50 MiB"
