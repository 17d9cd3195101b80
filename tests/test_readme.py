"""README's commands and example stay true."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_first_two_commands_are_the_demo_and_the_tests():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).splitlines()
    assert "python -m jax_ep.demo" in block[0]
    assert "python -m pytest" in block[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert block[1].split("#")[0].strip() in ci


def test_api_example_runs():
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, env={"PATH": "/usr/bin:/bin",
                                                     "JAX_PLATFORMS": "cpu",
                                                     "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("(64, 32)")
