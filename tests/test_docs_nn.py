"""docs/nn.md's Flax and Equinox examples run as written (each in a fresh interpreter)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "nn.md").read_text(), re.S)


def test_doc_has_a_flax_and_an_equinox_example():
    assert len(BLOCKS) == 2
    assert "from jax_ep.nn.flax import MoE" in BLOCKS[0]
    assert "from jax_ep.nn.equinox import MoE" in BLOCKS[1]


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=["flax", "equinox"][:len(BLOCKS)])
def test_doc_example_runs(index):
    out = subprocess.run([sys.executable, "-c", BLOCKS[index]], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, env={"PATH": "/usr/bin:/bin",
                                                     "JAX_PLATFORMS": "cpu",
                                                     "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"loss \d+\.\d+ -> \d+\.\d+", out.stdout), out.stdout


def test_doc_describes_every_option_and_aux_entry():
    """Every MoESpec field (the layers' arguments), the aux dict's keys and the checkpoint
    names appear in docs/nn.md."""
    import dataclasses

    from jax_ep.nn import moe_math

    text = (ROOT / "docs" / "nn.md").read_text()
    names = [f.name for f in dataclasses.fields(moe_math.MoESpec)]
    names += ["param_dtype", "router_init", "expert_init", "shared_init", "bias_init",
              "sow_aux", "return_aux", "update_correction_bias", "partition_specs",
              "trainable", *moe_math.AUX_KEYS, *moe_math.CHECKPOINT_NAMES]
    missing = [n for n in names
               if not any(form in text for form in (f"`{n}", f"{n}=", f".{n}("))]
    assert not missing, missing
