"""README's commands and example stay true."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

from jax_ep import demo

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


def _demo_command_lines(text: str) -> list[list[str]]:
    """The flags of every `python -m jax_ep.demo ...` line of a markdown text's bash blocks
    (continuations joined, shell variables given a value, comments and trailing `&` / `;`
    dropped)."""
    code = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S)).replace("\\\n", " ")
    found = []
    for line in code.splitlines():
        if "python -m jax_ep.demo" not in line:
            continue
        tokens = shlex.split(line.split("python -m jax_ep.demo", 1)[1], comments=True)
        flags = []
        for tok in tokens:
            if tok in ("&", ";", "|") or tok.startswith(("&", ";")):
                break
            flags.append(tok.replace("$i", "0").rstrip(";&"))
        found.append(flags)
    return found


def test_documented_demo_commands_parse():
    docs = [README, (ROOT / "docs" / "launch.md").read_text()]
    lines = [flags for text in docs for flags in _demo_command_lines(text)]
    assert any("--coordinator" in f for f in lines) and any("--distributed" in f for f in lines)
    for flags in lines:
        demo.parse_args([f for f in flags if f != "--help"])  # SystemExit(2) on a bad flag
